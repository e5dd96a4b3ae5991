"""`python -m csrc_bench model`: DC-AE end to end, ours (`dcae.DCAE` on the Triton ops) against diffusers'
`AutoencoderDC` with the same config and the same (seeded random) weights, in one run on one card:

* encode and decode images/s and peak memory at 512px B8 and 1024px B2, eager, and torch.compile at 512px B8
  (its 4 graphs: ours / diffusers x encode / decode);
* B1 2048px and 4096px decodes, untiled and tiled (ours: ``decode(z, tile_size=T)``; diffusers:
  ``enable_tiling()``), with the PSNR of each tiled output against its own untiled one.

bf16, eval, ``torch.inference_mode()``. Every case is guarded (an OOM or error becomes the row's ``error``) and
the run keeps to a time budget (cases that would overrun it are recorded as skipped). Rows are printed and
written as they finish: ``<out>/<date>-<gpu>-model.json`` and ``.md``; the ``.png`` chart at the end.
``--smoke`` runs the same path on CPU in fp32 with the tiny preset at small sizes, no compile.
"""
import gc
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import (COLORS, BenchRun, build_pair, closing_cells, compiled, end_to_end_arguments, end_to_end_meta,
                     end_to_end_process, figure, find_row, footprint, median_ms, results_folder, row_line, sync,
                     with_targets)
from .report import _fmt

PEAK_GB_TARGET = 2.5  # the tiled 4096px decode's peak memory target
PSNR_TARGET = 40.0  # dB, tiled against untiled


@dataclass(frozen=True)
class Plan:
    """What one run measures, and how long it may take."""

    preset: str  # a dcae preset with diffusers' architecture
    device: str
    dtype: torch.dtype
    throughput: tuple[tuple[int, int], ...]  # (image side in px, batch): encode / decode images/s
    compile_at: tuple[tuple[int, int], ...]  # where the compiled providers run: 4 graphs per shape, ~30-60 s each
    large: tuple[int, ...]  # image sides in px of the B1 decodes, untiled and tiled
    tiles: tuple[int, ...]  # our tile sizes in px (tile_overlap: none, the halo is exact; dcae.models.tiling)
    diffusers_tiling: tuple[int, ...]  # AutoencoderDC.enable_tiling(*args); () = its defaults (512, 448)
    compile: bool
    reps: int = 10  # timed calls per case, at most
    warmup: int = 2  # untimed calls first (after a compiled provider's compiling call); 1 for the large decodes
    case_seconds: float = 3.0  # timed calls stop once they have taken about this long


GPU = Plan("dc-ae-f32c32-in-1.0", "cuda", torch.bfloat16, ((512, 8), (1024, 2)), ((512, 8),), (2048, 4096),
           (512, 1024), (), compile=True)
SMOKE = Plan("tiny-f32c8", "cpu", torch.float32, ((64, 2), (128, 1)), ((64, 2),), (192, 256), (128,),
             (128, 128, 96, 96), compile=False, reps=1, warmup=0)
FIRST_COMPILE_GUESS_S = 60.0  # budget estimate for a compiled case before one has been measured


