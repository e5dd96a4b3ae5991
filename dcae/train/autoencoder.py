"""The DC-AE task on the training core: one phase of Decoupled High-Resolution Adaptation per run (`phases.py`).

Adds to the core's run folder: ``run.json`` fields (phase, LPIPS status, model config), held-out PSNR/SSIM in
``eval.json``, held-out reconstructions as ``samples/step-*.png`` (originals above, reconstructions below) and,
after phase 1, the latent scaling factor in ``model/config.json``.
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import MAX_IMAGE_PIXELS, batches, make_dataset
from ..figures import labelled_grid
from ..lpips import load_lpips
from ..metrics import evaluate_reconstructions
from ..models import DCAE, DCAEConfig, get_config
from ..scaling import estimate_scaling_factor
from . import distributed
from .checkpoint import optimizer_state_from_flat, optimizer_state_to_flat
from .discriminator import NLayerDiscriminator
from .losses import GANLoss, ReconstructionLoss
from .options import TrainOptions, option
from .phases import PHASES, freeze_for_phase, set_train_mode
from .task import Task

SAMPLE_IMAGES = 4


def _per_phase(name: str, unit: str = "") -> str:
    return ", ".join(f"phase {n}: {getattr(p, name)}{unit}" for n, p in PHASES.items())


@dataclass(kw_only=True)
class AutoencoderOptions(TrainOptions):
    """``dcae train-ae``: the core's options plus what a DC-AE phase needs. Unset optimizer settings and the
    resolution come from the phase (`phases.PHASES`, the paper's table)."""

    phase: int = option(help="1: low-res full training, 2: high-res latent adaptation, 3: low-res head refinement "
                             "with GAN", choices=sorted(PHASES))
    preset: str | None = option(None, "DC-AE preset name (dcae.PRESETS)")
    config: Path | None = option(None, "json file of DCAEConfig fields")
    init: Path | None = option(None, "weights to start from: an earlier run's folder, a model folder or file")
    data: str = option("builtin", "image folder, or 'builtin' (photos shipped in scikit-image/learn)")
    val_data: str | None = option(None, "held-out image folder (default: a fixed ~5%% of --data)")
    resolution: int | None = option(None, "crop size in pixels", default_text=_per_phase("resolution", " px"))
    lr: float | None = option(None, "AdamW learning rate", default_text=_per_phase("lr"))
    weight_decay: float | None = option(None, "AdamW weight decay", default_text=_per_phase("weight_decay"))
    betas: tuple[float, float] | None = option(None, "AdamW betas", default_text=_per_phase("betas"))
    lpips_weights: Path | None = option(None, "local LPIPS file (python -m dcae.lpips convert); without it: L1 only")
    l1_weight: float = option(1.0, "weight of the L1 loss")
    lpips_weight: float = option(1.0, "weight of the LPIPS loss")
    disc_start: int = option(0, "phase 3: step at which the GAN loss starts")
    disc_weight: float = option(0.5, "phase 3: GAN loss multiplier")
    disc_lr: float | None = option(None, "phase 3: discriminator learning rate", default_text="--lr")
    samples_per_epoch: int = option(1024, "length of an epoch of the builtin data")
    max_pixels: int = option(MAX_IMAGE_PIXELS, "skip images with more pixels (width x height) than this, with a "
                                               "warning naming them (decompression bombs); 0: no limit")

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"--phase must be 1, 2 or 3, got {self.phase}")
        phase = PHASES[self.phase]
        self.fill(resolution=phase.resolution, lr=phase.lr, weight_decay=phase.weight_decay, betas=phase.betas)
        self.fill(disc_lr=self.lr)
        super().__post_init__()
        if (self.preset is None) == (self.config is None) and self.init is None and not self.resume:
            raise ValueError("give exactly one of --preset / --config (or --init from an earlier phase)")
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 1:
            raise ValueError(f"--resolution must be a positive integer, got {self.resolution!r}")
        if self.samples_per_epoch < 1:
            raise ValueError(f"--samples-per-epoch must be >= 1, got {self.samples_per_epoch}")
        if self.max_pixels < 0:
            raise ValueError(f"--max-pixels must be >= 0 (0: no limit), got {self.max_pixels}")

    @property
    def pixel_limit(self) -> int | None:
        return self.max_pixels or None


