"""Run the benchmark suites and turn pytest-benchmark's JSON into results/<date>-<gpu>.{json,md,png}."""
import datetime
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from .common import figure, slug

HERE = Path(__file__).parent
BASELINES = ("eager", "compile", "cuda")
SMOKE_COMMANDS = ("model", "train", "diffusion")  # the benchmarks with a tiny CPU version (--smoke)
NO_GPU = ("python -m csrc_bench report needs a CUDA GPU and this machine has none: nothing measured.\n"
          "Tiny CPU smoke runs check the benchmark code paths (they are not performance figures): "
          + ", ".join(f"python -m csrc_bench {name} --smoke" for name in SMOKE_COMMANDS)
          + " (`make bench` runs them on a machine without CUDA).")


def run_benchmarks(out_dir: Path, select: str | None, timeout: float | None) -> list[Path]:
    """pytest-benchmark over each csrc_bench/test_bench_*.py in its own process (so one that fails or runs out
    of time loses only its own rows); returns the JSON files written."""
    written = []
    for module in sorted(HERE.glob("test_bench_*.py")):
        json_path = out_dir / f"{module.stem}.json"
        cmd = [sys.executable, "-m", "pytest", str(module), "-q", "-p", "no:cacheprovider",
               "--import-mode=importlib", "-o", "addopts=", f"--benchmark-json={json_path}",
               "--benchmark-columns=median,rounds,iterations", *(["-k", select] if select else [])]
        try:
            subprocess.run(cmd, cwd=HERE.parent, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"{module.name}: ran past {timeout} s, its rows are missing")
        if json_path.exists():
            written.append(json_path)
    return written


def merge(paths: list[Path]) -> dict:
    """One pytest-benchmark JSON holding the benchmarks of all ``paths``."""
    merged = None
    for path in paths:
        data = json.loads(path.read_text())
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] += data["benchmarks"]
    return merged


def load_rows(bench_json: dict) -> list[dict]:
    """One row per benchmark: its extra_info plus ms, GB/s, TFLOP/s, % of copy bandwidth and speed-ups."""
    rows = [dict(b["extra_info"], ms=b["extra_info"]["device_ms"], wall_ms=b["stats"]["median"] * 1e3,
                 wall_iqr_ms=b["stats"]["iqr"] * 1e3) for b in bench_json["benchmarks"]]
    copy = [r for r in rows if r["kernel"] == "copy"]
    copy_gbps = copy[0]["bytes"] / copy[0]["ms"] / 1e6 if copy else None
    by_case = defaultdict(dict)
    for r in rows:
        r["GB/s"] = r["bytes"] / r["ms"] / 1e6
        r["TFLOP/s"] = r["flops"] / r["ms"] / 1e9 if r.get("flops") else None
        r["% copy"] = 100 * r["GB/s"] / copy_gbps if copy_gbps else None
        by_case[r["kernel"], r["shape"], r["mode"]][r["provider"]] = r["ms"]
    for r in rows:
        for base in BASELINES:
            base_ms = by_case[r["kernel"], r["shape"], r["mode"]].get(base)
            r[f"x {base}"] = base_ms / r["ms"] if base_ms else None
    return rows


def _fmt(v, digits):
    return "" if v is None else f"{v:.{digits}f}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Benchmarks on {meta['gpu']} ({meta['date']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}. ms = device time per call, median of CUDA-event "
             "timings with an L2 flush between calls (triton.testing.do_bench); GB/s, % copy and the speed-ups "
             "use it. GB/s = (inputs read once + outputs written once) / ms; % copy = against the device copy "
             "bandwidth measured in the same run; x eager / x compile / x cuda = that provider's ms over this "
             "row's (>1: this row is faster). wall ms = per call of back-to-back calls (pytest-benchmark, "
             f"median of {meta['rounds']} rounds): what an eager caller sees, Python launch overhead included.",
             "", "| kernel | shape | mode | provider | ms | wall ms | GB/s | % copy | TFLOP/s | x eager | x compile "
             "| x cuda |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["shape"], r["mode"], r["provider"])):
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['mode']} | {r['provider']} | {r['ms']:.4f} | "
                     f"{r['wall_ms']:.4f} | "
                     f"{r['GB/s']:.0f} | {_fmt(r['% copy'], 1)} | {_fmt(r['TFLOP/s'], 2)} | "
                     f"{_fmt(r['x eager'], 2)} | {_fmt(r['x compile'], 2)} | {_fmt(r['x cuda'], 2)} |")
    return "\n".join(lines) + "\n"