def build_models(plan: Plan, folder: Path, seed: int):
    """(ours, theirs) with the same seeded random weights (`common.build_pair`), on the plan's device and dtype,
    eval."""
    return tuple(m.to(plan.device, plan.dtype).eval() for m in build_pair(plan.preset, folder, seed, plan.dtype))


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """dB; the peak is the reference's range (2 for images in [-1, 1]), so latents and random-weight outputs
    get a meaningful figure too."""
    x, ref = x.double(), ref.double()
    mse = (x - ref).square().mean().item()
    peak = (ref.max() - ref.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def peak_call(fn, x: torch.Tensor):
    """``fn(x)`` once on CUDA: (its output, the bytes it allocated at its peak above what was allocated
    before it)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(x)
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - before


def providers(ours, theirs, compile_: bool) -> dict:
    """provider -> (encode, decode), each a function of one tensor. The compiled providers compile the
    encoder / decoder modules (static shapes: one graph per shape)."""
    fns = {"ours": (ours.encode, ours.decode),
           "diffusers": (lambda x: theirs.encode(x).latent, lambda z: theirs.decode(z).sample)}
    if compile_:
        fns["ours-compile"] = (compiled(ours.encoder), compiled(ours.decoder))
        fns["diffusers-compile"] = (compiled(theirs.encoder), compiled(theirs.decoder))
    return fns


class Run(BenchRun):
    """The rows of one run, its clock and budget, and its files."""

    def __init__(self, plan: Plan, out: Path, start: float, budget_s: float, meta: dict, weights: dict):
        self.weights = weights
        super().__init__(plan, out, meta, start, budget_s, "model", sys.modules[__name__],
                         f"DC-AE {plan.preset}: ours vs diffusers, {meta['gpu']}, {meta['dtype']} ({meta['date']})")
        self.compile_times: list[float] = []

    def case(self, part: str, provider: str, mode: str, side: int, batch: int, fn, x: torch.Tensor, *,
             ref=None, ref_name=None, tile=None, compiles=False):
        """Time ``fn(x)``, measure its peak memory and its PSNR against ``ref``; add the row (an error or a
        skip goes into it) and return the output (None on error). ``part``: "throughput" or "large"."""
        row = dict(model=self.plan.preset, part=part, provider=provider, mode=mode, shape=f"{side}px", batch=batch,
                   tile=tile, images_per_s=None, ms=None, peak_gb=None, work_gb=None, psnr=None, psnr_vs=None,
                   compile_s=None, error=None, gpu=self.meta["gpu"], dtype=self.meta["dtype"],
                   torch=self.meta["torch"], triton=self.meta["triton"], diffusers=self.meta["diffusers"])
        compile_s = max(self.compile_times, default=FIRST_COMPILE_GUESS_S)
        estimate = self.plan.case_seconds + (compile_s if compiles else 5.0)
        if time.perf_counter() + estimate > self.deadline:
            row["error"] = f"skipped: would end past the run's time budget (about {estimate:.0f} s needed)"
            self.add(row)
            return None
        out = None
        try:
            if compiles:
                start = time.perf_counter()
                fn(x)
                sync(self.plan.device)
                row["compile_s"] = time.perf_counter() - start
                self.compile_times.append(row["compile_s"])
            ms, out = median_ms(fn, x, self.plan.device, self.plan.reps,
                                self.plan.warmup if part == "throughput" else min(self.plan.warmup, 1),
                                self.plan.case_seconds)
            row.update(ms=ms, images_per_s=batch * 1e3 / ms)
            if self.plan.device == "cuda":
                del out
                out, work = peak_call(fn, x)
                row.update(work_gb=work / 1e9,
                           peak_gb=(work + self.weights[provider.split("-")[0]] + x.numel() * x.element_size())
                           / 1e9)
            if ref is not None:
                row.update(psnr=psnr(out, ref), psnr_vs=ref_name)
        except Exception as e:  # noqa: BLE001 - an OOM or a failing provider is a result, not the end of the run
            row["error"] = f"{type(e).__name__}: {e}"[:400]
            out = None
        if row["error"]:
            gc.collect()
            if self.plan.device == "cuda":
                torch.cuda.empty_cache()
        self.add(row)
        return out


def progress_line(row: dict, elapsed: float) -> str:
    case = (f"[{elapsed:6.1f} s] {row['provider']:<17} {row['mode']:<12} {row['shape']:>6} B{row['batch']:<2} "
            f"{row['tile'] or '':<8}")
    return row_line(case, row, None if row["psnr"] is None else f"PSNR {row['psnr']:6.1f} dB vs {row['psnr_vs']}")


def run_cases(run: Run, ours, theirs, compile_: bool) -> None:
    """Eager throughput first, then the large decodes, then the compiled providers (whose compiling calls are
    the slow part, so a tight budget drops them first)."""
    plan, cfg = run.plan, ours.config
    fns = providers(ours, theirs, compile_)
    gen = torch.Generator().manual_seed(1)
    r, c = cfg.spatial_compression_ratio, cfg.latent_channels
    inputs = {(side, batch, mode): x.to(plan.device, plan.dtype) for side, batch in plan.throughput for mode, x in (
        ("encode", torch.rand(batch, cfg.in_channels, side, side, generator=gen) * 2 - 1),
        ("decode", torch.randn(batch, c, side // r, side // r, generator=gen)))}
    refs = {}
    for (side, batch, mode), x in inputs.items():
        i = ("encode", "decode").index(mode)
        refs[side, batch, mode] = run.case("throughput", "diffusers", mode, side, batch, fns["diffusers"][i], x)
        run.case("throughput", "ours", mode, side, batch, fns["ours"][i], x, ref=refs[side, batch, mode],
                 ref_name="diffusers")
    for side in plan.large:
        z = torch.randn(1, c, side // r, side // r, generator=gen).to(plan.device, plan.dtype)
        theirs.disable_tiling()
        untiled = run.case("large", "diffusers", "decode", side, 1, fns["diffusers"][1], z)
        theirs.enable_tiling(*plan.diffusers_tiling)
        tile = f"{theirs.tile_sample_min_height}/{theirs.tile_sample_stride_height}"
        run.case("large", "diffusers", "decode-tiled", side, 1, fns["diffusers"][1], z, ref=untiled,
                 ref_name="diffusers untiled", tile=tile)
        theirs.disable_tiling()
        ours_untiled = run.case("large", "ours", "decode", side, 1, fns["ours"][1], z, ref=untiled,
                                ref_name="diffusers untiled")
        for size in plan.tiles:
            run.case("large", "ours", "decode-tiled", side, 1, lambda z, size=size: ours.decode(z, tile_size=size),
                     z, ref=ours_untiled, ref_name="ours untiled", tile=str(size))
        del untiled, ours_untiled
    for (side, batch, mode), x in inputs.items():
        if not compile_ or (side, batch) not in plan.compile_at:
            continue
        for provider in ("diffusers-compile", "ours-compile"):
            run.case("throughput", provider, mode, side, batch, fns[provider][("encode", "decode").index(mode)], x,
                     ref=refs[side, batch, mode], ref_name="diffusers", compiles=True)


def baselines(rows: list[dict]) -> dict:
    """(mode, shape, batch, provider) -> ms of the diffusers rows that ran."""
    return {(r["mode"], r["shape"], r["batch"], r["provider"]): r["ms"] for r in rows
            if r["provider"].startswith("diffusers") and not r["error"]}


def targets(rows: list[dict], plan: Plan) -> list[tuple[bool | None, str]]:
    """The issue's targets, each (met: True / False / None when it cannot be judged here, what was compared)."""
    def find(provider, mode, side, batch=1):
        return find_row(rows, provider=provider, mode=mode, shape=f"{side}px", batch=batch)

    checks = []
    for side, batch in plan.throughput:
        for mode in ("encode", "decode"):
            ours, base = find("ours", mode, side, batch), find("diffusers", mode, side, batch)
            met = ours["images_per_s"] >= base["images_per_s"] if ours and base else False
            ips = [f"{r['images_per_s']:.1f}" if r else "(not measured)" for r in (ours, base)]
            checks.append((met, f"ours {mode} {side}px B{batch}: {ips[0]} img/s >= diffusers eager {ips[1]}"))
    side = max(plan.large)
    base = find("diffusers", "decode-tiled", side)
    for size in plan.tiles:
        r = next((r for r in rows if (r["provider"], r["mode"], r["shape"], r["tile"])
                  == ("ours", "decode-tiled", f"{side}px", str(size)) and not r["error"]), None)
        what = f"ours tiled decode {side}px, tile {size}:"
        if r is None:
            checks.append((False, f"{what} did not run"))
            continue
        checks.append((None if r["peak_gb"] is None else r["peak_gb"] <= PEAK_GB_TARGET,
                       f"{what} peak {_fmt(r['peak_gb'], 2) or '(not measured)'} GB <= {PEAK_GB_TARGET}"))
        checks.append((r["psnr"] is not None and r["psnr"] >= PSNR_TARGET,
                       f"{what} PSNR {_fmt(r['psnr'], 1)} dB vs untiled >= {PSNR_TARGET}"))
        checks.append((base is not None and r["ms"] < base["ms"],
                       f"{what} {r['ms']:.1f} ms < diffusers tiled ({base and base['tile']}) "
                       f"{_fmt(base and base['ms'], 1)} ms"))
    return checks


def markdown(rows: list[dict], meta: dict, plan: Plan) -> str:
    base = baselines(rows)
    lines = [f"# DC-AE {meta['preset']}: ours vs diffusers AutoencoderDC on {meta['gpu']} ({meta['date']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, diffusers {meta['diffusers']}, dcae_kernels backend "
             f"{meta['backend']}; {meta['dtype']}, eval, inference_mode; same seeded random weights "
             "(diffusers `save_pretrained` -> `DCAE.from_pretrained`). ms = median per call (CUDA events around "
             f"each call, the wall clock on CPU; after {plan.warmup} warm-up calls ({min(plan.warmup, 1)} for the "
             "large decodes); a "
             "compiled provider's compiling call is excluded and given as compile s); images/s = batch / ms. "
             f"peak GB = the model's weights (ours {meta['weights_gb']['ours']:.3f} GB, diffusers "
             f"{meta['weights_gb']['diffusers']:.3f} GB) + the input + the call's peak allocation above what was "
             "allocated before it (= work GB): what a process holding only that model would peak at. PSNR against "
             "the named reference, peak = the reference's range. x diffusers / x diffusers-compile = that row's ms "
             "over this row's for the same mode and shape (>1: this row is faster). tile: ours = tile_size in px "
             "(exact halos, no overlap: `dcae.models.tiling`); diffusers = tile / stride in px of `enable_tiling`.", "",
             "| mode | shape | batch | provider | tile | images/s | ms | peak GB | work GB | PSNR dB | vs "
             "| x diffusers | x diffusers-compile | compile s | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = {}
        for provider in ("diffusers", "diffusers-compile"):
            base_ms = base.get((r["mode"], r["shape"], r["batch"], provider))
            ratio[provider] = base_ms / r["ms"] if base_ms and r["ms"] else None
        lines.append(f"| {r['mode']} | {r['shape']} | {r['batch']} | {r['provider']} | {r['tile'] or ''} | "
                     f"{_fmt(r['images_per_s'], 2)} | {_fmt(r['ms'], 2)} | {_fmt(r['peak_gb'], 2)} | "
                     f"{_fmt(r['work_gb'], 2)} | {_fmt(r['psnr'], 1)} | {r['psnr_vs'] or ''} | "
                     f"{_fmt(ratio['diffusers'], 2)} | {_fmt(ratio['diffusers-compile'], 2)} | " + closing_cells(r))
    return with_targets(lines, targets(rows, plan))


def _bars(ax, rows: list[dict], category, series, value: str, ylabel: str) -> None:
    """Grouped bars: one group per ``category(row)``, one bar per ``series(row)`` (coloured by provider, hatched
    when tiled); failed cases are left empty."""
    cats = list(dict.fromkeys(category(r) for r in rows))
    first = {}
    for r in rows:
        first.setdefault(series(r), r)
    names = sorted(first, key=lambda n: (list(COLORS).index(first[n]["provider"]), bool(first[n]["tile"])))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = {category(r): r[value] or 0 for r in rows if series(r) == name}
        ax.bar([c + i * width for c in range(len(cats))], [vals.get(c, 0) for c in cats], width, label=name,
               color=COLORS[first[name]["provider"]], hatch="//" if first[name]["tile"] else None, edgecolor="k",
               lw=0.3)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cats))], cats, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    ax.legend(fontsize=7, ncol=min(len(names), 5), loc="upper left")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """images/s per (mode, shape) and provider; the large decodes' ms and peak GB per variant."""
    small = [r for r in rows if r["part"] == "throughput"]
    large = [r for r in rows if r["part"] == "large"]
    variant = lambda r: r["provider"] + (f" tiled {r['tile']}" if r["tile"] else " untiled")  # noqa: E731
    with figure(path, title, 3, figsize=(12, 12)) as grid:
        axes = grid[:, 0]
        _bars(axes[0], small, lambda r: f"{r['mode']} {r['shape']} B{r['batch']}", lambda r: r["provider"],
              "images_per_s", "images/s")
        axes[0].set_title("encode / decode throughput (higher is better)", fontsize=10)
        _bars(axes[1], large, lambda r: f"decode {r['shape']} B{r['batch']}", variant, "ms", "ms")
        axes[1].set_title("large decodes, untiled vs tiled: time (lower is better)", fontsize=10)
        _bars(axes[2], large, lambda r: f"decode {r['shape']} B{r['batch']}", variant, "peak_gb", "peak GB")
        axes[2].axhline(PEAK_GB_TARGET, color="k", ls="--", lw=1)
        axes[2].set_title(f"large decodes: peak memory (target for ours tiled: <= {PEAK_GB_TARGET} GB)", fontsize=10)