class AutoencoderTask(Task):
    """Trains one phase of a `DCAE`: what the phase trains, L1 + LPIPS (+ PatchGAN in phase 3), held-out
    PSNR/SSIM, reconstruction grids, the exported model (with the scaling factor after phase 1)."""

    def __init__(self, options: AutoencoderOptions):
        super().__init__(options)
        self.phase = PHASES[options.phase]
        self.title = f"DC-AE phase {self.phase.number}"
        self.eval_key = f"after_phase_{self.phase.number}"
        self.progress_key = "total" if self.phase.gan else "rec"
        self.config: DCAEConfig | None = None
        self.gan = self.disc_optimizer = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ---- the model ----
    def build_model(self, saved: dict | None) -> DCAE:
        opts = self.options
        if saved is not None:
            if saved["phase"] != opts.phase:
                raise ValueError(f"the checkpoint in {opts.out} is from phase {saved['phase']}, not {opts.phase}")
            model = DCAE(DCAEConfig.from_dict(saved["model_config"]))
        elif opts.init is not None:
            model = DCAE.from_pretrained(opts.init).float().train()
            if opts.preset or opts.config:
                same = lambda c: dataclasses.replace(c, scaling_factor=1.0)  # noqa: E731
                if same(self._named_config()) != same(model.config):
                    raise ValueError(f"--init {opts.init} holds a different architecture than the one asked for")
        else:
            model = DCAE(self._named_config())
        ratio = model.spatial_compression_ratio
        if opts.resolution % ratio:
            raise ValueError(f"--resolution {opts.resolution} is not a multiple of the compression ratio {ratio}")
        self.config = model.config
        return model

    def _named_config(self) -> DCAEConfig:
        if self.options.config is not None:
            try:
                return DCAEConfig.from_dict(json.loads(Path(self.options.config).read_text()))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"--config {self.options.config}: {e}") from None
        return get_config(self.options.preset)

    def freeze(self, model: nn.Module) -> dict[str, int]:
        return freeze_for_phase(model, self.phase.number)

    def train_mode(self, model: nn.Module) -> None:
        set_train_mode(model, self.phase.number)

    # ---- data and losses ----
    def setup(self, ctx) -> None:
        super().setup(ctx)
        opts = self.options
        lpips, self.lpips_status = load_lpips(opts.lpips_weights)
        self.lpips = None if lpips is None else lpips.to(ctx.device)
        self.rec_loss = ReconstructionLoss(self.lpips, opts.l1_weight, opts.lpips_weight)
        if self.phase.gan:
            disc = NLayerDiscriminator().to(ctx.device)
            self.gan = GANLoss(disc, opts.disc_start, opts.disc_weight)
            self.disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=opts.disc_lr, betas=opts.betas,
                                                    weight_decay=opts.weight_decay)
        self.heldout = make_dataset(opts.data, opts.resolution, "heldout", opts.val_data,
                                    max_pixels=opts.pixel_limit)
        self.eval_batch = max(1, opts.batch_size // (ctx.world.size * opts.grad_accum))

    def train_set(self):
        opts = self.options
        return make_dataset(opts.data, opts.resolution, "train", opts.val_data, opts.samples_per_epoch,
                            opts.pixel_limit)

    def loss(self, net: nn.Module, x: torch.Tensor, step: int):
        x = x.to(self.ctx.device, non_blocking=True)
        x_rec = net(x).float()
        loss, parts = self.rec_loss(x_rec, x)
        if self.gan is not None:
            self.gan.discriminator.requires_grad_(False)
            model = getattr(net, "module", net)  # DistributedDataParallel wraps the model
            loss, gan_parts = self.gan.generator_loss(loss, x_rec, model.last_layer_weight, step)
            parts |= gan_parts
            if self.gan.active(step):
                self._pairs.append((x, x_rec.detach()))
        return loss, parts

    def after_step(self, step: int) -> dict[str, float]:
        """Phase 3: one discriminator step on the step's (real, reconstruction) pairs."""
        pairs, self._pairs = self._pairs, []
        if not pairs:
            return {}
        disc, parts = self.gan.discriminator, {}
        disc.requires_grad_(True)
        for x, x_rec in pairs:
            with self.ctx.autocast:
                d_loss, d_parts = self.gan.discriminator_loss(x, x_rec)
            (d_loss / len(pairs)).backward()
            for k, v in d_parts.items():
                parts[k] = parts.get(k, 0.0) + v / len(pairs)
        distributed.average_gradients(disc, self.ctx.world)
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return parts

    # ---- checkpoints and records ----
    def state(self):
        state = {"phase": self.phase.number, "model_config": self.config.to_dict()}
        if self.gan is None:
            return {}, state
        tensors, state["disc_optimizer"] = optimizer_state_to_flat(self.disc_optimizer.state_dict())
        return {"discriminator": self.gan.discriminator.state_dict(), "disc_optimizer": tensors}, state

    def load_state(self, tensors, state) -> None:
        if self.gan is not None:
            self.gan.discriminator.load_state_dict(tensors["discriminator"])
            self.disc_optimizer.load_state_dict(optimizer_state_from_flat(tensors["disc_optimizer"],
                                                                          state["disc_optimizer"]))

    def describe(self, model):
        phase = {f.name: getattr(self.phase, f.name) for f in dataclasses.fields(self.phase) if f.name != "parts"}
        fields = {"phase": phase, "lpips": self.lpips_status,
                  "lpips_enabled": self.lpips is not None, "model_config": self.config.to_dict()}
        return fields, [self.lpips_status]

    # ---- what people look at ----
    def evaluate(self, model) -> dict[str, float]:
        return evaluate_reconstructions(model, batches(self.heldout, self.eval_batch), autocast=self.ctx.autocast)[0]

    def format_metrics(self, metrics) -> str:
        return (f"held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} "
                f"({len(self.heldout)} crops of {self.options.resolution} px)")

    def samples(self, model, step: int) -> torch.Tensor:
        x = next(batches(self.heldout, SAMPLE_IMAGES, SAMPLE_IMAGES))
        with self.ctx.autocast:
            recon = model(x.to(self.ctx.device)).float().clamp(-1, 1).cpu()
        return labelled_grid([x, recon], ["held-out", "reconstructed"],
                             f"{self.title}, step {step}, {self.options.resolution} px")

    def export(self, model, folder: Path) -> None:
        export = DCAE(self.config).to(self.ctx.device)
        export.load_state_dict(model.state_dict())
        export.eval()
        if self.phase.number == 1:
            factor = estimate_scaling_factor(export, batches(self.heldout, self.eval_batch))
            export.config = dataclasses.replace(export.config, scaling_factor=factor)
            self.ctx.log(f"latent scaling factor (1 / RMS over the held-out set): {factor:.5f}")
        export.save_pretrained(folder)
