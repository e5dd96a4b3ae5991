"""`python -m csrc_bench diffusion`: the diffusion transformers on autoencoder latents, in one run on one card:

* DiT-XL and UViT-H at 512 px on DC-AE-f32c32 latents (32 x 16 x 16, patch 1: 256 tokens) against SD-VAE-f8
  latents (4 x 64 x 64, patch 2: 1024 tokens): the paper's comparison, on our models;
* our DiT-XL (`dcae.DiT`, configured the diffusers way: its timestep sinusoid and LayerNorm eps) against diffusers'
  `DiTTransformer2DModel` holding the same (seeded random) weights, eager and torch.compile.

Modes: ``train`` = one training step (forward under bf16 autocast in train() mode, MSE against a random target of
the output's shape, backward, AdamW step, zero_grad; fp32 master weights); ``infer`` = one forward of a bf16 copy,
eval, ``torch.inference_mode()``. images/s, ms per step and peak memory per case; each case starts from a fresh copy
of the weights with only that model on the device. Every case is guarded (an OOM or error becomes the row's
``error``) and the run keeps to a time budget (cases that would overrun it are recorded as skipped); eager cases
run first, the compiled ones last. Rows are printed and written as they finish:
``<out>/<date>-<gpu>-diffusion.json`` and ``.md`` (with the Targets), the ``.png`` chart at the end.
``--smoke`` runs the same path on CPU in fp32 (no autocast) with the tiny presets at tiny latents, no compile.
"""
import copy
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import (COLORS, BenchRun, closing_cells, compiled, end_to_end_arguments, end_to_end_meta,
                     end_to_end_process, figure, find_row, median_ms, results_folder, row_line, sync, with_targets)
from .report import _fmt
from .train import autocast, failed, peak_gb, reset_peak

# The targets: our DiT-XL, DC-AE-f32p1 over SD-VAE-f8p2 (the paper: 4.5x training, 4.8x inference); ours
# over diffusers' DiT-XL at the same config and weights (on the DC-AE latents).
LATENT_TRAIN_TARGET, LATENT_INFER_TARGET = 4.5, 4.8
DIFFUSERS_TRAIN_TARGET, DIFFUSERS_COMPILE_TRAIN_TARGET, DIFFUSERS_INFER_TARGET = 1.25, 1.0, 1.25
EAGER_GUESS_S = 20.0  # budget estimates for a case before one of its kind has run
FIRST_COMPILE_GUESS_S = 150.0


@dataclass(frozen=True)
class Latents:
    name: str
    shape: tuple[int, int, int]  # (channels, height, width)
    patch: int

    @property
    def tokens(self) -> int:
        return self.shape[1] * self.shape[2] // self.patch ** 2


@dataclass(frozen=True)
class Plan:
    """What one run measures, and how long it may take."""

    preset: str  # the models, for the run's metadata
    device: str
    dtype: torch.dtype  # training: the autocast dtype (float32: none); inference: the weights' dtype
    dit: str  # a DiT preset: ours vs diffusers
    uvit: str  # a U-ViT preset: ours only (diffusers has none)
    latents: tuple[Latents, ...]  # the first: the DC-AE latents the targets are judged on
    train_batch: int
    infer_batch: int
    compile: bool
    depth: int | None = None  # None: the presets' depths (smoke: 1 block, to keep the test fast)
    steps: int = 10  # timed steps per case, at most
    warmup: int = 2  # untimed steps first (a compiled provider's first one compiles)
    case_seconds: float = 5.0  # timed steps stop once they have taken about this long


GPU = Plan("dit-xl, uvit-h", "cuda", torch.bfloat16, "dit-xl", "uvit-h",
           (Latents("dc-ae-f32c32 p1", (32, 16, 16), 1), Latents("sd-vae-f8 p2", (4, 64, 64), 2)),
           train_batch=32, infer_batch=64, compile=True)
SMOKE = Plan("dit-tiny, uvit-tiny", "cpu", torch.float32, "dit-tiny", "uvit-tiny",
             (Latents("f32-like p1", (8, 4, 4), 1), Latents("f8-like p2", (4, 16, 16), 2)),
             train_batch=2, infer_batch=2, compile=False, depth=1, steps=1, warmup=1)


