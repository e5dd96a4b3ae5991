"""PSNR and SSIM against scikit-image on the uint8 images, quantisation as DC-AE's evaluator, the accumulator."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.datasets import load_sample_image

from dcae.fid import ReconstructionFID
from dcae.lpips import LPIPS
from dcae.metrics import ReconstructionMetrics, psnr, quantise, ssim, to_uint8

# Both sides compute in float64 on the same uint8 images: only summation order differs.
RTOL, ATOL = 1e-10, 1e-12


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1], which to_uint8 maps back to ``images``."""
    return torch.from_numpy(images.copy()).permute(0, 3, 1, 2).double() / 127.5 - 1


def skimage_psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return np.array([peak_signal_noise_ratio(x, y, data_range=255)
                     for x, y in zip(to_uint8(a).numpy(), to_uint8(b).numpy())])


def skimage_ssim(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return np.array([structural_similarity(x, y, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, data_range=255)
                     for x, y in zip(to_uint8(a).numpy(), to_uint8(b).numpy())])


def degraded(images: np.ndarray, seed: int) -> np.ndarray:
    """A stand-in reconstruction: noise, and a darker band."""
    rng = np.random.default_rng(seed)
    out = images.astype(np.float64) + rng.normal(0, 6, images.shape)
    out[:, : images.shape[1] // 4] *= 0.8
    return out.round().clip(0, 255).astype(np.uint8)


def test_to_uint8_is_the_evaluators_rounding():
    x = torch.randn(2, 3, 16, 16) * 0.7  # some values outside [-1, 1]
    expected = (255 * ((x + 1) / 2) + 0.5).clamp(0, 255).to(torch.uint8)  # DC-AE's evaluator
    assert torch.equal(to_uint8(x), expected)
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(to_uint8(levels.double() / 127.5 - 1), levels)
    assert to_uint8(torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5]).view(1, 1, 1, 5)).flatten().tolist() == \
        [0, 0, 128, 255, 255]
    torch.testing.assert_close(quantise(x), to_uint8(x).float() / 127.5 - 1)


@pytest.mark.parametrize("shape", [(3, 3, 11, 11), (2, 3, 37, 53)])
def test_random_images_match_skimage(shape):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(shape, generator=g) * 2.2 - 1.1
    b = (a + 0.2 * torch.randn(shape, generator=g)).float()
    np.testing.assert_allclose(psnr(a, b).numpy(), skimage_psnr(a, b), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ssim(a, b).numpy(), skimage_ssim(a, b), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("image", [data.astronaut()[:256, 128:384], load_sample_image("china.jpg")[100:301, :203],
                                   load_sample_image("flower.jpg")[150:350, 200:500]],
                         ids=["astronaut", "china", "flower"])
def test_real_images_match_skimage(image):
    real = from_uint8(image[None])
    recon = from_uint8(degraded(image[None], seed=1))
    np.testing.assert_allclose(psnr(real, recon).numpy(), skimage_psnr(real, recon), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ssim(real, recon).numpy(), skimage_ssim(real, recon), rtol=RTOL, atol=ATOL)
    assert 0.3 < ssim(real, recon).item() < 0.99


def test_identical_images():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.isinf(psnr(x, x)).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_bad_inputs_are_refused():
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="one shape"):
        psnr(x, torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ssim(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16))
    with pytest.raises(TypeError, match="float tensor"):
        psnr(x.to(torch.uint8), x)
    with pytest.raises(ValueError, match="H, W >= 11"):
        ssim(torch.zeros(1, 3, 10, 32), torch.zeros(1, 3, 10, 32))


def test_reconstruction_metrics_are_means_over_all_images():
    torch.manual_seed(0)
    lpips = LPIPS()
    features = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # a stand-in for the Inception: (B, 3)
    metrics = ReconstructionMetrics(lpips=lpips, inception=features)
    batches = [(torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1) for _ in range(3)]
    for real, recon in batches:
        metrics.update(real, recon)
    real, recon = (torch.cat(t) for t in zip(*batches))
    rfid = ReconstructionFID(features)
    rfid.update(quantise(real), quantise(recon))
    expected = {"psnr": psnr(real, recon).mean().item(), "ssim": ssim(real, recon).mean().item(),
                "lpips": lpips(quantise(real), quantise(recon)).mean().item(), "rfid": rfid.compute()}
    got = metrics.compute()
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-5), name


def test_reconstruction_metrics_without_networks():
    metrics = ReconstructionMetrics()
    with pytest.raises(ValueError, match="before any update"):
        metrics.compute()
    metrics.update(torch.zeros(1, 3, 16, 16), torch.full((1, 3, 16, 16), 0.5))
    assert set(metrics.compute()) == {"psnr", "ssim"}
