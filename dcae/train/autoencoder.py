"""The DC-AE trainer: one phase of Decoupled High-Resolution Adaptation per run (see `phases.py`).

Run folder: ``run.json`` (options, trainable modules, LPIPS status), ``checkpoints/`` (atomic, resumable),
``metrics.jsonl``, ``samples/step-*.png`` (held-out reconstructions), ``loss.png``, ``eval.json`` (held-out
PSNR/SSIM before and after), ``model/`` (the final weights, for `DCAE.from_pretrained` and ``--init``).
"""
import contextlib
import dataclasses
import json
import signal
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import batches, image_grid, make_dataset, save_image
from ..lpips import load_lpips
from ..metrics import ReconstructionMetrics
from ..models import DCAE, DCAEConfig
from ..scaling import estimate_scaling_factor
from . import distributed
from .checkpoint import (capture_rng_state, find_latest, load_checkpoint, optimizer_state_from_flat,
                         optimizer_state_to_flat, restore_rng_state, save_checkpoint)
from .discriminator import NLayerDiscriminator
from .ema import EMA
from .losses import GANLoss, ReconstructionLoss
from .options import TrainOptions
from .phases import PHASES, freeze_for_phase, last_layer_weight, set_train_mode
from .plots import plot_losses
from .sampling import EndlessDistributedSampler, SeededSamples
from .schedule import build_scheduler

INTERRUPTED = 130
SAMPLE_IMAGES = 4


