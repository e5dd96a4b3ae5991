"""Metrics of generated samples: FID against reference statistics and the Inception Score, both from pytorch-fid's
Inception (`dcae.fid.FIDInception`, local weights only).

Reference statistics: the mean and covariance of the pool3 features of real images' ADM centre crops
(`dcae.latents.load_center_crop`), in an npz with keys ``mu`` (2048,) and ``sigma`` (2048, 2048), as ADM's
reference batches hold them, plus ``count`` and ``resolution``. Samples: every png/jpg/jpeg/webp file under a
folder, read as `dcae.data.load_image` reads them: 8-bit RGB, p / 127.5 - 1. Samples saved as 8-bit PNG thus
reach the network on the uint8 grid, as in pytorch-fid and ADM's evaluator.
"""
from pathlib import Path
from zipfile import BadZipFile

import numpy as np
import torch
from numpy.lib.npyio import NpzFile
from tqdm import tqdm

from .data import image_files, load_image
from .fid import FEATURES, FeatureMoments, FIDInception, frechet_distance
from .files import atomic_write
from .latents import load_center_crop, prefetched

IS_SPLITS = 10


def inception_score(logits, splits: int = IS_SPLITS) -> tuple[float, float]:
    """logits (N, K) -> (mean, std) over ``splits`` consecutive parts (rows [i N / s, (i + 1) N / s)) of
    exp(E_x KL(p(y|x) || p(y))), with p(y|x) = softmax(logits) and p(y) the part's mean of p(y|x)
    (Salimans et al. 2016; the parts as in improved-gan). Computed in float64."""
    log_p = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    if log_p.dim() != 2 or isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= len(log_p):
        raise ValueError(f"the Inception Score needs (N, K) logits with N >= splits >= 1, got logits of shape "
                         f"{tuple(log_p.shape)} and splits={splits!r}")
    n = len(log_p)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(dim=1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


class InceptionStatistics:
    """Running pool3 moments (for FID) and, when the network has its classifier, the logits (for the Inception
    Score) of every batch given to `update`."""

    def __init__(self, inception: FIDInception):
        self.inception = inception
        self.moments = FeatureMoments()
        self.logits: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        """images: (B, 3, H, W) in [-1, 1], on the network's device."""
        features = self.inception(images.float())
        self.moments.update(features)
        if self.inception.fc is not None:
            self.logits.append(self.inception.logits(features).cpu())


def image_batches(paths: list[Path], batch_size: int, resolution: int | None = None, progress: dict | None = None):
    """(B, 3, H, W) float32 batches in [-1, 1] of the image files: as read, all of one size, or with
    ``resolution`` their ADM centre crops. ValueError naming an unreadable file or one of another size."""
    def load(path: Path) -> torch.Tensor:
        if resolution is not None:
            return load_center_crop(path, resolution).float() / 127.5 - 1
        return load_image(path)[0]

    size = None
    bar = tqdm(total=len(paths), **progress) if progress is not None else None
    for batch, images in prefetched(paths, load, batch_size):
        for path, image in zip(batch, images):
            if size is None:
                size = image.shape
            elif image.shape != size:
                raise ValueError(f"{path} is {image.shape[2]}x{image.shape[1]} px, the images before it "
                                 f"{size[2]}x{size[1]}: the samples must share one size")
        if bar is not None:
            bar.update(len(batch))
        yield torch.stack(images)
    if bar is not None:
        bar.close()


def folder_images(folder) -> list[Path]:
    """Every image file under ``folder`` (recursively), sorted; ValueError when there is none."""
    paths = image_files(folder)
    if not paths:
        raise ValueError(f"no image files (png/jpg/jpeg/webp) under {folder}")
    return paths


def reference_statistics(inception: FIDInception, paths: list[Path], resolution: int, batch_size: int = 50,
                         progress: bool = True) -> dict:
    """{"mu", "sigma", "count", "resolution"} of the pool3 features of the image files' ADM centre crops
    (resolution R), computed on the network's device."""
    device = next(inception.parameters()).device
    stats = InceptionStatistics(inception)
    for images in image_batches(paths, batch_size, resolution, _bar(progress, "fid-ref")):
        stats.update(images.to(device))
    mu, sigma = stats.moments.mean_cov()
    return {"mu": mu, "sigma": sigma, "count": stats.moments.count, "resolution": resolution}


def save_reference(path, stats: dict) -> None:
    """Write reference statistics (see `reference_statistics`) to an npz, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **{key: np.asarray(value) for key, value in stats.items()})

    atomic_write(Path(path), write)


def load_reference(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu (2048,), sigma (2048, 2048)) float64 of a reference npz (ours, or ADM's reference batches: the keys
    ``mu`` and ``sigma``). ValueError for a file that is not such an npz."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, NpzFile):
            raise ValueError("it holds a single array, not an npz archive")
        with npz:
            missing = {"mu", "sigma"} - set(npz.files)
            if missing:
                raise ValueError(f"it has no {' or '.join(sorted(missing))} (keys: {', '.join(npz.files) or 'none'})")
            mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
    except (OSError, ValueError, EOFError, BadZipFile) as err:
        raise ValueError(f"{path} is not a reference statistics npz: {err}") from err
    if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} must be ({FEATURES},) and "
                         f"({FEATURES}, {FEATURES}), pool3 features")
    return mu, sigma


def evaluate_samples(inception: FIDInception, paths: list[Path], reference: tuple[np.ndarray, np.ndarray],
                     batch_size: int = 50, splits: int = IS_SPLITS, progress: bool = True) -> dict:
    """{"count", "fid", "inception_score", "inception_score_std"} of the sample image files: FID against
    ``reference`` (mu, sigma) and the Inception Score over ``splits`` parts. ``inception`` must hold its
    classifier (``FIDInception.from_file(path, classifier=True)``)."""
    if inception.fc is None:
        raise ValueError("the Inception Score needs the Inception's classifier: load it with classifier=True")
    if len(paths) < max(2, splits):
        raise ValueError(f"{len(paths)} samples: FID needs at least 2 and the Inception Score with {splits} splits "
                         f"at least {splits}")
    device = next(inception.parameters()).device
    stats = InceptionStatistics(inception)
    for images in image_batches(paths, batch_size, progress=_bar(progress, "evaluate-gen")):
        stats.update(images.to(device))
    score, spread = inception_score(torch.cat(stats.logits), splits)
    return {"count": stats.moments.count, "fid": frechet_distance(*stats.moments.mean_cov(), *reference),
            "inception_score": score, "inception_score_std": spread}


def _bar(progress: bool, desc: str) -> dict | None:
    return dict(desc=desc, unit="img") if progress else None