def build_models(plan: Plan, latents: Latents, seed: int) -> dict:
    """model name -> (our config, provider -> fp32 model on the CPU): our DiT and diffusers' with the same seeded
    random weights (adaLN-Zero's zero layers perturbed, so outputs are not trivially 0); our U-ViT."""
    from diffusers import DiTTransformer2DModel
    from diffusers.utils import logging

    from dcae import DiT, UViT, get_dit_config, get_uvit_config
    from dcae.models.transformer_pretrained import config_to_diffusers, state_dict_to_diffusers

    logging.set_verbosity_error()  # not its advice to cast with from_pretrained(torch_dtype=): we cast on purpose
    torch.manual_seed(seed)
    common = dict(latent_shape=latents.shape, patch_size=latents.patch, **({"depth": plan.depth} if plan.depth else {}))
    dit = DiT(get_dit_config(plan.dit, timestep_freq_shift=1, mlp_norm_eps=1e-5, **common))
    with torch.no_grad():
        for p in dit.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    theirs = DiTTransformer2DModel(**config_to_diffusers(dit.config))
    theirs.load_state_dict(state_dict_to_diffusers(dit.state_dict(), dit.config))
    uvit = UViT(get_uvit_config(plan.uvit, **common))
    return {plan.dit: (dit.config, {"ours": dit, "diffusers": theirs}), plan.uvit: (uvit.config, {"ours": uvit})}


def forward_fn(model, provider: str):
    """(x, t, y) -> the prediction. The compiled providers compile the whole model (static shapes)."""
    if provider.endswith("-compile"):
        model = compiled(model)
    if provider.startswith("diffusers"):
        return lambda x, t, y: model(x, t, y).sample
    return model


