"""csrc_bench's report arithmetic and files, from a made-up pytest-benchmark JSON (no GPU needed)."""
import json

from csrc_bench.report import SMOKE_COMMANDS, load_rows, main


def bench(kernel, provider, mode, seconds, nbytes, flops=None):
    return {"extra_info": dict(kernel=kernel, provider=provider, mode=mode, shape="B8", bytes=nbytes, flops=flops,
                               device_ms=seconds * 1e3, gpu="NVIDIA H200"),
            "stats": {"median": 1.5 * seconds, "iqr": seconds / 100, "rounds": 10}}


FAKE = {"datetime": "2026-11-26T10:00:00", "machine_info": {"torch": "2.11", "triton": "3.6"}, "benchmarks": [
    bench("copy", "torch", "fwd", 0.5e-3, 2_000_000_000),  # 4000 GB/s
    bench("down", "triton", "fwd", 0.4e-3, 1_500_000_000, flops=4_000_000_000),
    bench("down", "eager", "fwd", 2.0e-3, 1_500_000_000),
    bench("down", "compile", "fwd", 0.5e-3, 1_500_000_000),
]}


def test_rows_carry_bandwidth_and_speedups():
    rows = {r["provider"]: r for r in load_rows(FAKE)}
    triton = rows["triton"]
    assert abs(triton["GB/s"] - 3750) < 1e-6
    assert abs(triton["% copy"] - 93.75) < 1e-9
    assert abs(triton["TFLOP/s"] - 10) < 1e-9
    assert abs(triton["x eager"] - 5) < 1e-9 and abs(triton["x compile"] - 1.25) < 1e-9
    assert triton["x cuda"] is None and rows["eager"]["TFLOP/s"] is None


def test_report_files_from_json(tmp_path, capsys):
    """Two pytest-benchmark JSONs (as the per-module runs write them) merge into one report."""
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(dict(FAKE, benchmarks=FAKE["benchmarks"][:2])))
    second.write_text(json.dumps(dict(FAKE, benchmarks=FAKE["benchmarks"][2:])))
    assert main(["--from-json", str(first), str(second), "--out", str(tmp_path / "out")]) == 0
    stem = tmp_path / "out" / "2026-11-26-nvidia-h200"
    md = stem.with_suffix(".md").read_text()
    assert "| down | B8 | fwd | triton | 0.4000 | 0.6000 | 3750 | 93.8 | 10.00 | 5.00 | 1.25 |  |" in md
    assert json.loads(stem.with_suffix(".json").read_text())["meta"]["gpu"] == "NVIDIA H200"
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_report_without_gpu_says_so(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "report needs a CUDA GPU and this machine has none: nothing measured" in out
    assert "not performance figures" in out  # and it offers the smoke runs
    assert all(f"python -m csrc_bench {name} --smoke" in out for name in SMOKE_COMMANDS)
