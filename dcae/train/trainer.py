"""The training core: one loop for every task (see `task.Task`).

It owns the optimizer (AdamW over the parameters the task trains) and learning-rate schedule, the EMA, DDP under
torchrun, atomic checksummed checkpoints with exact resume (model, optimizer, schedule, EMA, step, RNG, the
task's own state, the run's records), the Ctrl-C stop flag, the run folder's lock, tqdm, ``metrics.jsonl``,
``loss.png``, sample grids and ``eval.json``.

Run folder: ``run.json``, ``checkpoints/``, ``metrics.jsonl``, ``loss.png``, ``samples/step-*.png``,
``eval.json`` ("before" training and ``task.eval_key`` after), ``model/`` (the task's export).
"""
import contextlib
import json
import signal
import time
import weakref

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import save_image
from . import distributed
from .checkpoint import (CheckpointError, capture_rng_state, find_latest, load_checkpoint, optimizer_state_from_flat,
                         optimizer_state_to_flat, restore_rng_state, save_checkpoint)
from .ema import EMA
from .plots import plot_losses
from .runfolder import RunFolder
from .sampling import EndlessDistributedSampler, SeededSamples
from .schedule import build_scheduler
from .task import Context, Task

INTERRUPTED = 130
CORE_GROUPS = ("model", "optimizer", "ema")