PROVIDER_COLORS = {"triton": "tab:red", "compile": "tab:blue", "eager": "tab:green", "cuda": "tab:orange"}


def plot(rows: list[dict], path: Path, title: str) -> None:
    """One panel per kernel: GB/s per (shape, mode), a bar per provider, the copy bandwidth as a line."""
    copy = [r for r in rows if r["kernel"] == "copy"]
    kernels = sorted({r["kernel"] for r in rows} - {"copy"})
    with figure(path, title, len(kernels), figsize=(14, 4.2 * len(kernels)), top=0.985) as axes:
        for ax, kernel in zip(axes[:, 0], kernels):
            mine = [r for r in rows if r["kernel"] == kernel]
            cases = sorted({(r["shape"], r["mode"]) for r in mine})
            providers = [p for p in PROVIDER_COLORS if any(r["provider"] == p for r in mine)]
            width = 0.8 / len(providers)
            for i, provider in enumerate(providers):
                gbps = {(r["shape"], r["mode"]): r["GB/s"] for r in mine if r["provider"] == provider}
                ax.bar([c + i * width for c in range(len(cases))], [gbps.get(c, 0) for c in cases], width,
                       label=provider, color=PROVIDER_COLORS[provider])
            if copy:
                ax.axhline(copy[0]["GB/s"], color="k", ls="--", lw=1, label="device copy")
            ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))], [f"{s}  {m}" for s, m in cases],
                          rotation=25, ha="right", fontsize=7)
            ax.set_ylabel("GB/s")
            ax.set_title(kernel, fontsize=10)
            ax.legend(fontsize=7, ncol=len(providers) + 1, loc="upper left")


def write_report(bench_json: dict, out_dir: Path) -> Path:
    """Write <date>-<gpu>.json / .md / .png into ``out_dir``; returns the markdown's path."""
    rows = load_rows(bench_json)
    info = bench_json.get("machine_info", {})
    gpu = rows[0]["gpu"] if rows else "unknown-gpu"
    meta = dict(gpu=gpu, date=bench_json.get("datetime", datetime.datetime.now().isoformat())[:10],
                torch=info.get("torch", "?"), triton=info.get("triton", "?"),
                rounds=bench_json["benchmarks"][0]["stats"]["rounds"] if rows else 0)
    stem = out_dir / f"{meta['date']}-{slug(gpu)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    plot(rows, stem.with_suffix(".png"), f"{gpu}, bf16 ({meta['date']})")
    return stem.with_suffix(".md")


def main(argv: list[str]) -> int:
    import argparse
    import tempfile

    import torch

    parser = argparse.ArgumentParser(prog="python -m csrc_bench report",
                                     description="The kernel benchmarks (csrc_bench/test_bench_*.py, "
                                                 "pytest-benchmark) on a CUDA GPU, and their report.")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where the results go")
    parser.add_argument("-k", dest="select", help="pytest -k expression to run a subset")
    parser.add_argument("--from-json", type=Path, nargs="+", help="re-make the report from pytest-benchmark JSONs")
    parser.add_argument("--timeout", type=float, help="seconds each benchmark module may run")
    args = parser.parse_args(argv)
    if args.from_json:
        bench_json = merge(args.from_json)
    else:
        if not torch.cuda.is_available():
            print(NO_GPU)
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            paths = run_benchmarks(Path(tmp), args.select, args.timeout)
            if not paths:
                print("no benchmark finished: nothing to report")
                return 1
            bench_json = merge(paths)
        bench_json.setdefault("machine_info", {}).update(torch=torch.__version__,
                                                         triton=__import__("triton").__version__)
    md = write_report(bench_json, args.out)
    print(md.read_text())
    print(f"written: {md.with_suffix('.json')}, {md}, {md.with_suffix('.png')}")
    return 0
