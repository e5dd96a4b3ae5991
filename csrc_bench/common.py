"""Shared benchmark plumbing: GPU skip marker, a CUDA-synchronised timer for pytest-benchmark, `measure`; and for
the end-to-end benchmarks (model.py, train.py): the ours / diffusers model pair, a per-call timer, versions."""
import argparse
import contextlib
import datetime
import json
import math
import re
import signal
import statistics
import tempfile
import time
from pathlib import Path

import pytest
import torch

NO_GPU_REASON = "benchmarks need a CUDA GPU; this machine has none"
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU_REASON)
ROUND_MS = 10.0  # each wall-clock round runs the function enough times to last about this long
ROUNDS = 5


def cuda_timer() -> float:
    """Seconds, read once the device has finished all queued work (pytest-benchmark calls it per round)."""
    torch.cuda.synchronize()
    return time.perf_counter()


# Applied to every bench module: GPU only, timed with cuda_timer.
bench_marks = [requires_gpu, pytest.mark.benchmark(timer=cuda_timer, disable_gc=True)]


def compiled(fn):
    """torch.compile(fn) with static shapes and room for one compiled graph per benchmarked shape."""
    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    return torch.compile(fn, dynamic=False)


def slug(name: str) -> str:
    """A device name as results files spell it: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def grad_fn(fn, inputs, grad):
    """A function running fn forward and backward (torch.autograd.grad: nothing accumulates)."""
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad)


def timed_call(call, inputs, mode: str, fwd_bytes: int, bwd_bytes: int):
    """(function to time, bytes it moves) for ``mode``: "fwd" calls ``call(*inputs)``; "fwd+bwd" also takes the
    gradients of every input; "bwd" takes them from one retained forward."""
    if mode == "fwd":
        return (lambda: call(*inputs)), fwd_bytes
    for t in inputs:
        t.requires_grad_(True)
    y = call(*inputs)
    grad = torch.randn_like(y)
    if mode == "fwd+bwd":
        return grad_fn(call, inputs, grad), fwd_bytes + bwd_bytes
    return (lambda: torch.autograd.grad(y, inputs, grad, retain_graph=True)), bwd_bytes


def measure(benchmark, fn, *, kernel: str, provider: str, mode: str, shape: str, nbytes: int,
            flops: int | None = None) -> None:
    """Warm ``fn`` up (compile, autotune), then time it twice: device time per call with CUDA events and an
    L2 flush between calls (triton.testing.do_bench, median; the kernel figure, as in anchors-gpu.md), and
    wall time per call of back-to-back calls through pytest-benchmark (what an eager caller sees, launch
    overhead included). Metadata goes to ``extra_info`` for ``python -m csrc_bench report``.
    Bytes: inputs read once + outputs written once."""
    import triton.testing

    for _ in range(3):
        fn()
    device_ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
    start = cuda_timer()
    fn()
    once_ms = (cuda_timer() - start) * 1e3
    iterations = max(1, math.ceil(ROUND_MS / max(once_ms, 1e-3)))
    benchmark.extra_info.update(kernel=kernel, provider=provider, mode=mode, shape=shape, bytes=nbytes,
                                flops=flops, device_ms=device_ms, gpu=torch.cuda.get_device_name())
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=iterations, warmup_rounds=1)


# ---- end-to-end benchmarks: ours (dcae.DCAE) against diffusers' AutoencoderDC ----

COLORS = {"ours": "tab:red", "ours-compile": "tab:orange", "diffusers": "tab:green",
          "diffusers-compile": "tab:blue"}  # report.py's palette: ours as its triton, diffusers as eager/compile


def randomize_norms(model: torch.nn.Module) -> None:
    """Default init leaves every norm at identity (weight 1, bias 0, BatchNorm statistics 0 / 1); perturb them so
    that comparing two models checks their norm weights too."""
    with torch.no_grad():
        for module in model.modules():
            if "Norm" not in type(module).__name__:
                continue
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if t.is_floating_point():
                    noise = 0.1 * torch.randn(t.shape)
                    t.copy_(1 + noise.abs() if name == "running_var" else noise + (name == "weight"))


def build_pair(preset: str, folder: Path, seed: int, dtype: torch.dtype = torch.float32):
    """diffusers' AutoencoderDC of the dcae ``preset`` with seeded random weights, saved in ``dtype`` with
    ``save_pretrained`` to ``folder`` and loaded back as ours with ``DCAE.from_pretrained``: (ours, theirs), both
    in ``dtype`` on the CPU, holding the same weights."""
    from diffusers import AutoencoderDC
    from diffusers.utils import logging

    from dcae import DCAE
    from dcae.models.convert import config_to_diffusers

    logging.set_verbosity_error()  # not its advice to cast with from_pretrained(torch_dtype=): we cast on purpose
    torch.manual_seed(seed)
    theirs = AutoencoderDC(**config_to_diffusers(preset))
    randomize_norms(theirs)
    theirs.to(dtype).save_pretrained(folder)
    return DCAE.from_pretrained(folder), theirs


def footprint(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, x: torch.Tensor, device: str, reps: int, warmup: int, seconds: float):
    """(median ms per call of ``fn(x)`` over at most ``reps`` calls after ``warmup`` untimed ones, the last call's
    output): CUDA events around each call on a GPU (each call waited for, so the timed calls stop once they have
    taken about ``seconds``), the wall clock on CPU."""
    for _ in range(warmup):
        fn(x)
    times, stop = [], time.perf_counter() + seconds
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            out = fn(x)
            times.append((time.perf_counter() - start) * 1e3)
        if time.perf_counter() > stop:
            break
    return statistics.median(times), out


def versions() -> dict:
    import diffusers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(torch=torch.__version__, triton=triton_version, diffusers=diffusers.__version__)


def stop_on_sigterm(signum, frame):
    """A SIGTERM handler: exit through ``finally`` blocks, so that `timeout` still leaves the final files."""
    raise SystemExit(128 + signum)


def end_to_end_arguments(kind: str, description: str, budget_s: float) -> argparse.ArgumentParser:
    """The options ``python -m csrc_bench model`` and ``train`` share."""
    parser = argparse.ArgumentParser(prog=f"python -m csrc_bench {kind}", description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny preset, small images, CPU, fp32, no compile")
    parser.add_argument("--out", type=Path, help="where the results go (default csrc_bench/results; with --smoke "
                                                 "a folder in the temp dir)")
    parser.add_argument("--budget", type=float, default=budget_s,
                        help="seconds the run may take; cases that would end later are recorded as skipped")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="measure the torch.compile providers (default: on, off with --smoke)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def results_folder(kind: str, args) -> Path:
    """Where an end-to-end benchmark writes: --out, else csrc_bench/results (a temporary folder for --smoke)."""
    if args.out:
        return args.out
    return Path(tempfile.gettempdir()) / f"csrc_bench-{kind}-smoke" if args.smoke else Path(__file__).parent / "results"


def end_to_end_meta(kind: str, args, plan) -> dict | None:
    """The run's metadata (card, versions, plan, options), or None after saying why nothing can be measured."""
    if not args.smoke and not torch.cuda.is_available():
        print(f"python -m csrc_bench {kind} needs a CUDA GPU and this machine has none: nothing measured "
              "(--smoke runs a tiny version on CPU).")
        return None
    import dcae_kernels

    return dict(gpu="cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
                date=datetime.date.today().isoformat(), preset=plan.preset, dtype=str(plan.dtype).split(".")[-1],
                backend=dcae_kernels.backend(), seed=args.seed, budget_s=args.budget,
                compile=plan.compile if args.compile is None else args.compile, **versions())