def load_init(path: Path) -> DCAE:
    """Weights to start a phase from: an earlier run's folder (its ``model/``), or any `from_pretrained` path."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        path = path / "model"
    return DCAE.from_pretrained(path)


class Trainer:
    """Trains one phase. ``run()`` returns 0 when the phase is done, `INTERRUPTED` after Ctrl-C."""

    def __init__(self, opts: TrainOptions):
        self.opts, self.phase = opts, PHASES[opts.phase]
        self.world, self.device = distributed.init(opts.device)
        self.out, self.ckpt_dir = Path(opts.out), Path(opts.out) / "checkpoints"
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())
        self.interrupted = False
        checkpoint = self._checkpoint_to_resume()
        torch.manual_seed(opts.seed)
        self.model = self._build_model(checkpoint).to(self.device)
        ratio = self.model.spatial_compression_ratio
        if opts.resolution % ratio:
            raise ValueError(f"--resolution {opts.resolution} is not a multiple of the compression ratio {ratio}")
        if self.world.distributed and self.device.type == "cuda":
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.trainable = freeze_for_phase(self.model, opts.phase)
        self.model.enable_gradient_checkpointing(opts.grad_checkpointing)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=opts.lr,
                                           betas=opts.betas, weight_decay=opts.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, opts.schedule, opts.warmup_steps, opts.steps)
        self.ema = EMA(self.model, opts.ema_decay) if opts.ema_decay else None
        lpips, self.lpips_status = load_lpips(opts.lpips_weights)
        self.lpips = None if lpips is None else lpips.to(self.device)
        self.rec_loss = ReconstructionLoss(self.lpips, opts.l1_weight, opts.lpips_weight)
        self.gan = self.disc_optimizer = None
        if self.phase.gan:
            disc = NLayerDiscriminator().to(self.device)
            self.gan = GANLoss(disc, opts.disc_start, opts.disc_weight)
            self.disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=opts.disc_lr, betas=opts.betas,
                                                    weight_decay=opts.weight_decay)
        self.step = 0
        if checkpoint is not None:
            self._restore(checkpoint)
        self.net = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.index
                                            is not None else None) if self.world.distributed else self.model)
        self._build_data()

    # ---- set-up ----
    def _checkpoint_to_resume(self):
        latest = find_latest(self.ckpt_dir) if self.ckpt_dir.exists() else None
        if self.opts.resume:
            if latest is None:
                raise ValueError(f"--resume: no checkpoint in {self.ckpt_dir}")
            return load_checkpoint(latest)
        if latest is not None:
            raise ValueError(f"{self.out} already holds checkpoints: pass --resume to continue, or a new --out")
        return None

    def _build_model(self, checkpoint) -> DCAE:
        opts = self.opts
        if checkpoint is not None:
            return DCAE(DCAEConfig.from_dict(checkpoint.state["model_config"]))
        if opts.init is not None:
            model = load_init(opts.init).float().train()
            if opts.preset or opts.config:
                wanted = self._named_config()
                if dataclasses.replace(wanted, scaling_factor=1.0) != dataclasses.replace(model.config,
                                                                                          scaling_factor=1.0):
                    raise ValueError(f"--init {opts.init} holds a different architecture than the one asked for")
            return model
        return DCAE(self._named_config())

    def _named_config(self) -> DCAEConfig:
        from ..models import get_config
        if self.opts.config is not None:
            return DCAEConfig.from_dict(json.loads(Path(self.opts.config).read_text()))
        return get_config(self.opts.preset)

    def _build_data(self):
        opts, world = self.opts, self.world
        per_step = world.size * opts.grad_accum
        if opts.batch_size % per_step:
            raise ValueError(f"--batch-size {opts.batch_size} must be divisible by processes x --grad-accum "
                             f"= {per_step}")
        self.micro_batch = opts.batch_size // per_step
        train_set = SeededSamples(make_dataset(opts.data, opts.resolution, "train", opts.val_data,
                                               opts.samples_per_epoch), opts.seed)
        sampler = EndlessDistributedSampler(train_set, world.size, world.rank, opts.seed,
                                            start=self.step * opts.grad_accum * self.micro_batch)
        self.loader = DataLoader(train_set, batch_size=self.micro_batch, sampler=sampler, drop_last=True,
                                 num_workers=opts.workers, pin_memory=self.device.type == "cuda")
        self.heldout = make_dataset(opts.data, opts.resolution, "heldout", opts.val_data)
        self.train_set = train_set

    def _restore(self, ckpt) -> None:
        state, t = ckpt.state, ckpt.tensors
        if state["phase"] != self.opts.phase:
            raise ValueError(f"the checkpoint in {self.ckpt_dir} is from phase {state['phase']}, not "
                             f"{self.opts.phase}")
        self.model.load_state_dict(t["model"])
        self.optimizer.load_state_dict(optimizer_state_from_flat(t["optimizer"], state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict({"num_updates": state["ema_updates"], "weights": t["ema"]})
        if self.gan is not None:
            self.gan.discriminator.load_state_dict(t["discriminator"])
            self.disc_optimizer.load_state_dict(optimizer_state_from_flat(t["disc_optimizer"],
                                                                          state["disc_optimizer"]))
        self.step = state["step"]
        restore_rng_state(state["rng"])

    # ---- records ----
    def _log(self, *lines) -> None:
        if self.world.main:
            for line in lines:
                tqdm.write(line)

    def _write_run_record(self) -> None:
        frozen = sum(p.numel() for p in self.model.parameters() if not p.requires_grad)
        record = {"options": self.opts.to_json(), "phase": dataclasses.asdict(self.phase),
                  "trainable_modules": self.trainable, "trainable_parameters": sum(self.trainable.values()),
                  "frozen_parameters": frozen, "lpips": self.lpips_status, "lpips_enabled": self.lpips is not None,
                  "processes": self.world.size, "device": str(self.device), "model_config": self.model.config.to_dict()}
        if self.world.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "run.json").write_text(json.dumps(record, indent=1))
        self._log(f"phase {self.phase.number}: training {record['trainable_parameters']:,} parameters, "
                  f"{frozen:,} frozen", *(f"  trains {name}: {n:,}" for name, n in self.trainable.items()),
                  self.lpips_status)

    def save(self) -> Path | None:
        if not self.world.main:
            return None
        opt_tensors, opt_meta = optimizer_state_to_flat(self.optimizer.state_dict())
        tensors = {"model": self.model.state_dict(), "optimizer": opt_tensors}
        state = {"phase": self.opts.phase, "step": self.step, "model_config": self.model.config.to_dict(),
                 "options": self.opts.to_json(), "optimizer": opt_meta, "scheduler": self.scheduler.state_dict(),
                 "rng": capture_rng_state()}
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()["weights"]
            state["ema_updates"] = self.ema.num_updates
        if self.gan is not None:
            tensors["discriminator"] = self.gan.discriminator.state_dict()
            tensors["disc_optimizer"], state["disc_optimizer"] = optimizer_state_to_flat(
                self.disc_optimizer.state_dict())
        return save_checkpoint(self.ckpt_dir, self.step, tensors, state, keep_last=self.opts.keep_checkpoints)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out PSNR / SSIM (EMA weights when kept)."""
        metrics = ReconstructionMetrics()
        with self._eval_weights():
            for x in batches(self.heldout, self.micro_batch):
                with self.autocast:
                    recon = self.model(x.to(self.device))
                metrics.update(x, recon.float().clamp(-1, 1).cpu())
        return metrics.compute()

    @contextlib.contextmanager
    def _eval_weights(self):
        self.model.eval()
        try:
            with self.ema.swapped(self.model) if self.ema is not None else contextlib.nullcontext():
                yield
        finally:
            set_train_mode(self.model, self.opts.phase)

    @torch.no_grad()
    def write_samples(self) -> None:
        x = next(batches(self.heldout, SAMPLE_IMAGES, SAMPLE_IMAGES))
        with self._eval_weights(), self.autocast:
            recon = self.model(x.to(self.device)).float().clamp(-1, 1).cpu()
        save_image(image_grid([x, recon]), self.out / "samples" / f"step-{self.step:08d}.png")

    # ---- training ----
    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches (and, in phase 3, one discriminator step)."""
        parts = {}
        gan_on = self.gan is not None and self.gan.active(self.step)
        if self.gan is not None:
            self.gan.discriminator.requires_grad_(False)
        pairs = []
        for i, x in enumerate(batches):
            x = x.to(self.device, non_blocking=True)
            sync = i == len(batches) - 1 or not self.world.distributed
            with self.net.no_sync() if not sync else contextlib.nullcontext(), self.autocast:
                x_rec = self.net(x).float()
                loss, step_parts = self.rec_loss(x_rec, x)
                if self.gan is not None:
                    loss, gan_parts = self.gan.generator_loss(loss, x_rec, last_layer_weight(self.model), self.step)
                    step_parts |= gan_parts
            (loss / len(batches)).backward()
            pairs.append((x, x_rec.detach()))
            for k, v in step_parts.items():
                parts[k] = parts.get(k, 0.0) + v / len(batches)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if gan_on:
            disc = self.gan.discriminator
            disc.requires_grad_(True)
            for x, x_rec in pairs:
                with self.autocast:
                    d_loss, d_parts = self.gan.discriminator_loss(x, x_rec)
                (d_loss / len(pairs)).backward()
                for k, v in d_parts.items():
                    parts[k] = parts.get(k, 0.0) + v / len(pairs)
            distributed.average_gradients(disc, self.world)
            self.disc_optimizer.step()
            self.disc_optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {k: distributed.mean(v, self.world, self.device) for k, v in parts.items()}

    def _on_sigint(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        self._log("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

    def run(self) -> int:
        opts = self.opts
        self._write_run_record()
        eval_path = self.out / "eval.json"
        evals = json.loads(eval_path.read_text()) if eval_path.exists() else {}
        if self.step == 0 and self.world.main:
            evals["before"] = self.evaluate()
            self._log(f"held-out before training: PSNR {evals['before']['psnr']:.2f} dB, "
                      f"SSIM {evals['before']['ssim']:.4f}")
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        set_train_mode(self.model, opts.phase)
        batches = iter(self.loader)
        bar = tqdm(total=opts.steps, initial=self.step, disable=not (self.world.main and opts.progress),
                   desc=f"phase {opts.phase}", unit="step", dynamic_ncols=True)
        log = (self.out / "metrics.jsonl").open("a") if self.world.main else None
        try:
            while self.step < opts.steps:
                start = time.perf_counter()
                parts = self.train_step([next(batches) for _ in range(opts.grad_accum)])
                images_per_s = opts.batch_size / (time.perf_counter() - start)
                bar.update(1)
                bar.set_postfix(loss=f"{parts.get('total', parts['rec']):.4f}", img_s=f"{images_per_s:.1f}")
                if log and (self.step % opts.log_every == 0 or self.step == opts.steps):
                    log.write(json.dumps({"step": self.step, **parts, "lr": self.scheduler.get_last_lr()[0],
                                          "images_per_s": images_per_s}) + "\n")
                    log.flush()
                if self.world.main and self.step % opts.image_every == 0:
                    self.write_samples()
                if distributed.any_rank(self.interrupted, self.world, self.device):
                    path = self.save()
                    self._log(f"interrupted at step {self.step}: saved {path}; continue with --resume")
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
            self.finish(evals)
        distributed.barrier(self.world)
        return 0

    def finish(self, evals: dict) -> None:
        """Final samples, loss curves, held-out metrics, the scaling factor (phase 1), the exported model."""
        self.write_samples()
        plot_losses(self.out / "metrics.jsonl", self.out / "loss.png", title=f"DC-AE phase {self.phase.number}")
        evals[f"after_phase_{self.phase.number}"] = self.evaluate()
        after = evals[f"after_phase_{self.phase.number}"]
        self._log(f"held-out after phase {self.phase.number}: PSNR {after['psnr']:.2f} dB, SSIM {after['ssim']:.4f}")
        (self.out / "eval.json").write_text(json.dumps(evals, indent=1))
        export = DCAE(self.model.config).to(self.device)
        export.load_state_dict(self.model.state_dict())
        if self.ema is not None:
            self.ema.copy_to(export)
        export.eval()
        if self.phase.number == 1:
            factor = estimate_scaling_factor(export, batches(self.heldout, self.micro_batch))
            export.config = dataclasses.replace(export.config, scaling_factor=factor)
            self._log(f"latent scaling factor (1 / RMS over the held-out set): {factor:.5f}")
        export.save_pretrained(self.out / "model")
        self._log(f"saved the phase-{self.phase.number} model to {self.out / 'model'}")

