"""The DC-AE model family: presets, parameter counts, shapes, input checks, scaling factor."""
import dataclasses

import pytest
import torch

from dcae import DCAE, PRESETS, DCAEConfig, estimate_scaling_factor, get_config

# Exact counts from the reference table (BatchNorm running buffers excluded).
PARAMS = {
    "dc-ae-f32c32-in-1.0": 323_356_460,
    "dc-ae-f32c32-mix-1.0": 323_356_460,
    "dc-ae-f64c128-in-1.0": 676_896_140,
    "dc-ae-f128c512-in-1.0": 1_120_682_252,
    "dc-ae-f32c32-sana-1.0": 312_250_275,
}


def _meta_model(name):
    with torch.device("meta"):
        return DCAE.from_config(name)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count(name):
    assert sum(p.numel() for p in _meta_model(name).parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_ratio_and_latent_shape(name):
    cfg = PRESETS[name]
    model = _meta_model(name)
    assert model.spatial_compression_ratio == 2 ** (cfg.num_stages - 1) == cfg.spatial_compression_ratio
    assert model.scaling_factor == cfg.scaling_factor


@pytest.mark.parametrize("name", ["tiny-f32c8", "tiny-sana-f32c8", "tiny-f128c16"])
def test_encode_decode_shapes(name):
    torch.manual_seed(0)
    model = DCAE.from_config(name).eval()
    r = model.spatial_compression_ratio
    x = torch.rand(2, 3, 2 * r, 3 * r) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        y = model.decode(z)
    assert z.shape == (2, model.config.latent_channels, 2, 3)
    assert y.shape == x.shape and torch.isfinite(y).all()
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = DCAE.from_config("tiny-sana-f32c8")
    model(torch.rand(1, 3, 64, 64) * 2 - 1).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def test_config_round_trip_and_validation():
    cfg = PRESETS["dc-ae-f32c32-sana-1.0"]
    assert DCAEConfig.from_dict(cfg.to_dict()) == cfg
    assert get_config(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown DC-AE preset"):
        get_config("dc-ae-f999")
    with pytest.raises(ValueError, match="one per stage"):
        dataclasses.replace(cfg, decoder_depths=(1, 1))
    with pytest.raises(ValueError, match="attention_head_dim"):
        dataclasses.replace(cfg, encoder_widths=(128, 256, 512, 500, 1024, 1024))
    with pytest.raises(ValueError, match="decoder_norms"):
        dataclasses.replace(cfg, decoder_norms=("layer_norm",) * 6)
    with pytest.raises(ValueError, match="unknown DCAEConfig fields"):
        DCAEConfig.from_dict({**cfg.to_dict(), "widths": 3})


def test_bad_inputs():
    model = DCAE.from_config("tiny-f32c8")
    with pytest.raises(ValueError, match="multiples of 32"):
        model.encode(torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError, match="3 channels"):
        model.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model.encode(torch.zeros(3, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        model.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="8 channels"):
        model.decode(torch.zeros(1, 4, 2, 2))


def test_estimate_scaling_factor():
    torch.manual_seed(0)
    model = DCAE.from_config("tiny-f32c8").eval()
    images = torch.rand(5, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = model.encode(images)
    expected = 1 / z.double().square().mean().sqrt().item()
    assert estimate_scaling_factor(model, images, batch_size=2) == pytest.approx(expected, rel=1e-6)
    loader = [(images[:3], None), (images[3:], None)]
    assert estimate_scaling_factor(model, loader) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="at least one image"):
        estimate_scaling_factor(model, [])


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while ``fn`` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_gradient_checkpointing_same_gradients_less_memory():
    torch.manual_seed(0)
    model = DCAE.from_config("tiny-sana-f32c8")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    grads = []
    for enabled in (False, True):
        model.enable_gradient_checkpointing(enabled)
        model.zero_grad()
        saved = _saved_bytes(lambda: model(x).square().mean().backward())
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters()}, saved))
    (plain, plain_saved), (ckpt, ckpt_saved) = grads
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)
    assert ckpt_saved < plain_saved / 2


def test_gradient_checkpointing_skips_training_batchnorm():
    model = DCAE.from_config("tiny-f32c8").train()
    model.enable_gradient_checkpointing()
    bn = next(m for m in model.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    model(torch.rand(1, 3, 64, 64)).mean().backward()
    assert bn.num_batches_tracked.item() == 1  # its stage was not recomputed


@pytest.mark.parametrize("tile", [None, 32])
def test_autocast_decode_of_fp32_latents(tile):
    """Under autocast the convs run in bf16 while the given latents are fp32: the shortcuts follow the convs."""
    model = DCAE.from_config("tiny-f32c8").eval()
    z = torch.randn(1, 8, 2, 2)
    with torch.no_grad():
        expected = model.decode(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model.decode(z, tile_size=tile)
            latents = model.encode(torch.rand(1, 3, 64, 64))
    assert y.dtype == latents.dtype == torch.bfloat16
    assert (y.float() - expected).abs().max() < 0.1 * expected.abs().max()
