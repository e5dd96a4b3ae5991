"""Command-line options of the DC-AE trainer (``dcae train-ae`` and ``torchrun -m dcae.train``)."""
import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

from .phases import PHASES


@dataclass
class TrainOptions:
    phase: int
    out: Path
    preset: str | None = None
    config: Path | None = None
    init: Path | None = None
    resume: bool = False
    data: str = "builtin"
    val_data: str | None = None
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    resolution: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    ema_decay: float | None = None
    grad_checkpointing: bool = False
    lpips_weights: Path | None = None
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    disc_start: int = 0
    disc_weight: float = 0.5
    disc_lr: float | None = None
    save_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    image_every: int = 250
    samples_per_epoch: int = 1024
    seed: int = 0
    workers: int = 0
    device: str | None = None
    progress: bool = True

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"--phase must be 1, 2 or 3, got {self.phase}")
        if (self.preset is None) == (self.config is None) and self.init is None and not self.resume:
            raise ValueError("give exactly one of --preset / --config (or --init from an earlier phase)")
        for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every", "image_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        phase = PHASES[self.phase]
        self.resolution = self.resolution or phase.resolution
        self.lr = phase.lr if self.lr is None else self.lr
        self.weight_decay = phase.weight_decay if self.weight_decay is None else self.weight_decay
        self.betas = tuple(phase.betas if self.betas is None else self.betas)
        self.disc_lr = self.lr if self.disc_lr is None else self.disc_lr

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument
    p("--phase", type=int, required=True, choices=sorted(PHASES),
      help="1: low-res full training, 2: high-res latent adaptation, 3: low-res head refinement with GAN")
    p("--preset", help="DC-AE preset name (dcae.PRESETS)")
    p("--config", type=Path, help="json file of DCAEConfig fields")
    p("--init", type=Path, help="weights to start from: an earlier run's folder, a model folder or file")
    p("--out", type=Path, required=True, help="run folder: checkpoints, logs, images, final model")
    p("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p("--data", default="builtin", help="image folder, or 'builtin' (photos shipped in scikit-image/learn)")
    p("--val-data", help="held-out image folder (default: a fixed ~5%% of --data)")
    p("--steps", type=int, default=1000, help="optimizer steps of this phase")
    p("--batch-size", type=int, default=8, help="global batch per optimizer step, over all processes")
    p("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p("--resolution", type=int, help="crop size (default: 256 for phases 1 and 3, 1024 for phase 2)")
    p("--lr", type=float)
    p("--weight-decay", type=float)
    p("--betas", type=float, nargs=2)
    p("--schedule", choices=("constant", "cosine"), default="constant")
    p("--warmup-steps", type=int, default=0)
    p("--ema-decay", type=float, help="keep an EMA of the trained weights (exported as the final model)")
    p("--grad-checkpointing", action="store_true",
      help="recompute each stage's activations in backward: less memory (phase 2 at 1024 px), ~30%% more compute")
    p("--lpips-weights", type=Path, help="local LPIPS file (python -m dcae.lpips convert); without it: L1 only")
    p("--l1-weight", type=float, default=1.0)
    p("--lpips-weight", type=float, default=1.0)
    p("--disc-start", type=int, default=0, help="phase 3: step at which the GAN loss starts")
    p("--disc-weight", type=float, default=0.5, help="phase 3: GAN loss multiplier")
    p("--disc-lr", type=float, help="phase 3: discriminator learning rate (default: --lr)")
    p("--save-every", type=int, default=500)
    p("--keep-checkpoints", type=int, default=3)
    p("--log-every", type=int, default=10)
    p("--image-every", type=int, default=250, help="reconstruction grid PNG every N steps")
    p("--samples-per-epoch", type=int, default=1024, help="length of an epoch of the builtin data")
    p("--seed", type=int, default=0)
    p("--workers", type=int, default=0, help="DataLoader worker processes")
    p("--device", help="cuda or cpu (default: cuda when available)")
    p("--no-progress", dest="progress", action="store_false", help="no tqdm bar")


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    names = TrainOptions.__dataclass_fields__
    return TrainOptions(**{k: v for k, v in vars(args).items() if k in names})