class Trainer:
    """Trains ``task`` with its options (a `TrainOptions`). ``run()`` returns 0 when done, `INTERRUPTED` after
    Ctrl-C (a checkpoint is saved first). The run folder is locked from construction until ``run()`` returns
    (or ``close()``)."""

    def __init__(self, task: Task):
        self.task, self.opts = task, task.options
        self.world, self.device = distributed.init(self.opts.device)
        self.out = self.opts.out
        self.ckpt_dir = self.out / "checkpoints"
        self.folder = RunFolder(self.out)
        self._take_folder()
        self._finalizer = weakref.finalize(self, self.folder.release)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _take_folder(self) -> None:
        error = None
        if self.world.main:
            try:
                self.folder.acquire()
            except ValueError as e:
                error = e
        if distributed.any_rank(error is not None, self.world, self.device):
            raise error or ValueError(f"{self.out}: rank 0 could not take the run folder")

    def _build(self) -> None:
        opts, task = self.opts, self.task
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())
        self.interrupted = False
        checkpoint = self._checkpoint_to_resume()
        torch.manual_seed(opts.seed)
        model = task.build_model(checkpoint.state["task"] if checkpoint is not None else None)
        task.setup(Context(self.world, self.device, self.autocast, self.out, self.log))
        self.model = model.to(self.device)
        if self.world.distributed and self.device.type == "cuda":
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.trainable = task.freeze(self.model)
        if opts.grad_checkpointing:
            self.model.enable_gradient_checkpointing(True)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=opts.lr,
                                           betas=opts.betas, weight_decay=opts.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, opts.schedule, opts.warmup_steps, opts.steps)
        self.ema = EMA(self.model, opts.ema_decay) if opts.ema_decay else None
        self.step = 0
        if checkpoint is not None:
            self._restore(checkpoint)
        self.net = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.index
                                            is not None else None) if self.world.distributed else self.model)
        self._build_data()

    def _checkpoint_to_resume(self):
        latest = find_latest(self.ckpt_dir) if self.ckpt_dir.exists() else None
        if self.opts.resume:
            if latest is None:
                raise ValueError(f"--resume: no checkpoint in {self.ckpt_dir}")
            return load_checkpoint(latest)
        if latest is not None:
            raise ValueError(f"{self.out} already holds checkpoints: pass --resume to continue, or a new --out")
        return None

    def _build_data(self) -> None:
        opts, world = self.opts, self.world
        per_step = world.size * opts.grad_accum
        if opts.batch_size % per_step:
            raise ValueError(f"--batch-size {opts.batch_size} must be divisible by processes x --grad-accum "
                             f"= {per_step}")
        self.micro_batch = opts.batch_size // per_step
        train_set = SeededSamples(self.task.train_set(), opts.seed)
        sampler = EndlessDistributedSampler(train_set, world.size, world.rank, opts.seed,
                                            start=self.step * opts.grad_accum * self.micro_batch)
        # its own generator: creating an iterator does not draw from torch's global RNG, whose state a resumed
        # run restores from the checkpoint
        self.loader = DataLoader(train_set, batch_size=self.micro_batch, sampler=sampler, drop_last=True,
                                 num_workers=opts.workers, pin_memory=self.device.type == "cuda",
                                 generator=torch.Generator().manual_seed(opts.seed))

    def _restore(self, ckpt) -> None:
        try:
            self._load(ckpt)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            detail = f"missing entry {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:300]
            raise CheckpointError(f"{ckpt.path}: unusable checkpoint ({detail})") from e

    def _load(self, ckpt) -> None:
        state, t = ckpt.state, ckpt.tensors
        self.model.load_state_dict(t["model"])
        self.optimizer.load_state_dict(optimizer_state_from_flat(t["optimizer"], state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if "ema" not in t:
                raise ValueError(f"{ckpt.path} holds no EMA: resume without --ema-decay, or start a new run")
            self.ema.load_state_dict({"num_updates": state["ema_updates"], "weights": t["ema"]})
        self.task.load_state({k: v for k, v in t.items() if k not in CORE_GROUPS}, state["task"])
        self.step = state["step"]
        restore_rng_state(state["rng"])

    # ---- records ----
    def log(self, *lines) -> None:
        if self.world.main:
            for line in lines:
                tqdm.write(line)

    def _write_run_record(self) -> None:
        frozen = sum(p.numel() for p in self.model.parameters() if not p.requires_grad)
        fields, lines = self.task.describe(self.model)
        record = {"options": self.opts.to_json(), "trainable_modules": self.trainable,
                  "trainable_parameters": sum(self.trainable.values()), "frozen_parameters": frozen,
                  "processes": self.world.size, "device": str(self.device), **fields}
        if self.world.main:
            self.folder.write_run(record)
        self.log(f"{self.task.title}: training {record['trainable_parameters']:,} parameters, {frozen:,} frozen",
                 *(f"  trains {name}: {n:,}" for name, n in self.trainable.items()), *lines)

    def save(self):
        """Write a checkpoint of this step (rank 0); returns its path (None on other ranks)."""
        if not self.world.main:
            return None
        task_tensors, task_state = self.task.state()
        if clash := set(task_tensors) & set(CORE_GROUPS):
            raise ValueError(f"task tensor groups {sorted(clash)} clash with the core's {CORE_GROUPS}")
        opt_tensors, opt_meta = optimizer_state_to_flat(self.optimizer.state_dict())
        tensors = {"model": self.model.state_dict(), "optimizer": opt_tensors, **task_tensors}
        state = {"step": self.step, "options": self.opts.to_json(), "optimizer": opt_meta,
                 "scheduler": self.scheduler.state_dict(), "rng": capture_rng_state(), "task": task_state}
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()["weights"]
            state["ema_updates"] = self.ema.num_updates
        return save_checkpoint(self.ckpt_dir, self.step, tensors, state, keep_last=self.opts.keep_checkpoints)

    @contextlib.contextmanager
    def eval_weights(self):
        """The model in eval mode with the weights that are exported (EMA when kept), without grad; its own
        weights and training mode come back afterwards."""
        self.model.eval()
        try:
            with self.ema.swapped(self.model) if self.ema is not None else contextlib.nullcontext(), \
                    torch.no_grad():
                yield self.model
        finally:
            self.task.train_mode(self.model)

    def evaluate(self) -> dict[str, float] | None:
        with self.eval_weights() as model:
            return self.task.evaluate(model)

    def write_samples(self) -> None:
        with self.eval_weights() as model:
            grid = self.task.samples(model, self.step)
        if grid is not None:
            save_image(grid, self.out / "samples" / f"step-{self.step:08d}.png")

    # ---- training ----
    def train_step(self, batches: list) -> dict[str, float]:
        """One optimizer step over the micro-batches (gradients summed, DDP synchronising on the last one), then
        the schedule, the EMA and the task's ``after_step``. Returns the parts to log, averaged over processes."""
        parts: dict[str, float] = {}
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1 or not self.world.distributed
            with self.net.no_sync() if not sync else contextlib.nullcontext(), self.autocast:
                loss, step_parts = self.task.loss(self.net, batch, self.step)
            (loss / len(batches)).backward()
            for k, v in step_parts.items():
                parts[k] = parts.get(k, 0.0) + v / len(batches)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        parts |= self.task.after_step(self.step)
        self.step += 1
        return {k: distributed.mean(v, self.world, self.device) for k, v in parts.items()}

    def _on_sigint(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        self.log("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

    def run(self) -> int:
        try:
            return self._run()
        finally:
            self.close()

    def close(self) -> None:
        """Release the run folder (run() does it on return)."""
        self._finalizer()

    def _run(self) -> int:
        opts = self.opts
        self._write_run_record()
        evals = self.folder.read_evals() if self.step > 0 else {}
        if self.world.main:
            self.folder.cut_metrics(self.step)
            if self.step == 0 and (before := self.evaluate()) is not None:
                evals["before"] = before
                self.folder.write_evals(evals)
                self.log("before training: " + self.task.format_metrics(before))
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        self.task.train_mode(self.model)
        batches = iter(self.loader)
        bar = tqdm(total=opts.steps, initial=self.step, disable=not (self.world.main and opts.progress),
                   desc=self.task.title, unit="step", dynamic_ncols=True)
        log = self.folder.metrics_path().open("a") if self.world.main else None
        try:
            while self.step < opts.steps:
                start = time.perf_counter()
                parts = self.train_step([next(batches) for _ in range(opts.grad_accum)])
                per_s = opts.batch_size / (time.perf_counter() - start)
                bar.update(1)
                bar.set_postfix(loss=f"{parts[self.task.progress_key]:.4f}", items_s=f"{per_s:.1f}")
                if log and (self.step % opts.log_every == 0 or self.step == opts.steps):
                    log.write(json.dumps({"step": self.step, **parts, "lr": self.scheduler.get_last_lr()[0],
                                          "images_per_s": per_s}) + "\n")
                    log.flush()
                if self.world.main and self.step % opts.image_every == 0:
                    self.write_samples()
                if distributed.any_rank(self.interrupted, self.world, self.device):
                    path = self.save()
                    self.log(f"interrupted at step {self.step}: saved {path}; continue with --resume")
                    return INTERRUPTED
                if self.step % opts.save_every == 0 and self.step < opts.steps:
                    self.save()
        finally:
            signal.signal(signal.SIGINT, previous)
            bar.close()
            if log:
                log.close()
        self.save()
        if self.world.main:
            self._finish(evals)
        distributed.barrier(self.world)
        return 0

    def _finish(self, evals: dict) -> None:
        """Final samples, loss curves, held-out metrics and the exported model."""
        self.write_samples()
        plot_losses(self.folder.metrics_path(), self.out / "loss.png", title=self.task.title)
        if (after := self.evaluate()) is not None:
            evals[self.task.eval_key] = after
            self.folder.write_evals(evals)
            self.log(f"after {self.task.title}: " + self.task.format_metrics(after))
        with self.eval_weights() as model:
            self.task.export(model, self.out / "model")
        self.log(f"saved the model to {self.out / 'model'}")
