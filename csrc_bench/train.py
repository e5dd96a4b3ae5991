"""`python -m csrc_bench train`: one DC-AE training step as the trainer takes it, timed on the trainer's own
`Trainer.train_step` (one micro-batch: the core's autocast, bf16 on CUDA, L1 + LPIPS loss, backward, AdamW step,
zero_grad, schedule step), in one run on one card:

* phase 1 at 256px, f32c32, batch 32 (the next smaller batch after an out-of-memory): images/s and peak memory,
  ours (`dcae.DCAE` on the Triton ops) against diffusers' `AutoencoderDC` with the same config and the same
  (seeded random) weights; eager, then torch.compile of encoder and decoder if the budget allows;
* phase 2 at 1024px: our model frozen for phase 2 (`AutoencoderTask.freeze` / ``train_mode``: the phase's parts,
  AdamW over its trainable parameters) against the same model training everything (phase 1's set-up), at the
  largest batch of 8, 4, 2 that the latter fits in: peak memory and their ratio.

Each case builds a `Trainer` (in a temporary run folder, closed after the case) around `BenchTask`: the DC-AE task
on a fresh copy of the same weights, with only that model (and LPIPS) on the device; fp32 master weights, the
phase's AdamW settings (`dcae.train.phases.PHASES`), LPIPS with random VGG weights (its cost does not depend on
them). Every case is guarded (an OOM or error becomes the row's ``error``) and the run keeps to a time budget
(cases that would overrun it are recorded as skipped). Rows are printed and written as they finish:
``<out>/<date>-<gpu>-train.json`` and ``.md``; the ``.png`` chart at the end.
``--smoke`` runs the same path on CPU in fp32 (no autocast, as the trainer on CPU) with the tiny preset at small
sizes, no compile; peak memory is CUDA's, so there only its estimate (state + saved for backward) is given.
Exit status 1 when a case failed (out-of-memory and budget skips are results, not failures) or without a GPU.
"""
import argparse
import contextlib
import copy
import gc
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dcae.lpips import LPIPS
from dcae.train.autoencoder import AutoencoderOptions, AutoencoderTask
from dcae.train.losses import ReconstructionLoss
from dcae.train.task import Task
from dcae.train.trainer import Trainer

from .common import (COLORS, BenchRun, build_pair, closing_cells, compiled, end_to_end_arguments, end_to_end_meta,
                     end_to_end_process, figure, find_row, footprint, median_ms, results_folder, row_line, sync,
                     with_targets)
from .report import _fmt

SPEEDUP_TARGET = 1.2  # phase 1: ours' images/s over diffusers'
MEMORY_TARGET = 0.55  # phase 2: peak memory over training everything (paper: 67.81 / 153.98 GB = 0.44)
# What a case trains -> the phase whose set-up (freezing, AdamW) it uses; "+ckpt": with gradient checkpointing.
PHASE_OF = {"all": 1, "phase 2": 2, "phase 2 +ckpt": 2}
EAGER_GUESS_S = 25.0  # budget estimates for a case before one of its kind has been measured
FIRST_COMPILE_GUESS_S = 150.0  # compiling encoder and decoder, forward and backward
NEVER = 10**9  # steps, save_every, image_every of a case's trainer: it only takes the steps the benchmark times


@dataclass(frozen=True)
class Plan:
    """What one run measures, and how long it may take."""

    preset: str  # a dcae preset with diffusers' architecture
    device: str
    dtype: torch.dtype  # the trainer's autocast dtype on that device (bf16 on CUDA); float32: no autocast
    phase1: tuple[int, tuple[int, ...]]  # (image side in px, batches to try, largest first: the next after an OOM)
    phase2: tuple[int, tuple[int, ...]]  # the same for training everything; the frozen case runs at its batch
    compile: bool
    steps: int = 10  # timed steps per case, at most
    warmup: int = 2  # untimed steps first (>= 1: the first one also counts what autograd saves for backward)
    case_seconds: float = 8.0  # timed steps stop once they have taken about this long


