"""The latent-diffusion task on the training core: a class-conditional DiT or U-ViT on DC-AE latents.

Recipes (`RECIPES`, one per model family; every value is a default the options override): DiT as in its paper
(eps prediction on linear betas with the learned-range variance and VB term, AdamW lr 1e-4 without weight
decay, batch 256, DDPM sampling with 250 steps and guidance 1.3) and U-ViT as in efficientvit (eps MSE on
scaled-linear betas seeing t in 1..1000, AdamW lr 2e-4, weight decay 0.03, betas (0.99, 0.99), 5000 warm-up
steps, batch 1024, DPM-Solver++ (order 3) with 30 steps and guidance 1.5); ``--objective flow`` trains
rectified flow instead (Sana: logit-normal times, shift 3, flow DPM-Solver++ 20 steps). EMA 0.9999 with
warm-up. Class dropout, timesteps and noise of each step come from a generator seeded by (seed, step, rank).

Adds to the core's run folder: ``samples/step-*.png`` (fixed classes and noise, sampled with the EMA weights and
decoded by ``--ae``), and ``model/`` = the model (`save_pretrained`) + ``diffusion.json`` (objective, sampling
defaults, the latents' autoencoder and classes): what ``dcae sample --run`` reads.
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..diffusion import DEFAULT_STEPS, check_sample_args, make_objective
from ..figures import labelled_grid
from ..latents import LatentDataset
from ..models import get_dit_config, get_uvit_config
from ..models.transformers import model_class
from ..pipeline import generate, grid_classes, load_autoencoder, write_diffusion_info
from .options import TrainOptions, option
from .task import Task

GRID_CLASSES = 8  # rows of the sample grid (evenly spread over the classes)
GRID_SAMPLES = 4  # samples per row


@dataclass(frozen=True)
class Recipe:
    """A model family's published training and sampling settings."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    warmup_steps: int
    batch_size: int
    noise_schedule: str
    time_offset: int
    learn_sigma: bool
    sampler: str
    cfg: float


RECIPES = {
    "dit": Recipe(1e-4, 0.0, (0.9, 0.999), 0, 256, "linear", 0, True, "ddpm", 1.3),
    "uvit": Recipe(2e-4, 0.03, (0.99, 0.99), 5000, 1024, "scaled_linear", 1, False, "dpm++3", 1.5),
}
FLOW_SAMPLER = "flow-dpm++"
CONFIGS = {"dit": get_dit_config, "uvit": get_uvit_config}


def family_of(model: str) -> str:
    """"dit" or "uvit" from a preset name (dit-*, uvit-*) or a json config file holding ``"_class_name"``."""
    name = Path(model).name.lower()
    if Path(model).suffix == ".json":
        try:
            name = str(json.loads(Path(model).read_text()).get("_class_name", "")).lower()
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"--model {model}: not a readable json config ({e})") from None
    for family in ("uvit", "dit"):
        if name.startswith(family):
            return family
    raise ValueError(f"--model {model!r}: give a DiT or U-ViT preset (dit-s, dit-b, dit-l, dit-xl, dit-tiny, uvit-s, "
                     "uvit-m, uvit-l, uvit-h, uvit-2b, uvit-tiny) or a json config with \"_class_name\": "
                     "\"DiT\" or \"UViT\"")


def _recipe_text(name: str) -> str:
    return ", ".join(f"{family}: {getattr(recipe, name)}" for family, recipe in RECIPES.items())


