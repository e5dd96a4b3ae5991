"""`python -m csrc_bench diffusion --smoke`: the diffusion benchmark's whole path on CPU (tiny presets, fp32, the
reference ops), its files, and its targets' arithmetic."""
import json

import pytest

from csrc_bench.diffusion import GPU, SMOKE, markdown, targets
from csrc_bench.diffusion import main as diffusion_main

pytest.importorskip("diffusers")


def test_smoke_run_writes_rows_table_and_chart(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "reference")  # the ops' own tests cover the kernels
    assert diffusion_main(["--smoke", "--out", str(tmp_path)]) == 0
    [json_path] = tmp_path.glob("*-cpu-smoke-diffusion.json")
    data = json.loads(json_path.read_text())
    rows = data["rows"]
    assert data["meta"]["preset"] == SMOKE.preset and not [r["error"] for r in rows if r["error"]]
    cases = {(r["model"], r["latents"], r["provider"], r["mode"]) for r in rows}
    assert cases == {(model, latents.name, provider, mode) for latents in SMOKE.latents for mode in ("train", "infer")
                     for model, providers in ((SMOKE.dit, ("ours", "diffusers")), (SMOKE.uvit, ("ours",)))
                     for provider in providers}
    assert {r["tokens"] for r in rows} == {16, 64}
    assert all(r["images_per_s"] > 0 and r["ms"] > 0 and r["peak_gb"] is None for r in rows)
    # Same weights and inputs, fp32: our DiT's inference output is diffusers'.
    ours = [r for r in rows if (r["model"], r["provider"], r["mode"]) == (SMOKE.dit, "ours", "infer")]
    assert len(ours) == 2 and all(r["rel_err"] < 1e-4 for r in ours)
    md = json_path.with_suffix(".md").read_text()
    assert "## Targets" in md and "| dit-tiny | f8-like p2 | 64 | infer | 2 | diffusers |" in md
    assert json_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "written:" in capsys.readouterr().out


def test_without_gpu_says_so_and_fails(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert diffusion_main([]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().out


def row(latents, provider, mode, images_per_s, error=None):
    return dict(model="dit-xl", latents=latents, tokens=256, provider=provider, mode=mode, batch=32,
                images_per_s=images_per_s, ms=32e3 / images_per_s if images_per_s else None, peak_gb=20.9,
                rel_err=None, compile_s=None, wall_s=1.0, error=error)


def test_targets_and_table():
    f32, f8 = (latents.name for latents in GPU.latents)
    rows = [row(f32, "diffusers", "train", 100.0), row(f32, "ours", "train", 240.0), row(f8, "ours", "train", 50.0),
            row(f32, "diffusers", "infer", 1000.0), row(f32, "ours", "infer", 2000.0),
            row(f8, "ours", "infer", 400.0), row(f32, "diffusers-compile", "train", 200.0),
            row(f32, "ours-compile", "train", 190.0), row(f8, "diffusers", "train", None, error="OutOfMemoryError")]
    met = {what: ok for ok, what in targets(rows, GPU)}
    assert met["ours dit-xl train, dc-ae-f32c32 p1 over sd-vae-f8 p2: 240.0 / 50.0 img/s = x4.80 >= 4.5"] is True
    assert met["ours dit-xl infer, dc-ae-f32c32 p1 over sd-vae-f8 p2: 2000.0 / 400.0 img/s = x5.00 >= 4.8"] is True
    assert met["ours dit-xl train dc-ae-f32c32 p1 over diffusers: 240.0 / 100.0 img/s = x2.40 >= 1.25"] is True
    assert met["ours dit-xl train dc-ae-f32c32 p1 over diffusers-compile: 240.0 / 200.0 img/s = x1.20 >= 1.0"] is True
    assert met["ours dit-xl infer dc-ae-f32c32 p1 over diffusers: 2000.0 / 1000.0 img/s = x2.00 >= 1.25"] is True
    slow = [r if r["provider"] != "ours" or r["mode"] != "train" else row(f32, "ours", "train", 110.0) for r in rows]
    met = {what: ok for ok, what in targets(slow, GPU)}
    assert met["ours dit-xl train dc-ae-f32c32 p1 over diffusers: 110.0 / 100.0 img/s = x1.10 >= 1.25"] is False
    assert met["ours-compile dit-xl train dc-ae-f32c32 p1 over diffusers-compile: 190.0 / 200.0 img/s = x0.95 >= "
               "1.0"] is False
    meta = dict(preset=GPU.preset, gpu="NVIDIA H200", date="2026-12-02", torch="2.11", triton="3.6",
                diffusers="0.42.1", backend="triton", dtype="bfloat16")
    md = markdown(rows, meta, GPU)
    assert "| dit-xl | dc-ae-f32c32 p1 | 256 | train | 32 | ours | 240.00 | 133.33 | 20.90 |  | 2.40 |" in md
    assert "| OutOfMemoryError |" in md and md.count("- MET:") == 5