GPU = Plan("dc-ae-f32c32-in-1.0", "cuda", torch.bfloat16, (256, (32, 16, 8)), (1024, (8, 4, 2)), compile=True)
SMOKE = Plan("tiny-f32c8", "cpu", torch.float32, (64, (4,)), (128, (2,)), compile=False, steps=2, warmup=1)


def autocast(plan: Plan):
    return (torch.autocast(plan.device, dtype=plan.dtype) if plan.dtype != torch.float32
            else contextlib.nullcontext())


class Reconstruct(nn.Module):
    """images -> reconstructions, the model the trainer trains in the cases other than "ours": diffusers'
    AutoencoderDC (whose forward returns ``.sample``), and, with ``compile_`` (the "-compile" providers), either
    autoencoder as its torch.compile'd encoder then decoder (their own forwards, as the eager models call them;
    static shapes)."""

    def __init__(self, autoencoder: nn.Module, compile_: bool):
        super().__init__()
        self.autoencoder = autoencoder
        # a tuple, not attributes: the compiled wrappers are not submodules (no second name for each parameter)
        self.compiled = (compiled(autoencoder.encoder), compiled(autoencoder.decoder)) if compile_ else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.autoencoder(x).sample
        encoder, decoder = self.compiled
        return decoder(encoder(x))


class BenchTask(AutoencoderTask):
    """The trainer's DC-AE task (freezing, train mode and loss of the phase) around a model the benchmark built,
    with LPIPS of random VGG weights (``lpips``; its cost does not depend on them) instead of a weights file, no
    held-out set, and the benchmark's images as the training items (the benchmark hands its batch to
    ``train_step`` itself)."""

    def __init__(self, options: AutoencoderOptions, model: nn.Module, images: torch.Tensor, lpips: bool):
        super().__init__(options)
        self.model, self.images, self.use_lpips = model, images, lpips

    def build_model(self, saved: dict | None) -> nn.Module:
        return self.model

    def setup(self, ctx) -> None:
        Task.setup(self, ctx)  # not AutoencoderTask's: no LPIPS file to load, no held-out set
        self.lpips = LPIPS().to(ctx.device) if self.use_lpips else None
        self.rec_loss = ReconstructionLoss(self.lpips, self.options.l1_weight, self.options.lpips_weight)

    def train_set(self) -> torch.Tensor:
        return self.images


def build_trainer(source: nn.Module, provider: str, trains: str, x: torch.Tensor, folder: Path, plan: Plan,
                  seed: int = 0, lpips: bool = True) -> Trainer:
    """A `Trainer` for one case, in the run folder ``folder`` (close it after the case): `BenchTask` in the phase
    whose set-up ``trains`` uses (`PHASE_OF`), around a fresh copy of ``source`` (ours as it is, otherwise in
    `Reconstruct`), at ``x``'s batch and size, on the plan's device, in training mode as `Trainer.run` puts it
    before its loop."""
    phase = PHASE_OF[trains]
    if phase != 1 and provider != "ours":
        raise ValueError(f"only our eager model has phase-{phase} freezing, not {provider}")
    autoencoder = copy.deepcopy(source)
    model = autoencoder if provider == "ours" else Reconstruct(autoencoder, compile_=provider.endswith("-compile"))
    options = AutoencoderOptions(phase=phase, out=folder, preset=plan.preset, steps=NEVER, batch_size=len(x),
                                 resolution=x.shape[-1], device=plan.device, progress=False, save_every=NEVER,
                                 image_every=NEVER, grad_checkpointing=trains.endswith("+ckpt"), seed=seed)
    trainer = Trainer(BenchTask(options, model, x, lpips))
    trainer.task.train_mode(trainer.model)
    return trainer


def autoencoder_of(model: nn.Module) -> nn.Module:
    """The autoencoder a case measures (inside its `Reconstruct`, if any): the graph probe names its modules."""
    return model.autoencoder if isinstance(model, Reconstruct) else model