@dataclass(kw_only=True)
class DiffusionOptions(TrainOptions):
    """``dcae train-diffusion``: the core's options plus the model, the latents, the objective and the sample
    grids. Unset values come from the model family's recipe (`RECIPES`)."""

    model: str = option(help="DiT / U-ViT preset (dit-s/b/l/xl, uvit-s/m/l/h/2b, dit-tiny, uvit-tiny; its latent "
                             "shape and classes come from --latents) or a json config file with \"_class_name\"")
    latents: Path = option(help="latent folder written by dcae encode-latents")
    objective: str = option("eps", "eps: DDPM noise prediction (the family's schedule); flow: rectified flow",
                            choices=("eps", "flow"))
    ae: Path | None = option(None, "the DC-AE that encoded the latents (folder or file): decodes the sample grids")
    attention: str | None = option(None, "override the preset's attention", choices=("softmax", "linear"))
    ffn: str | None = option(None, "override the preset's feed-forward", choices=("mlp", "glumbconv"))
    learn_sigma: bool | None = option(None, "learn the variance (eps objective)", default_text=_recipe_text(
        "learn_sigma"))
    class_dropout: float | None = option(None, "probability of training a label as the null class (guidance)",
                                         default_text="the config's, 0.1")
    flow_shift: float | None = option(None, "flow objective: timestep shift", default_text="3.0")
    sampler: str | None = option(None, "sampler of the sample grids", default_text=_recipe_text("sampler") +
                                 f"; flow: {FLOW_SAMPLER}")
    sample_steps: int | None = option(None, "sampling steps of the sample grids", default_text="the sampler's")
    cfg: float | None = option(None, "guidance scale of the sample grids", default_text=_recipe_text("cfg"))
    batch_size: int | None = option(None, "global batch per optimizer step", default_text=_recipe_text("batch_size"))
    lr: float | None = option(None, "AdamW learning rate", default_text=_recipe_text("lr"))
    weight_decay: float | None = option(None, "AdamW weight decay", default_text=_recipe_text("weight_decay"))
    betas: tuple[float, float] | None = option(None, "AdamW betas", default_text=_recipe_text("betas"))
    warmup_steps: int | None = option(None, "linear learning-rate warm-up steps",
                                      default_text=_recipe_text("warmup_steps"))
    ema_decay: float | None = option(0.9999, "EMA of the weights (sampled and exported; 0 turns it off)")

    def __post_init__(self):
        self.family = family_of(self.model)
        recipe = RECIPES[self.family]
        self.fill(lr=recipe.lr, weight_decay=recipe.weight_decay, betas=recipe.betas,
                  warmup_steps=min(recipe.warmup_steps, self.steps), batch_size=recipe.batch_size,
                  learn_sigma=recipe.learn_sigma and self.objective == "eps",
                  sampler=recipe.sampler if self.objective == "eps" else FLOW_SAMPLER)
        self.fill(cfg=recipe.cfg)
        self.ema_decay = self.ema_decay or None
        super().__post_init__()
        if self.objective not in ("eps", "flow"):
            raise ValueError(f"--objective must be eps or flow, got {self.objective!r}")
        if self.cfg < 0:
            raise ValueError(f"--cfg must be >= 0, got {self.cfg}")
        if self.class_dropout is not None and not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"--class-dropout must be in [0, 1), got {self.class_dropout}")
        self.objective_config()  # the objective's own checks (learn_sigma with flow, ...)
        check_sample_args(make_objective(**self.objective_config()), self.sampler, self.sample_steps, self.cfg)

    def objective_config(self) -> dict:
        """The `make_objective` arguments of this run."""
        if self.objective == "flow":
            if self.learn_sigma:
                raise ValueError("--learn-sigma applies to the eps objective only")
            return dict(kind="flow", shift=self.flow_shift)
        if self.flow_shift is not None:
            raise ValueError("--flow-shift applies to the flow objective only")
        recipe = RECIPES[self.family]
        return dict(kind="eps", learn_sigma=self.learn_sigma, schedule=recipe.noise_schedule,
                    time_offset=recipe.time_offset)


def sampling_defaults(options: DiffusionOptions) -> dict:
    return {"sampler": options.sampler, "steps": options.sample_steps or DEFAULT_STEPS[options.sampler],
            "cfg": options.cfg}


