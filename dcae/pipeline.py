"""Latent diffusion end to end at inference: a trained diffusion model folder (``save_pretrained`` +
``diffusion.json``), the DC-AE that made its latents, and `generate`: class ids -> sampled latents -> images."""
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .diffusion import Objective, make_objective, sample
from .files import atomic_write_json
from .latents import weights_sha256
from .models import DCAE
from .models.transformers import load_transformer

DIFFUSION_FILE = "diffusion.json"


@dataclass
class DiffusionModel:
    """A trained model with what sampling it needs: its objective, its recipe's sampling defaults (sampler,
    steps, cfg) and the metadata of the latents it learned (class names, the autoencoder's hash, scale)."""

    model: torch.nn.Module
    objective: Objective
    sampling: dict
    latents: dict

    @property
    def class_names(self) -> list[str]:
        return list(self.latents["class_names"])


def write_diffusion_info(folder: Path, family: str, objective: Objective, sampling: dict, latents_meta: dict) -> None:
    """Write ``diffusion.json`` beside a saved model (atomically)."""
    atomic_write_json(Path(folder) / DIFFUSION_FILE, {"family": family, "objective": objective.config,
                                                      "sampling": sampling, "latents": latents_meta})


def load_diffusion_model(folder: Path, device="cpu") -> DiffusionModel:
    """The model saved in ``folder`` (a trainer run's ``model/``), in eval mode on ``device``, with its
    ``diffusion.json``. Raises ValueError / FileNotFoundError with a clear message for anything else."""
    folder = Path(folder)
    info_path = folder / DIFFUSION_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"{folder} is not a trained diffusion model folder (no {DIFFUSION_FILE}: give a "
                                "train-diffusion run folder's model/)")
    try:
        info = json.loads(info_path.read_text())
        objective, sampling, latents = make_objective(**info["objective"]), dict(info["sampling"]), info["latents"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{info_path}: unreadable ({type(e).__name__}: {e})") from None
    model = load_transformer(folder).to(device).eval()
    return DiffusionModel(model, objective, sampling, latents)


def load_autoencoder(path, latents_meta: dict, device="cpu") -> DCAE:
    """The DC-AE at ``path`` (any `DCAE.from_pretrained` path), in eval mode on ``device``, refused (ValueError)
    unless it is the autoencoder that encoded the latents ``latents_meta`` (a latent folder's meta.json)
    describes: same config and weights (sha256 of the fp32 state dict, as encode-latents records it)."""
    autoencoder = DCAE.from_pretrained(path).float()
    recorded = latents_meta["autoencoder"]
    config = json.loads(json.dumps(autoencoder.config.to_dict()))  # tuples as the json record holds them: lists
    if config != recorded["config"] or weights_sha256(autoencoder) != recorded["weights_sha256"]:
        raise ValueError(f"{path} is not the autoencoder that encoded these latents (its config or weights differ "
                         "from those recorded in the latents' meta.json)")
    return autoencoder.to(device).eval()


def grid_classes(num_classes: int, rows: int) -> torch.Tensor:
    """Up to ``rows`` class ids spread evenly over ``num_classes``."""
    count = min(num_classes, rows)
    return torch.tensor([i * num_classes // count for i in range(count)])


@torch.no_grad()
def generate(model, autoencoder: DCAE, objective: Objective, classes: torch.Tensor, sampler: str, steps: int,
             cfg: float, seed: int, autocast=None, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] on the CPU for ``classes`` (N,): latents sampled with ``sampler`` / ``steps``
    / guidance ``cfg`` from noise of one CPU generator seeded by ``seed`` (deterministic), divided by the
    autoencoder's scaling factor and decoded; ``batch_size`` at a time, under ``autocast`` when given."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    shape = (model.config.in_channels, *model.config.latent_size)
    images = []
    for y in classes.split(batch_size):
        with autocast if autocast is not None else contextlib.nullcontext():
            z = sample(model, (len(y), *shape), y.to(device), objective, sampler, steps, cfg, generator,
                       progress=progress)
            x = autoencoder.decode((z / autoencoder.scaling_factor).to(next(autoencoder.parameters()).dtype))
        images.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(images)