def batch(config, size: int, seed: int, device: str, dtype: torch.dtype):
    """Seeded random latents, float timesteps in [0, 1000) and class ids: the same for every provider."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, config.in_channels, *config.latent_size, generator=gen)
    t = torch.randint(0, 1000, (size,), generator=gen).float()
    y = torch.randint(0, config.num_classes, (size,), generator=gen)
    return x.to(device, dtype), t.to(device), y.to(device)


class Run(BenchRun):
    """The rows of one run, its clock and budget, and its files."""

    def __init__(self, plan: Plan, out: Path, start: float, budget_s: float, meta: dict, seed: int):
        self.seed = seed
        super().__init__(plan, out, meta, start, budget_s, "diffusion", sys.modules[__name__],
                         f"DiT / U-ViT on latents: {plan.preset}, {meta['gpu']} ({meta['date']})")
        self.walls = {False: [], True: []}  # seconds per case that ran, eager / compiled
        self.outputs: dict = {}  # (latents, mode) -> diffusers eager's inference output, for ours' rel. error

    def case(self, source, config, model_name: str, latents: Latents, provider: str, mode: str) -> dict:
        """Run one case on a fresh copy of ``source`` (whose architecture is our ``config``); add its row (an error
        or a skip goes into it)."""
        plan = self.plan
        size = plan.train_batch if mode == "train" else plan.infer_batch
        row = dict(model=model_name, latents=latents.name, tokens=latents.tokens, provider=provider, mode=mode,
                   batch=size, images_per_s=None, ms=None, peak_gb=None, rel_err=None, compile_s=None, wall_s=None,
                   error=None, gpu=self.meta["gpu"], dtype=self.meta["dtype"], torch=self.meta["torch"],
                   triton=self.meta["triton"], diffusers=self.meta["diffusers"])
        compiles = provider.endswith("-compile")
        estimate = max(self.walls[compiles], default=FIRST_COMPILE_GUESS_S if compiles else EAGER_GUESS_S)
        if time.perf_counter() + estimate > self.deadline:
            row["error"] = f"skipped: would end past the run's time budget (about {estimate:.0f} s needed)"
            self.add(row)
            return row
        start = time.perf_counter()
        try:
            self._measure(row, source, config, latents)
        except Exception as e:  # noqa: BLE001 - an OOM or a failing provider is a result, not the end of the run
            row["error"] = f"{type(e).__name__}: {e}"[:400]
            row["peak_gb"] = peak_gb(plan.device)[0]  # how far it got
        gc.collect()
        if compiles:
            torch._dynamo.reset()  # its caches hold the compiled model
        if plan.device == "cuda":
            torch.cuda.empty_cache()
        row["wall_s"] = time.perf_counter() - start
        if not row["error"]:
            self.walls[compiles].append(row["wall_s"])
        self.add(row)
        return row

    def _measure(self, row: dict, source, cfg, latents: Latents) -> None:
        plan, mode, provider = self.plan, row["mode"], row["provider"]
        reset_peak(plan.device)
        train = mode == "train"
        model = copy.deepcopy(source).to(plan.device, torch.float32 if train else plan.dtype).train(train)
        forward = forward_fn(model, provider)
        x, t, y = batch(cfg, row["batch"], self.seed, plan.device, torch.float32 if train else plan.dtype)
        if train:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
            target = torch.randn(x.shape[0], cfg.out_channels, *x.shape[2:], generator=torch.Generator().manual_seed(
                self.seed)).to(plan.device)

            def step(_):
                with autocast(plan):
                    loss = F.mse_loss(forward(x, t, y).float(), target)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return loss
        else:
            def step(_):
                with torch.inference_mode():
                    return forward(x, t, y)
        start = time.perf_counter()
        step(None)
        sync(plan.device)
        if provider.endswith("-compile"):
            row["compile_s"] = time.perf_counter() - start
        for _ in range(plan.warmup - 1):
            step(None)
        reset_peak(plan.device)
        ms, out = median_ms(step, None, plan.device, plan.steps, 0, plan.case_seconds)
        row.update(ms=ms, images_per_s=row["batch"] * 1e3 / ms, peak_gb=peak_gb(plan.device)[0])
        if not train and row["model"] == plan.dit:
            key = (latents.name, "infer")
            if provider == "diffusers":
                self.outputs[key] = out.float().cpu()
            elif key in self.outputs:
                ref = self.outputs[key]
                row["rel_err"] = ((out.float().cpu() - ref).norm() / ref.norm()).item()


def progress_line(row: dict, elapsed: float) -> str:
    case = (f"[{elapsed:6.1f} s] {row['model']:<9} {row['latents']:<16} {row['mode']:<5} {row['provider']:<17} "
            f"B{row['batch']:<3}")
    return row_line(case, row, None if row["rel_err"] is None else f"rel. err vs diffusers {row['rel_err']:.1e}")


def find(rows: list[dict], model: str, latents: str, provider: str, mode: str) -> dict | None:
    """The row of that case that ran without error, or None."""
    return find_row(rows, model=model, latents=latents, provider=provider, mode=mode)


def _ratio_check(fast: dict | None, slow: dict | None, target: float, what: str) -> tuple[bool, str]:
    if fast is None or slow is None:
        return False, f"{what}: not both measured"
    ratio = fast["images_per_s"] / slow["images_per_s"]
    return ratio >= target, (f"{what}: {fast['images_per_s']:.1f} / {slow['images_per_s']:.1f} img/s = x{ratio:.2f} "
                             f">= {target}")


def targets(rows: list[dict], plan: Plan) -> list[tuple[bool | None, str]]:
    """The issue's targets, each (met: True / False / None when it cannot be judged here, what was compared)."""
    dcae_latents, other = plan.latents[0].name, plan.latents[1].name
    checks = []
    for mode, target in (("train", LATENT_TRAIN_TARGET), ("infer", LATENT_INFER_TARGET)):
        checks.append(_ratio_check(find(rows, plan.dit, dcae_latents, "ours", mode),
                                   find(rows, plan.dit, other, "ours", mode), target,
                                   f"ours {plan.dit} {mode}, {dcae_latents} over {other}"))
    for mode, base, target in (("train", "diffusers", DIFFUSERS_TRAIN_TARGET),
                               ("train", "diffusers-compile", DIFFUSERS_COMPILE_TRAIN_TARGET),
                               ("infer", "diffusers", DIFFUSERS_INFER_TARGET)):
        ours = [find(rows, plan.dit, dcae_latents, p, mode) for p in ("ours",) + (("ours-compile",) if base.endswith(
            "compile") else ())]
        best = max((r for r in ours if r), key=lambda r: r["images_per_s"], default=None)
        name = best["provider"] if best else "ours"
        if base.endswith("compile") and not any(r["provider"] == base for r in rows):
            checks.append((None, f"{plan.dit} {mode} {dcae_latents}: {base} not run (no --compile)"))
            continue
        checks.append(_ratio_check(best, find(rows, plan.dit, dcae_latents, base, mode), target,
                                   f"{name} {plan.dit} {mode} {dcae_latents} over {base}"))
    return checks