@contextlib.contextmanager
def end_to_end_process(smoke: bool):
    """SIGTERM exits through ``finally`` blocks; a smoke run uses one CPU thread (at its sizes more threads
    only contend: 10x slower on a busy 2-core machine). Both restored afterwards."""
    previous, threads = signal.signal(signal.SIGTERM, stop_on_sigterm), torch.get_num_threads()
    if smoke:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        torch.set_num_threads(threads)


def closing_cells(row: dict) -> str:
    """The last two cells of a results-table row: the compile time and the error (pipes escaped)."""
    compile_s = "" if row["compile_s"] is None else f"{row['compile_s']:.1f}"
    return f"{compile_s} | {(row['error'] or '').replace('|', '/')} |"


def with_targets(lines: list[str], checks: list[tuple[bool | None, str]]) -> str:
    """The markdown document: ``lines``, then a "Targets" section with each check (met: True / False / None when it
    cannot be judged here, what was compared) as MET, NOT MET or n/a."""
    marks = {True: "MET", False: "NOT MET", None: "n/a"}
    return "\n".join([*lines, "", "## Targets", "", *(f"- {marks[met]}: {what}" for met, what in checks)]) + "\n"


@contextlib.contextmanager
def figure(path: Path, title: str, rows: int, columns: int = 1, figsize=(12, 10), top: float = 0.98):
    """A matplotlib figure of rows x columns axes (a 2-D array), titled and saved as a PNG at ``path`` when the
    body is done."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, columns, figsize=figsize, squeeze=False)
    try:
        yield axes
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0, 1, top))
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def find_row(rows: list[dict], **fields) -> dict | None:
    """The row whose ``fields`` have these values and that ran without error, or None."""
    return next((r for r in rows if not r["error"] and all(r[k] == v for k, v in fields.items())), None)


def row_line(case: str, row: dict, *notes: str | None) -> str:
    """A progress line: the case, then its error, or its images/s, ms, peak GB (where measured), the ``notes`` that
    are not None, and the compile time (compiled providers)."""
    if row["error"]:
        return f"{case} {row['error']}"
    parts = [f"{case} {row['images_per_s']:9.2f} img/s {row['ms']:9.2f} ms"]
    if row["peak_gb"] is not None:
        parts.append(f"peak {row['peak_gb']:6.2f} GB")
    parts += [note for note in notes if note is not None]
    if row["compile_s"] is not None:
        parts.append(f"(compiled in {row['compile_s']:.1f} s)")
    return "  ".join(parts)


class BenchRun:
    """One benchmark run: its rows, clock and time budget, and its files ``<date>-<gpu>-<kind>.{json,md,png}``,
    rewritten after every row (the PNG at the end) so that a run cut short still leaves its results.
    ``report``: the benchmark's module, with ``progress_line(row, elapsed)``, ``markdown(rows, meta, plan)``
    and ``plot(rows, path, title)``."""

    def __init__(self, plan, out: Path, meta: dict, start: float, budget_s: float, kind: str, report, title: str):
        self.plan, self.meta, self.report, self.title = plan, meta, report, title
        self.start, self.deadline = start, start + budget_s
        self.rows: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)
        self.stem = out / f"{meta['date']}-{slug(meta['gpu'])}-{kind}"

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(self.report.progress_line(row, time.perf_counter() - self.start), flush=True)
        self.write()

    def write(self, plot_too: bool = False) -> None:
        self.meta["wall_s"] = round(time.perf_counter() - self.start, 1)
        self.stem.with_suffix(".json").write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))
        self.stem.with_suffix(".md").write_text(self.report.markdown(self.rows, self.meta, self.plan))
        if plot_too:
            self.report.plot(self.rows, self.stem.with_suffix(".png"), self.title)

    def finish(self) -> None:
        """The PNG, the table on stdout and where the files are."""
        self.write(plot_too=True)
        print(self.stem.with_suffix(".md").read_text())
        print(f"written: {', '.join(str(self.stem.with_suffix(x)) for x in ('.json', '.md', '.png'))} "
              f"({time.perf_counter() - self.start:.0f} s)")
