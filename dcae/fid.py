"""rFID: the Frechet distance between Inception pool3 features of real and of reconstructed images.

The network is pytorch-fid's FID InceptionV3 (TF inception-2015-12-05 weights, file
pt_inception-2015-12-05-6726825d.pth, torchvision Inception3 key names), written here in plain torch and read
from a local file only. It differs from torchvision's Inception3 in its pooling branches: average pools that
leave the zero padding out of the count (TF's), and a max pool in the last block. The file's 1008-way
classifier ``fc`` is loaded on request, for the Inception Score (`FIDInception.logits`).
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import freeze, load_frozen

FID_SIZE = 299
FEATURES = 2048
CLASSES = 1008  # the TF graph's softmax: 1000 ImageNet classes and 8 unused ones


class ConvBNReLU(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU; keys conv.weight, bn.{weight,bias,running_*}."""

    def __init__(self, c_in: int, c_out: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def chain(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3, stride 1, the mean over the in-image taps only."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/c/d: (B, c_in, 35, 35) -> (B, 224 + pool_features, 35, 35)."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBNReLU(c_in, 64, 1)
        self.branch5x5_1 = ConvBNReLU(c_in, 48, 1)
        self.branch5x5_2 = ConvBNReLU(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBNReLU(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(96, 96, 3, padding=1)
        self.branch_pool = ConvBNReLU(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x),
                          chain(x, self.branch5x5_1, self.branch5x5_2),
                          chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(tf_avg_pool(x))], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a: (B, c_in, 35, 35) -> (B, 480 + c_in, 17, 17)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = ConvBNReLU(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBNReLU(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x),
                          chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionC(nn.Module):
    """Mixed_6b/c/d/e, factorised 7x7 convolutions: (B, 768, 17, 17) -> (B, 768, 17, 17)."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBNReLU(c_in, 192, 1)
        self.branch7x7_1 = ConvBNReLU(c_in, c7, 1)
        self.branch7x7_2 = ConvBNReLU(c7, c7, **row)
        self.branch7x7_3 = ConvBNReLU(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBNReLU(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBNReLU(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBNReLU(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBNReLU(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBNReLU(c7, 192, **row)
        self.branch_pool = ConvBNReLU(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x),
                          chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                                self.branch7x7dbl_4, self.branch7x7dbl_5),
                          self.branch_pool(tf_avg_pool(x))], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a: (B, 768, 17, 17) -> (B, 1280, 8, 8)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = ConvBNReLU(c_in, 192, 1)
        self.branch3x3_2 = ConvBNReLU(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBNReLU(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBNReLU(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBNReLU(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBNReLU(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([chain(x, self.branch3x3_1, self.branch3x3_2),
                          chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                          F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """Mixed_7b (TF average pool) and Mixed_7c (max pool): (B, c_in, 8, 8) -> (B, 2048, 8, 8)."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch1x1 = ConvBNReLU(c_in, 320, 1)
        self.branch3x3_1 = ConvBNReLU(c_in, 384, 1)
        self.branch3x3_2a = ConvBNReLU(384, 384, **row)
        self.branch3x3_2b = ConvBNReLU(384, 384, **col)
        self.branch3x3dbl_1 = ConvBNReLU(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBNReLU(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBNReLU(384, 384, **row)
        self.branch3x3dbl_3b = ConvBNReLU(384, 384, **col)
        self.branch_pool = ConvBNReLU(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        bd = chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                          self.branch_pool(pooled)], dim=1)


def unused_key(key: str) -> bool:
    """Keys of the FID weight file that pool3 features do not use: the 1008-way classifier, BN step counters."""
    return key.startswith("fc.") or key.endswith(".num_batches_tracked")


def step_counter(key: str) -> bool:
    """The batch norms' num_batches_tracked, which pytorch-fid's file leaves out."""
    return key.endswith(".num_batches_tracked")


class FIDInception(nn.Module):
    """pytorch-fid's FID InceptionV3 up to pool3: (B, 3, H, W) in [-1, 1] -> (B, 2048). Frozen.

    Inputs are resized to 299x299 bilinearly (align_corners=False, no antialiasing), as pytorch-fid does.
    ``classifier``: also hold the 1008-way ``fc`` layer, for `logits`."""

    def __init__(self, classifier: bool = False):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBNReLU(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBNReLU(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBNReLU(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBNReLU(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBNReLU(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURES, CLASSES) if classifier else None
        freeze(self)

    @classmethod
    def from_file(cls, path: str | Path, classifier: bool = False) -> "FIDInception":
        """pt_inception-2015-12-05-6726825d.pth (or a .safetensors with the same keys); its `fc.*` is read
        (and required) only with ``classifier``."""
        return load_frozen(cls(classifier), path, "FID Inception", ignore=step_counter if classifier else unused_key)

    def train(self, mode: bool = True) -> "FIDInception":
        """Stays in eval mode: batch norm must use the file's running statistics."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must have shape (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-2:] != (FID_SIZE, FID_SIZE):
            # pytorch-fid resizes [0, 1] images, then maps them to [-1, 1]: the same, as bilinear weights sum to 1
            x = F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
        x = chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = chain(F.max_pool2d(x, 3, stride=2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = chain(F.max_pool2d(x, 3, stride=2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                  self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c)
        return x.mean(dim=(2, 3))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """pool3 features (B, 2048) -> (B, 1008) class logits ``features @ fc.weight^T``, without ``fc.bias``: the
        Inception Score's softmax as the original code (improved-gan) and ADM's evaluator build it from the TF
        graph's ``softmax/logits/MatMul``."""
        if self.fc is None:
            raise ValueError("this FIDInception has no classifier: build it with classifier=True")
        return features @ self.fc.weight.T


def load_inception(path: str | Path | None) -> tuple[FIDInception | None, str]:
    """(frozen FIDInception, what was loaded) from a local file, or (None, why rFID is off) without a path.
    A path that is given but absent raises FileNotFoundError."""
    if path is None:
        return None, "rFID disabled: no --fid-weights file given (Inception weights are never downloaded)"
    return FIDInception.from_file(path), f"FID Inception weights loaded from {path}"


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The square root of a symmetric positive semi-definite matrix (eigenvalues below 0 from round-off: 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) for means (D,) and covariances (D, D).

    tr (sigma1 sigma2)^(1/2) = tr (s sigma2 s)^(1/2) with s = sigma1^(1/2): two symmetric eigendecompositions,
    exact for singular covariances too (pytorch-fid's general ``sqrtm`` takes minutes at D = 2048 and needs an eps
    on the diagonals when the covariances are singular)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"means {mu1.shape}, {mu2.shape} and covariances {sigma1.shape}, {sigma2.shape} "
                         "must be (D,) and (D, D)")
    root = _psd_sqrt(sigma1)
    inner = root @ sigma2 @ root
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


class FeatureMoments:
    """Running mean and covariance of feature rows, summed in float64 on the features' device."""

    def __init__(self):
        self.count = 0
        self.total = self.outer = None

    def update(self, features: torch.Tensor) -> None:
        """features: (N, D)."""
        f = features.detach().double()
        if self.total is None:
            self.total, self.outer = f.sum(dim=0), f.T @ f
        else:
            self.total += f.sum(dim=0)
            self.outer += f.T @ f
        self.count += f.shape[0]

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(D,) mean and (D, D) unbiased covariance of every row seen."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, got {self.count}")
        mean = self.total / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean.cpu().numpy(), cov.cpu().numpy()


class ReconstructionFID:
    """rFID between every real and every reconstructed image given to `update`, with any feature network
    (B, 3, H, W) -> (B, D) (FIDInception for reported numbers). Images are used as given: ReconstructionMetrics
    quantises them to the uint8 grid first, as DC-AE's evaluator does."""

    def __init__(self, features: nn.Module):
        self.features = features
        self.real, self.recon = FeatureMoments(), FeatureMoments()

    @torch.no_grad()
    def update(self, real: torch.Tensor, recon: torch.Tensor) -> None:
        """real, recon: (B, 3, H, W) in [-1, 1]."""
        self.real.update(self.features(real))
        self.recon.update(self.features(recon))

    def compute(self) -> float:
        return frechet_distance(*self.recon.mean_cov(), *self.real.mean_cov())