def main(argv: list[str]) -> int:
    args = end_to_end_arguments("model", "DC-AE end to end: ours vs diffusers' AutoencoderDC (model.py)",
                                220.0).parse_args(argv)
    plan = SMOKE if args.smoke else GPU
    meta = end_to_end_meta("model", args, plan)
    if meta is None:
        return 1
    out = results_folder("model", args)
    run = None
    with end_to_end_process(args.smoke):
        try:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as folder:
                ours, theirs = build_models(plan, Path(folder), args.seed)
            weights = {"ours": footprint(ours), "diffusers": footprint(theirs)}
            meta.update(weights_gb={k: v / 1e9 for k, v in weights.items()},
                        params=sum(p.numel() for p in theirs.parameters()))
            run = Run(plan, out, start, args.budget, meta, weights)
            print(f"{meta['gpu']}: {plan.preset}, {meta['params'] / 1e6:.1f} M parameters, built, saved and loaded "
                  f"in {time.perf_counter() - start:.1f} s; torch {meta['torch']}, triton {meta['triton']}, "
                  f"diffusers {meta['diffusers']}, backend {meta['backend']}", flush=True)
            with torch.inference_mode():
                run_cases(run, ours, theirs, meta["compile"])
        finally:
            if run is not None:
                run.finish()
    return 0 if all(not r["error"] for r in run.rows) else 1