def markdown(rows: list[dict], meta: dict, plan: Plan) -> str:
    precision = ("fp32 (no autocast), fp32 inference" if meta["dtype"] == "float32"
                 else f"training under {meta['dtype']} autocast with fp32 master weights, inference in {meta['dtype']}")
    lines = [f"# Diffusion transformers on latents: {meta['preset']} on {meta['gpu']} ({meta['date']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, diffusers {meta['diffusers']}, dcae_kernels backend "
             f"{meta['backend']}; {precision}. train = forward in train() mode, MSE against a random target, "
             "backward, AdamW (lr 1e-4, wd 0) step, zero_grad; infer = one forward in eval(), inference_mode. "
             f"Train batch {plan.train_batch}, inference batch {plan.infer_batch}; t uniform integers in [0, 1000) "
             "as floats, random classes. Ours = `dcae.DiT` / `dcae.UViT`; diffusers = `DiTTransformer2DModel` with "
             "our DiT's weights (`state_dict_to_diffusers`; our DiT set to diffusers' sinusoid and eps). "
             f"ms = median per step (CUDA events; the wall clock on CPU) over at most {plan.steps} steps after "
             f"{plan.warmup} warm-up step(s); a compiled provider's first step is its compile s. images/s = batch / "
             "ms. peak GB = `torch.cuda.max_memory_allocated` over the timed steps, only that model on the device "
             "(weights, gradients, AdamW state, activations); not measured on CPU. rel. err = our DiT's inference "
             "output against diffusers' (same weights, inputs). x diffusers = this row's images/s over diffusers "
             "eager's for the same model, latents and mode.", "",
             "| model | latents | tokens | mode | batch | provider | images/s | ms | peak GB | rel. err | x diffusers "
             "| compile s | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = find(rows, r["model"], r["latents"], "diffusers", r["mode"])
        speedup = r["images_per_s"] / base["images_per_s"] if base and r["images_per_s"] else None
        lines.append(f"| {r['model']} | {r['latents']} | {r['tokens']} | {r['mode']} | {r['batch']} | "
                     f"{r['provider']} | {_fmt(r['images_per_s'], 2)} | {_fmt(r['ms'], 2)} | {_fmt(r['peak_gb'], 2)} | "
                     f"{'' if r['rel_err'] is None else format(r['rel_err'], '.1e')} | "
                     f"{_fmt(speedup, 2)} | " + closing_cells(r))
    return with_targets(lines, targets(rows, plan))


def plot(rows: list[dict], path: Path, title: str) -> None:
    """images/s per case (coloured by provider), and peak GB where measured."""
    ran = [r for r in rows if not r["error"]]
    label = lambda r: f"{r['model']}\n{r['latents']}\n{r['mode']}\n{r['provider']}"  # noqa: E731
    colors = [COLORS[r["provider"]] for r in ran]
    with figure(path, title, 2, figsize=(max(10, 0.9 * len(ran)), 10)) as axes:
        for ax, key, ylabel, what in ((axes[0, 0], "images_per_s", "images/s", "throughput (higher is better)"),
                                      (axes[1, 0], "peak_gb", "peak GB", "peak memory (lower is better)")):
            ax.bar(range(len(ran)), [r[key] or 0 for r in ran], color=colors, edgecolor="k", lw=0.3)
            ax.set_xticks(range(len(ran)), [label(r) for r in ran], fontsize=7)
            ax.set_yscale("log" if key == "images_per_s" and ran else "linear")
            ax.set_ylabel(ylabel)
            ax.set_title(what, fontsize=10)


def run_cases(run: Run, compile_: bool) -> None:
    """Per latents: DiT ours and diffusers, U-ViT ours, train and infer, eager; then the compiled DiT providers
    on the DC-AE latents (whose compiling steps are the slow part, so a tight budget drops them first)."""
    plan = run.plan
    kept = None
    for latents in plan.latents:
        models = build_models(plan, latents, run.seed)
        for mode in ("train", "infer"):
            for name, (config, sources) in models.items():
                for provider in sorted(sources):  # diffusers first: ours' rel. error compares with it
                    run.case(sources[provider], config, name, latents, provider, mode)
        kept = kept or models[plan.dit]
    if compile_:
        config, sources = kept
        for mode in ("train", "infer"):
            for provider in ("diffusers", "ours"):
                run.case(sources[provider], config, plan.dit, plan.latents[0], f"{provider}-compile", mode)


def main(argv: list[str]) -> int:
    args = end_to_end_arguments("diffusion", "DiT / U-ViT on DC-AE vs SD-VAE latents, ours vs diffusers' DiT "
                                "(diffusion.py)", 540.0).parse_args(argv)
    plan = SMOKE if args.smoke else GPU
    meta = end_to_end_meta("diffusion", args, plan)
    if meta is None:
        return 1
    out = results_folder("diffusion", args)
    run = None
    with end_to_end_process(args.smoke):
        try:
            run = Run(plan, out, time.perf_counter(), args.budget, meta, args.seed)
            print(f"{meta['gpu']}: {plan.preset} on {', '.join(f'{l.name} {l.shape}' for l in plan.latents)}; torch "
                  f"{meta['torch']}, triton {meta['triton']}, diffusers {meta['diffusers']}, backend "
                  f"{meta['backend']}", flush=True)
            run_cases(run, meta["compile"])
        finally:
            if run is not None:
                run.finish()
    return 1 if any(failed(r) for r in run.rows) else 0