class DiffusionTask(Task):
    """Trains a DiT or U-ViT on a latent folder with an objective of `dcae.diffusion`."""

    def __init__(self, options: DiffusionOptions):
        super().__init__(options)
        self.latents = LatentDataset(options.latents)
        self.objective = make_objective(**options.objective_config())
        self.title = f"{options.family} {options.objective} diffusion"
        self.config = None
        self.autoencoder = None
        self._generator = (None, None)

    def build_model(self, saved: dict | None) -> nn.Module:
        opts = self.options
        if saved is not None:
            config = saved["model_config"]
            config = CONFIGS[saved["family"]](config)
        elif Path(opts.model).suffix == ".json":
            fields = {k: v for k, v in json.loads(Path(opts.model).read_text()).items() if not k.startswith("_")}
            config = CONFIGS[opts.family](fields)
        else:
            config = CONFIGS[opts.family](opts.model, latent_shape=self.latents.latent_shape,
                                          num_classes=self.latents.num_classes)
        overrides = {name: value for name, value in (("attention", opts.attention), ("ffn", opts.ffn),
                                                     ("class_dropout_prob", opts.class_dropout),
                                                     ("learn_sigma", opts.learn_sigma)) if value is not None}
        config = dataclasses.replace(config, **overrides)
        shape = (config.in_channels, *config.latent_size)
        if shape != tuple(self.latents.latent_shape):
            raise ValueError(f"the model takes latents of shape {shape}, {opts.latents} holds "
                             f"{tuple(self.latents.latent_shape)}")
        if config.num_classes != self.latents.num_classes:
            raise ValueError(f"the model has {config.num_classes} classes, {opts.latents} has "
                             f"{self.latents.num_classes}")
        self.config = config
        return model_class(config)(config)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        if self.options.ae is not None:
            self.autoencoder = load_autoencoder(self.options.ae, self.latents.meta, ctx.device)

    def train_set(self):
        return self.latents

    def _step_generator(self, step: int) -> torch.Generator:
        """One CPU generator per optimizer step (its micro-batches continue it), seeded by (seed, step, rank)."""
        if self._generator[0] != step:
            seed = hash((self.options.seed, step, self.ctx.world.rank)) & 0x7FFF_FFFF_FFFF
            self._generator = (step, torch.Generator().manual_seed(seed))
        return self._generator[1]

    def loss(self, net: nn.Module, batch, step: int):
        x0, y = (t.to(self.ctx.device, non_blocking=True) for t in batch)
        generator = self._step_generator(step)
        model = getattr(net, "module", net)
        y = model.drop_labels(y, generator)
        loss, parts = self.objective.loss(net, x0, y, generator)
        return loss, {"loss": loss.item(), **parts}

    def state(self):
        return {}, {"family": self.options.family, "model_config": self.config.to_dict(),
                    "objective": self.objective.config}

    def load_state(self, tensors, state) -> None:
        if state["objective"] != self.objective.config:
            raise ValueError(f"the checkpoint was trained with objective {state['objective']}, not "
                             f"{self.objective.config}")

    def describe(self, model):
        fields = {"family": self.options.family, "model_config": self.config.to_dict(),
                  "objective": self.objective.config, "sampling": sampling_defaults(self.options),
                  "latents": {"path": str(self.options.latents), "count": len(self.latents),
                              "shape": list(self.latents.latent_shape), "classes": self.latents.num_classes}}
        lines = [f"latents: {len(self.latents):,} of shape {tuple(self.latents.latent_shape)}, "
                 f"{self.latents.num_classes} classes; objective {self.objective.config}"]
        if self.autoencoder is None:
            lines.append("no --ae given: sample grids are not drawn")
        return fields, lines

    def samples(self, model, step: int) -> torch.Tensor | None:
        if self.autoencoder is None:
            return None
        classes = grid_classes(self.latents.num_classes, GRID_CLASSES)
        s = sampling_defaults(self.options)
        images = generate(model, self.autoencoder, self.objective, classes.repeat_interleave(GRID_SAMPLES),
                          s["sampler"], s["steps"], s["cfg"], seed=self.options.seed, autocast=self.ctx.autocast)
        rows = list(images.view(len(classes), GRID_SAMPLES, *images.shape[1:]))
        labels = [f"class {self.latents.class_names[int(c)]}" for c in classes]
        return labelled_grid(rows, labels, f"step {step}: {s['sampler']}, {s['steps']} steps, guidance {s['cfg']}")

    def export(self, model, folder: Path) -> None:
        model.save_pretrained(folder)
        write_diffusion_info(folder, self.options.family, self.objective, sampling_defaults(self.options),
                             self.latents.meta)

