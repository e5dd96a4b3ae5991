"""Parity with diffusers' AutoencoderDC: the same weights give the same latents and images (fp32, CPU).

The weights are random, with BatchNorm running statistics and every norm's weight and bias randomised so that
they matter. Image sizes are chosen so both attention paths run: latents of 2x2 (H*W <= 32: quadratic form)
and 8x6 (H*W = 48 > 32: linear form); the encoder's EfficientViT stages see 8x8, 4x4, 2x2 and 32x24, 16x12, 8x6.
"""
import pytest
import torch

import dcae_kernels
from dcae import DCAE, PRESETS
from dcae.models.convert import config_to_diffusers, key_map

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderDC  # noqa: E402

from ..random_weights import randomize_  # noqa: E402

RTOL = 1e-4
SIZES = ((2, 64, 64), (1, 256, 192))  # (batch, height, width) for the ratio-32 presets below


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_parity(ours: DCAE, theirs, sizes=SIZES):
    r, c = ours.spatial_compression_ratio, ours.config.latent_channels
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for batch, h, w in sizes:
            x = torch.rand(batch, 3, h, w, generator=g) * 2 - 1
            z = torch.randn(batch, c, h // r, w // r, generator=g)
            z_theirs, y_theirs = theirs.encode(x).latent, theirs.decode(z).sample
            assert rel_err(ours.encode(x), z_theirs) <= RTOL, (h, w)
            assert rel_err(ours.decode(z), y_theirs) <= RTOL, (h, w)


@pytest.fixture(scope="module", params=["tiny-f32c8", "tiny-sana-f32c8"])
def diffusers_folder(request, tmp_path_factory):
    """A randomly initialised AutoencoderDC of a tiny preset's architecture, saved by diffusers."""
    torch.manual_seed(0)
    model = randomize_(AutoencoderDC(**config_to_diffusers(request.param)))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder


def test_from_pretrained_matches_diffusers(diffusers_folder):
    name, theirs, folder = diffusers_folder
    ours = DCAE.from_pretrained(folder)
    assert ours.config == PRESETS[name] and not ours.training
    assert_parity(ours, theirs)


@pytest.mark.parametrize("diffusers_folder", ["tiny-f32c8"], indirect=True)
def test_triton_interpreter_matches_diffusers(diffusers_folder, monkeypatch):
    """The same, through the Triton kernels (under the interpreter on CPU): one 64x64 image, where the
    encoder's EfficientViT stages run the linear (8x8) and quadratic (4x4, 2x2) forms."""
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "auto")
    assert dcae_kernels.backend() == "triton"
    _, theirs, folder = diffusers_folder
    assert_parity(DCAE.from_pretrained(folder), theirs, sizes=((1, 64, 64),))


@pytest.fixture(scope="module")
def full_size():
    """dc-ae-f32c32-in-1.0 (323M parameters) in diffusers, and ours sharing its converted tensors."""
    cfg = PRESETS["dc-ae-f32c32-in-1.0"]
    torch.manual_seed(0)
    theirs = randomize_(AutoencoderDC(**config_to_diffusers(cfg)))
    with torch.device("meta"):
        ours = DCAE(cfg)
    ours.load_state_dict(key_map(DCAE, cfg, "diffusers").to_ours(theirs.state_dict()), assign=True)
    return ours.eval(), theirs


def test_full_size_f32c32_in_matches_diffusers(full_size):
    ours, theirs = full_size
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 323_356_460
    assert_parity(ours, theirs, sizes=((1, 64, 64),))
