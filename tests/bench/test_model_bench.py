"""`python -m csrc_bench model --smoke`: the model benchmark's whole path on CPU (tiny preset, fp32, the
reference ops), its files, and its table arithmetic."""
import json

import pytest

from csrc_bench.model import GPU, SMOKE, markdown, targets
from csrc_bench.model import main as model_main

pytest.importorskip("diffusers")  # the dev extra has it; the GPU machine only when .whl/ is carried


def test_smoke_run_writes_rows_table_and_chart(tmp_path, capsys, monkeypatch):
    # The ops' own tests cover the Triton kernels; under the interpreter this run would take minutes.
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "reference")
    assert model_main(["--smoke", "--out", str(tmp_path)]) == 0
    [json_path] = tmp_path.glob("*-cpu-smoke-model.json")
    data = json.loads(json_path.read_text())
    rows = data["rows"]
    assert data["meta"]["diffusers"] and data["meta"]["preset"] == SMOKE.preset
    assert not [r["error"] for r in rows if r["error"]]
    cases = {(r["provider"], r["mode"], r["shape"], r["batch"], r["tile"]) for r in rows}
    for side, batch in SMOKE.throughput:
        for provider in ("ours", "diffusers"):
            assert {(provider, "encode", f"{side}px", batch, None),
                    (provider, "decode", f"{side}px", batch, None)} <= cases
    for side in SMOKE.large:
        assert ("ours", "decode", f"{side}px", 1, None) in cases
        assert {("ours", "decode-tiled", f"{side}px", 1, str(t)) for t in SMOKE.tiles} <= cases
        diffusers_tile = f"{SMOKE.diffusers_tiling[0]}/{SMOKE.diffusers_tiling[2]}"  # size / stride
        assert ("diffusers", "decode-tiled", f"{side}px", 1, diffusers_tile) in cases
    assert all(r["images_per_s"] > 0 and r["ms"] > 0 for r in rows)
    # Same weights, fp32: ours agrees with diffusers, and our tiled decode with our untiled one (exact tiling).
    ours = [r for r in rows if r["provider"] == "ours"]
    assert {r["psnr_vs"] for r in ours} == {"diffusers", "diffusers untiled", "ours untiled"}
    assert all(r["psnr"] > 60 for r in ours), [(r["mode"], r["shape"], r["psnr"]) for r in ours]
    md = json_path.with_suffix(".md").read_text()
    assert "| decode-tiled | " in md and "## Targets" in md
    assert json_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "written:" in capsys.readouterr().out


def test_without_gpu_says_so_and_fails(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model_main([]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().out


def row(provider, mode, ms, shape="512px", batch=8, tile=None, peak_gb=None, psnr=None, error=None):
    return dict(part="throughput", provider=provider, mode=mode, shape=shape, batch=batch, tile=tile,
                images_per_s=batch * 1e3 / ms if ms else None, ms=ms, peak_gb=peak_gb, work_gb=None, psnr=psnr,
                psnr_vs=None, compile_s=None, error=error)


def test_ratios_and_targets():
    rows = [row("diffusers", "encode", 80.0), row("diffusers-compile", "encode", 50.0), row("ours", "encode", 40.0),
            row("diffusers", "decode", 60.0), row("ours", "decode", 75.0),
            row("diffusers", "decode-tiled", 900.0, "4096px", 1, "512/448"),
            row("ours", "decode-tiled", 600.0, "4096px", 1, "512", peak_gb=2.1, psnr=55.0),
            row("ours", "decode-tiled", None, "4096px", 1, "1024", error="OutOfMemoryError: ...")]
    meta = dict(preset="p", gpu="NVIDIA H200", date="2026-11-26", torch="2.11", triton="3.6", diffusers="0.42",
                backend="triton", dtype="bfloat16", weights_gb={"ours": 0.6, "diffusers": 0.6})
    md = markdown(rows, meta, GPU)
    assert "| encode | 512px | 8 | ours |  | 200.00 | 40.00 |" in md and "| 2.00 | 1.25 |" in md
    assert "| decode-tiled | 4096px | 1 | ours | 512 | 1.67 | 600.00 | 2.10 |" in md and "| 1.50 |" in md
    met = {what: ok for ok, what in targets(rows, GPU)}
    assert met["ours encode 512px B8: 200.0 img/s >= diffusers eager 100.0"] is True
    assert met["ours decode 512px B8: 106.7 img/s >= diffusers eager 133.3"] is False
    assert met["ours encode 1024px B2: (not measured) img/s >= diffusers eager (not measured)"] is False
    assert met["ours tiled decode 4096px, tile 512: peak 2.10 GB <= 2.5"] is True
    assert met["ours tiled decode 4096px, tile 512: 600.0 ms < diffusers tiled (512/448) 900.0 ms"] is True
    assert met["ours tiled decode 4096px, tile 1024: did not run"] is False
