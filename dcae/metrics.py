"""Reconstruction metrics computed the way DC-AE's evaluator does: images in [-1, 1] are quantised to uint8
first; PSNR on those with peak 255; SSIM with an 11x11 gaussian window (sigma 1.5) averaged over the valid
region; LPIPS and rFID on the quantised images."""
import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dcae.fid import FIDInception, ReconstructionFID
from dcae.lpips import LPIPS

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): the 11-tap window of Wang et al. 2004, as skimage and torchmetrics
SSIM_K1, SSIM_K2 = 0.01, 0.03
PEAK = 255.0


def check_image_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    """``a`` and ``b`` are float image batches (B, 3, H, W) of one shape, on one device."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor (B, 3, H, W) in [-1, 1], got {getattr(t, 'dtype', t)}")
        if t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(t.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}: put both on one device")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [-1, 1] -> uint8 (B, 3, H, W): clamp(floor(127.5 (x + 1) + 0.5), 0, 255).

    Rounds half up, as DC-AE's evaluator and torchvision's save_image do."""
    return (127.5 * (x.float() + 1) + 0.5).clamp(0, 255).to(torch.uint8)


def quantise(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [-1, 1] -> float32 in [-1, 1] on the uint8 grid: to_uint8(x) / 127.5 - 1."""
    return to_uint8(x).float() / 127.5 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b: (B, 3, H, W) in [-1, 1] -> (B,) float64 dB: 10 log10(255^2 / mse) of the uint8 images.

    Identical images give inf."""
    check_image_pair(a, b)
    diff = to_uint8(a).double() - to_uint8(b).double()
    mse = diff.square().mean(dim=(1, 2, 3))
    return 10 * torch.log10(PEAK**2 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """(11,) float64 normalised gaussian taps, sigma 1.5."""
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    w = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return w / w.sum()


def _blur_valid(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H - 10, W - 10): the separable gaussian, depthwise, valid positions only."""
    c = x.shape[1]
    x = F.conv2d(x, window.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, window.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b: (B, 3, H, W) in [-1, 1], H, W >= 11 -> (B,) float64 SSIM of the uint8 images.

    Gaussian-weighted local means, population (co)variances, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2; the
    SSIM map is averaged over channels and the positions where the window fits, as skimage and torchmetrics
    before its PR 2721 (Sep 2024) do. Later torchmetrics average the reflect-padded full map instead."""
    check_image_pair(a, b)
    if min(a.shape[-2:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"ssim needs H, W >= {2 * SSIM_RADIUS + 1}, got {tuple(a.shape[-2:])}")
    x, y = to_uint8(a).double(), to_uint8(b).double()
    window = _gaussian_window(x.device)
    mu_x, mu_y, xx, yy, xy = _blur_valid(torch.cat([x, y, x * x, y * y, x * y]), window).chunk(5)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))


class ReconstructionMetrics:
    """Means over every image seen of PSNR, SSIM and, when the network is given, LPIPS; rFID over the set.

    LPIPS here is the VGG variant (the training loss); DC-AE's published LPIPS numbers use torchmetrics'
    default AlexNet variant, so the two are not comparable."""

    def __init__(self, lpips: LPIPS | None = None, inception: FIDInception | None = None):
        self.lpips = lpips
        self.rfid = None if inception is None else ReconstructionFID(inception)
        self.count = 0
        self.sums = {"psnr": 0.0, "ssim": 0.0} | ({} if lpips is None else {"lpips": 0.0})

    @torch.no_grad()
    def update(self, real: torch.Tensor, recon: torch.Tensor) -> None:
        """real, recon: (B, 3, H, W) in [-1, 1]."""
        self.sums["psnr"] += psnr(real, recon).sum().item()
        self.sums["ssim"] += ssim(real, recon).sum().item()
        if self.lpips is not None or self.rfid is not None:
            real, recon = quantise(real), quantise(recon)
        if self.lpips is not None:
            self.sums["lpips"] += self.lpips(real, recon).double().sum().item()
        if self.rfid is not None:
            self.rfid.update(real, recon)
        self.count += real.shape[0]

    def compute(self) -> dict[str, float]:
        """{"psnr", "ssim"[, "lpips"][, "rfid"]} -> mean value (rFID over all images seen)."""
        if self.count == 0:
            raise ValueError("ReconstructionMetrics.compute called before any update")
        out = {name: total / self.count for name, total in self.sums.items()}
        if self.rfid is not None:
            out["rfid"] = self.rfid.compute()
        return out



@torch.no_grad()
def evaluate_reconstructions(model, batches: Iterable[torch.Tensor], metrics: ReconstructionMetrics | None = None, *,
                             dtype: torch.dtype | None = None, tile_size: int | None = None, autocast=None,
                             progress: dict | None = None,
                             keep: int = 0) -> tuple[dict[str, float], torch.Tensor | None]:
    """The one evaluation loop (CLI ``evaluate``, the trainers, the demo): ``model.decode(model.encode(x))`` of
    every batch (B, 3, H, W) in [-1, 1], on the model's device in ``dtype`` (default: the batch's), tiled when
    ``tile_size`` is given, under ``autocast`` (a context manager) when given, scored by ``metrics`` (default:
    PSNR and SSIM) on that device. ``progress``: tqdm keyword arguments to show a bar. Returns (the metrics, the
    first ``keep`` reconstructions (keep, 3, H, W) on the CPU, or None when ``keep`` is 0)."""
    device = next(model.parameters()).device
    metrics = ReconstructionMetrics() if metrics is None else metrics
    kept: list[torch.Tensor] = []
    for x in batches if progress is None else tqdm(batches, **progress):
        x = x.to(device)
        with autocast if autocast is not None else contextlib.nullcontext():
            z = model.encode(x.to(dtype or x.dtype), tile_size=tile_size)
            recon = model.decode(z, tile_size=tile_size).float().clamp(-1, 1)
        metrics.update(x.float(), recon)
        if len(kept) < keep:
            kept.extend(recon[:keep - len(kept)].cpu())
    return metrics.compute(), torch.stack(kept) if kept else None