@contextlib.contextmanager
def graph_probe(model: torch.nn.Module, exclude: set[int]):
    """Counts the bytes of the storages autograd saves for backward (each once; storages whose data pointer is in
    ``exclude``, such as the parameters, left out), those saved after ``model``'s forward (by the loss) apart, and
    names the first module whose output needs grad: where the graph starts. Yields a dict with "saved" (data
    pointer -> bytes), "loss" (the data pointers the loss saved first) and "first" (a qualified module name)."""
    probe = {"saved": {}, "loss": set(), "first": None, "in_loss": False}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude and storage.data_ptr() not in probe["saved"]:
            probe["saved"][storage.data_ptr()] = storage.nbytes()
            if probe["in_loss"]:
                probe["loss"].add(storage.data_ptr())
        return t

    def hook(name):
        def record(module, args, out):
            if probe["first"] is None and torch.is_tensor(out) and out.requires_grad:
                probe["first"] = name
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if name]
    handles.append(model.register_forward_hook(lambda *args: probe.update(in_loss=True)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield probe
    finally:
        for handle in handles:
            handle.remove()


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters and buffers + the trainable parameters' gradients + the optimizer's state."""
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    moments = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                  if torch.is_tensor(t))
    return footprint(model) + grads + moments


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> tuple[float | None, float | None]:
    """(allocated, reserved) GB at their peaks since `reset_peak`; (None, None) where not measured (CPU)."""
    if device != "cuda":
        return None, None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9


def images(side: int, batch: int, seed: int) -> torch.Tensor:
    """Seeded random images in [-1, 1], (batch, 3, side, side), on the CPU: the same batch for every provider."""
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(seed + side + batch)) * 2 - 1


class Run(BenchRun):
    """The rows of one run, its clock and budget, its models (each case trains a fresh copy), and its files."""

    def __init__(self, plan: Plan, out: Path, start: float, budget_s: float, meta: dict, sources: dict, seed: int):
        self.sources, self.seed = sources, seed
        super().__init__(plan, out, meta, start, budget_s, "train", sys.modules[__name__],
                         f"DC-AE {plan.preset} training step: ours vs diffusers, {meta['gpu']}, "
                         f"{meta['dtype']} ({meta['date']})")
        self.walls = {False: [], True: []}  # seconds per case that ran, eager / compiled

    def case(self, part: str, provider: str, trains: str, side: int, batch: int) -> dict:
        """Run one case on a fresh copy of the provider's model; add its row (an error or a skip goes into it)
        and return it."""
        row = dict(model=self.plan.preset, part=part, provider=provider, trains=trains, shape=f"{side}px",
                   batch=batch, images_per_s=None, ms=None, peak_gb=None, reserved_gb=None, state_gb=None,
                   saved_gb=None, loss_saved_gb=None, trainable_m=None, optimizer_m=None, frozen_grads=None,
                   graph_from=None, loss=None, compile_s=None, wall_s=None, error=None, gpu=self.meta["gpu"],
                   dtype=self.meta["dtype"], lpips=self.meta["lpips"], torch=self.meta["torch"],
                   triton=self.meta["triton"], diffusers=self.meta["diffusers"])
        compiles = provider.endswith("-compile")
        guess = FIRST_COMPILE_GUESS_S if compiles else EAGER_GUESS_S
        estimate = max(self.walls[compiles], default=guess)
        if time.perf_counter() + estimate > self.deadline:
            row["error"] = f"skipped: would end past the run's time budget (about {estimate:.0f} s needed)"
            self.add(row)
            return row
        start = time.perf_counter()
        try:
            self._measure(row, images(side, batch, self.seed))
        except Exception as e:  # noqa: BLE001 - an OOM or a failing provider is a result, not the end of the run
            row["error"] = f"{type(e).__name__}: {e}"[:400]
            row["peak_gb"], row["reserved_gb"] = peak_gb(self.plan.device)  # how far it got
        gc.collect()
        if compiles:
            torch._dynamo.reset()  # its caches hold the compiled model
        if self.plan.device == "cuda":
            torch.cuda.empty_cache()
        row["wall_s"] = time.perf_counter() - start
        if not row["error"]:
            self.walls[compiles].append(row["wall_s"])
        self.add(row)
        return row

    def _measure(self, row: dict, x: torch.Tensor) -> None:
        """A trainer for the case; its first step (compiling, or counting what autograd saves), the other warm-up
        steps, then the timed steps with the peak memory over them (the steady state: AdamW's state exists,
        autotuning is done)."""
        plan, provider = self.plan, row["provider"]
        reset_peak(plan.device)
        x = x.to(plan.device)
        with tempfile.TemporaryDirectory(prefix="csrc_bench-train-") as folder:
            trainer = build_trainer(self.sources[provider.split("-")[0]], provider, row["trains"], x, Path(folder),
                                    plan, self.seed, self.meta["lpips"])
            try:
                self._steps(row, trainer, x)
            finally:
                trainer.close()

    def _steps(self, row: dict, trainer: Trainer, x: torch.Tensor) -> None:
        plan, model, optimizer = self.plan, trainer.model, trainer.optimizer

        def step(x):
            return trainer.train_step([x])["rec"]

        start = time.perf_counter()
        if row["provider"].endswith("-compile"):
            row["loss"] = step(x)
            sync(plan.device)
            row["compile_s"] = time.perf_counter() - start
        else:
            exclude = {t.untyped_storage().data_ptr() for module in (model, trainer.task.rec_loss)
                       for t in [*module.parameters(), *module.buffers()]} | {x.untyped_storage().data_ptr()}
            with graph_probe(autoencoder_of(model), exclude) as probe:
                row["loss"] = step(x)
            row.update(saved_gb=sum(probe["saved"].values()) / 1e9, graph_from=probe["first"],
                       loss_saved_gb=sum(probe["saved"][ptr] for ptr in probe["loss"]) / 1e9)
        trainable = [p for p in model.parameters() if p.requires_grad]
        row.update(state_gb=state_bytes(model, optimizer) / 1e9, trainable_m=sum(p.numel() for p in trainable) / 1e6,
                   optimizer_m=sum(p.numel() for g in optimizer.param_groups for p in g["params"]) / 1e6,
                   frozen_grads=sum(p.grad is not None for p in model.parameters() if not p.requires_grad))
        for _ in range(plan.warmup - 1):
            step(x)
        reset_peak(plan.device)
        ms, _ = median_ms(step, x, plan.device, plan.steps, 0, plan.case_seconds)
        row.update(ms=ms, images_per_s=row["batch"] * 1e3 / ms)
        row["peak_gb"], row["reserved_gb"] = peak_gb(plan.device)


def progress_line(row: dict, elapsed: float) -> str:
    case = (f"[{elapsed:6.1f} s] {row['part']} {row['provider']:<17} trains {row['trains']:<7} {row['shape']:>6} "
            f"B{row['batch']:<2}")
    saved = None if row["saved_gb"] is None else (f"saved {row['saved_gb']:.3f} GB (loss {row['loss_saved_gb']:.3f})"
                                                   f"  graph from {row['graph_from']}")
    return row_line(case, row, None if row["error"] else f"state {row['state_gb']:.3f} GB", saved)


def find(rows: list[dict], part: str, provider: str, trains: str, batch: int) -> dict | None:
    """The row of that case that ran without error, or None."""
    return find_row(rows, part=part, provider=provider, trains=trains, batch=batch)


def estimate_gb(row: dict, loss: bool = True) -> float | None:
    """What a CPU run offers instead of the peak: state + saved for backward (``loss``: the loss's share too)."""
    if row["saved_gb"] is None:
        return None
    return row["state_gb"] + row["saved_gb"] - (0 if loss else row["loss_saved_gb"])


def targets(rows: list[dict], plan: Plan) -> list[tuple[bool | None, str]]:
    """The issue's targets, each (met: True / False / None when it cannot be judged here, what was compared)."""
    checks = []
    side, batches = plan.phase1
    for ours, base in (("ours", "diffusers"), ("ours-compile", "diffusers-compile")):
        pair = next(((b, find(rows, "phase 1", ours, "all", b), find(rows, "phase 1", base, "all", b))
                     for b in batches if find(rows, "phase 1", ours, "all", b)
                     and find(rows, "phase 1", base, "all", b)), None)
        if pair is None:
            if ours == "ours" or any(r["provider"] == ours for r in rows):
                checks.append((False if ours == "ours" else None,
                               f"phase 1 {side}px: {ours} vs {base} images/s: not both measured at one batch"))
            continue
        batch, o, d = pair
        note = "" if batch == batches[0] else f" (B{batches[0]} did not fit, see the errors)"
        ratio = o["images_per_s"] / d["images_per_s"]
        peaks = (f"; peak {_fmt(o['peak_gb'], 2)} vs {_fmt(d['peak_gb'], 2)} GB" if o["peak_gb"] is not None
                 else "")
        checks.append((ratio >= SPEEDUP_TARGET,
                       f"phase 1 {side}px B{batch}{note}: {ours} {o['images_per_s']:.2f} img/s >= {SPEEDUP_TARGET} x "
                       f"{base} {d['images_per_s']:.2f} img/s (x{ratio:.2f}){peaks}"))
    side, batches = plan.phase2
    for trains in ("phase 2", "phase 2 +ckpt"):
        pair = next(((b, find(rows, "phase 2", "ours", trains, b), find(rows, "phase 2", "ours", "all", b))
                     for b in batches if find(rows, "phase 2", "ours", trains, b)
                     and find(rows, "phase 2", "ours", "all", b)), None)
        what = (f"phase 2 {side}px{' with gradient checkpointing' if trains.endswith('+ckpt') else ''}: peak "
                f"memory training the middle layers <= {MEMORY_TARGET} x training everything")
        if pair is None:
            checks.append((False if trains == "phase 2" else None, f"{what}: not both measured at one batch"))
        elif pair[1]["peak_gb"] is not None and pair[2]["peak_gb"] is not None:
            batch, frozen, full = pair
            ratio = frozen["peak_gb"] / full["peak_gb"]
            checks.append((ratio <= MEMORY_TARGET, f"{what}, B{batch}: {frozen['peak_gb']:.2f} / "
                                                   f"{full['peak_gb']:.2f} GB = {ratio:.3f}"))
        else:
            batch, frozen, full = pair
            ratio = estimate_gb(frozen) / estimate_gb(full)
            bare = estimate_gb(frozen, loss=False) / estimate_gb(full, loss=False)
            checks.append((None, f"{what}, B{batch}: peak not measured on {frozen['gpu']}; estimate (state + saved "
                                 f"for backward) {estimate_gb(frozen):.3f} / {estimate_gb(full):.3f} GB = {ratio:.3f} "
                                 f"({bare:.3f} without what the loss saves)"))
    return checks


def markdown(rows: list[dict], meta: dict, plan: Plan) -> str:
    autocast_text = ("in fp32 (no autocast, as the trainer on CPU)" if meta["dtype"] == "float32"
                     else f"under {meta['dtype']} autocast")
    memory = f" ({meta['gpu_memory_gb']:.0f} GB)" if meta.get("gpu_memory_gb") else ""
    lines = [f"# DC-AE {meta['preset']} training step: ours vs diffusers AutoencoderDC on {meta['gpu']}{memory} "
             f"({meta['date']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, diffusers {meta['diffusers']}, dcae_kernels backend "
             f"{meta['backend']}; {meta['params'] / 1e6:.1f} M parameters. One step = the trainer's own "
             "`Trainer.train_step` with one micro-batch (a `Trainer` per case around the DC-AE task and the case's "
             f"model): forward {autocast_text} in train() mode, {meta['loss']}, backward, AdamW step, zero_grad, "
             "schedule step; fp32 master weights; phase 1's AdamW settings (lr 6.4e-5, wd 0.1) where everything "
             "trains, phase 2's (`AutoencoderTask.freeze` + `train_mode`: `freeze_for_phase(model, 2)` + "
             "`set_train_mode`, AdamW over the trainable parameters only) for `trains: phase 2`. Same seeded random "
             "weights (diffusers `save_pretrained` -> `DCAE.from_pretrained`), a fresh copy per case with only that "
             "model (and LPIPS) on the device; the same random images for every case of a shape and batch. "
             f"ms = median per step (CUDA events around each step; the wall clock on CPU) over at most {plan.steps} "
             f"steps after {plan.warmup} warm-up step(s) (a compiled provider's first step, which compiles, is given "
             "as compile s); images/s = batch / ms. peak GB = `torch.cuda.max_memory_allocated` over the timed "
             "steps (everything the process holds: weights, gradients, AdamW state, activations, LPIPS, the "
             "batch), reserved GB its allocator's reserve; not measured on CPU. state GB = weights + trainable "
             "gradients + AdamW state; saved GB = storages autograd keeps for backward in the first step "
             "(parameters and the input excluded; eager only), loss saved GB = the part of it the loss (LPIPS) "
             "saves; graph from = the first module whose output needs grad (in phase 2 the frozen front builds no "
             "graph); trainable M = trainable parameters, all in the optimizer; frozen grads = frozen parameters "
             "holding a gradient after a step (0 expected). loss = the first step's (same weights and images: ours' "
             "and diffusers' agree; with phase 2's freezing the frozen BatchNorms use their running statistics). "
             "x diffusers = this row's images/s over diffusers eager's for the same batch; peak / all = this row's "
             "peak GB over training everything's for the same batch (phase 2). A case that ran out of memory gives "
             "the peak it reached and is retried at the next smaller batch.", "",
             "| part | shape | batch | provider | trains | images/s | ms | peak GB | reserved GB | state GB | saved GB "
             "| loss saved GB | trainable M | frozen grads | graph from | loss | x diffusers | peak / all | compile s "
             "| error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = find(rows, r["part"], "diffusers", "all", r["batch"])
        full = find(rows, r["part"], "ours", "all", r["batch"])
        speedup = r["images_per_s"] / base["images_per_s"] if base and r["images_per_s"] else None
        peak_ratio = (r["peak_gb"] / full["peak_gb"] if r["trains"] != "all" and full and full["peak_gb"]
                      and r["peak_gb"] is not None and not r["error"] else None)
        lines.append(f"| {r['part']} | {r['shape']} | {r['batch']} | {r['provider']} | {r['trains']} | "
                     f"{_fmt(r['images_per_s'], 2)} | {_fmt(r['ms'], 1)} | {_fmt(r['peak_gb'], 2)} | "
                     f"{_fmt(r['reserved_gb'], 2)} | {_fmt(r['state_gb'], 3)} | {_fmt(r['saved_gb'], 3)} | "
                     f"{_fmt(r['loss_saved_gb'], 3)} | "
                     f"{_fmt(r['trainable_m'], 2)} | {r['frozen_grads'] if r['frozen_grads'] is not None else ''} | "
                     f"{r['graph_from'] or ''} | {_fmt(r['loss'], 5)} | {_fmt(speedup, 2)} | {_fmt(peak_ratio, 3)} | "
                     + closing_cells(r))
    return with_targets(lines, targets(rows, plan))


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Phase 1: images/s per provider and batch; both parts: peak GB per case (the estimate where no peak was
    measured), with phase 2's target line."""
    ran = [r for r in rows if not r["error"]]
    measured = any(r["peak_gb"] is not None for r in ran)
    label = lambda r: f"{r['part']}\n{r['shape']} B{r['batch']}\n{r['provider']}\ntrains {r['trains']}"  # noqa: E731
    color = lambda r: COLORS[r["provider"]] if r["trains"] == "all" else "tab:purple"  # noqa: E731
    with figure(path, title, 2) as grid:
        axes = grid[:, 0]
        speed = [r for r in ran if r["part"] == "phase 1"]
        axes[0].bar(range(len(speed)), [r["images_per_s"] for r in speed], color=[color(r) for r in speed],
                    edgecolor="k", lw=0.3)
        axes[0].set_xticks(range(len(speed)), [label(r) for r in speed], fontsize=7)
        axes[0].set_ylabel("images/s")
        axes[0].set_title("phase 1 training step throughput (higher is better)", fontsize=10)
        value = (lambda r: r["peak_gb"] or 0) if measured else (lambda r: estimate_gb(r) or 0)  # noqa: E731
        axes[1].bar(range(len(ran)), [value(r) for r in ran], color=[color(r) for r in ran], edgecolor="k", lw=0.3)
        axes[1].set_xticks(range(len(ran)), [label(r) for r in ran], fontsize=7)
        axes[1].set_ylabel("peak GB" if measured else "state + saved GB (estimate)")
        for r in ran:
            if r["part"] == "phase 2" and r["trains"] == "all":  # over the phase-2 bars of that batch
                bars = [i for i, q in enumerate(ran) if (q["part"], q["batch"]) == ("phase 2", r["batch"])]
                axes[1].hlines(MEMORY_TARGET * value(r), min(bars) - 0.4, max(bars) + 0.4, color="k", ls="--", lw=1,
                               label=f"phase 2 target: {MEMORY_TARGET} x training everything (B{r['batch']})")
                axes[1].legend(fontsize=7, loc="upper left")
        axes[1].set_title("memory per training step (lower is better)", fontsize=10)


def oom(row: dict) -> bool:
    """Whether the case ran out of device memory (torch's allocator, or cuDNN / cuBLAS failing to allocate)."""
    error = row["error"] or ""
    return error.startswith("OutOfMemoryError") or "out of memory" in error.lower() or "ALLOC_FAILED" in error


def failed(row: dict) -> bool:
    """An error that is not a result: out-of-memory picks the batch and a skip keeps to the budget."""
    return bool(row["error"]) and not oom(row) and not row["error"].startswith("skipped:")


def run_cases(run: Run, compile_: bool) -> None:
    """Phase 1 eager (ours and diffusers at the largest batch both fit), phase 2 (training everything at the
    largest batch that fits, then frozen at it), then the compiled providers (whose compiling steps are the slow
    part, so a tight budget drops them first)."""
    side, batches = run.plan.phase1
    batch1 = None
    for batch in batches:
        done = [run.case("phase 1", provider, "all", side, batch) for provider in ("diffusers", "ours")]
        if not any(oom(row) for row in done):
            batch1 = batch
            break
    side, batches = run.plan.phase2
    for batch in batches:
        if not oom(run.case("phase 2", "ours", "all", side, batch)):
            run.case("phase 2", "ours", "phase 2", side, batch)
            run.case("phase 2", "ours", "phase 2 +ckpt", side, batch)
            break
    if compile_ and batch1 is not None:
        for provider in ("diffusers-compile", "ours-compile"):
            run.case("phase 1", provider, "all", run.plan.phase1[0], batch1)


def main(argv: list[str]) -> int:
    parser = end_to_end_arguments("train", "DC-AE training step: ours vs diffusers' AutoencoderDC (train.py)", 200.0)
    parser.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=True,
                        help="LPIPS (random VGG16 weights) in the loss, as in the trainer's phase 1 and 2 (default on)")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else GPU
    meta = end_to_end_meta("train", args, plan)
    if meta is None:
        return 1
    out = results_folder("train", args)

    loss = "L1 + LPIPS (VGG16, random weights)" if args.lpips else "L1 (no LPIPS: --no-lpips)"
    meta.update(lpips=args.lpips, loss=loss)
    if not args.smoke:
        meta["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 1e9
    run = None
    with end_to_end_process(args.smoke):
        try:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as folder:
                ours, theirs = build_pair(plan.preset, Path(folder), args.seed)
            meta.update(params=sum(p.numel() for p in theirs.parameters()), weights_gb=footprint(ours) / 1e9)
            run = Run(plan, out, start, args.budget, meta, {"ours": ours.float(), "diffusers": theirs.float()},
                      args.seed)
            print(f"{meta['gpu']}: {plan.preset}, {meta['params'] / 1e6:.1f} M parameters, built, saved and loaded "
                  f"in {time.perf_counter() - start:.1f} s; {loss}; torch {meta['torch']}, triton {meta['triton']}, "
                  f"diffusers {meta['diffusers']}, backend {meta['backend']}", flush=True)
            run_cases(run, meta["compile"])
        finally:
            if run is not None:
                run.finish()
    return 1 if any(failed(r) for r in run.rows) else 0
