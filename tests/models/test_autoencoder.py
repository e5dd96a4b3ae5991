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


@pytest.mark.parametrize("direction", ["encode", "decode"])
@pytest.mark.parametrize("tile", [None, 64])
def test_empty_batch(direction, tile):
    model = DCAE.from_config("tiny-f32c8").eval()
    with torch.no_grad():
        if direction == "encode":
            assert model.encode(torch.zeros(0, 3, 64, 96), tile_size=tile).shape == (0, 8, 2, 3)
        else:
            assert model.decode(torch.zeros(0, 8, 2, 3), tile_size=tile).shape == (0, 3, 64, 96)


@pytest.mark.parametrize("name", ["tiny-f32c8", "tiny-sana-f32c8", "dc-ae-f64c128-in-1.0"])
def test_parts_cover_every_parameter_once_in_forward_order(name):
    model = _meta_model(name)
    parts = model.parts()
    n = model.config.num_stages
    assert list(parts) == (["encoder.in", *(f"encoder.stages.{i}" for i in range(n)), "encoder.out", "decoder.in",
                            *(f"decoder.stages.{i}" for i in reversed(range(n))), "decoder.out"])
    owners = [id(p) for part in parts.values() for p in part.parameters()]
    assert len(owners) == len(set(owners)) and set(owners) == {id(p) for p in model.parameters()}
    assert set(parts.values()) >= {model.encoder.conv_in, model.encoder.conv_out, model.decoder.conv_in}
    assert [parts[f"encoder.stages.{i}"] for i in range(n)] == list(model.encoder.down_blocks)
    assert [parts[f"decoder.stages.{i}"] for i in range(n)] == list(model.decoder.up_blocks)
    assert set(parts["decoder.out"].children()) == {model.decoder.norm_out, model.decoder.conv_act,
                                                    model.decoder.conv_out}
    assert model.deepest_stage == n - 1


def test_parts_by_name_and_the_phase_stages():
    in_mix, sana = _meta_model("tiny-f32c8"), _meta_model("tiny-sana-f32c8")
    assert (in_mix.deepest_stage, in_mix.last_decoder_stage) == (5, 1)  # decoder stage 0 is empty
    assert (sana.deepest_stage, sana.last_decoder_stage) == (5, 0)
    chosen = in_mix.parts(["decoder.out", "encoder.stages.5"])
    assert list(chosen) == ["decoder.out", "encoder.stages.5"]
    assert chosen["encoder.stages.5"] is in_mix.encoder.down_blocks[5]
    with pytest.raises(ValueError, match=r"unknown DC-AE parts \['decoder.stages.6'\]"):
        in_mix.parts(["decoder.stages.6"])
    with pytest.raises(TypeError, match="iterable of part names"):
        in_mix.parts("decoder.out")


@pytest.mark.parametrize("layout", [
    "tiny-f32c8",  # decoder stage 0 empty: the output is an UpBlock (3x3 conv then pixel_shuffle)
    "tiny-sana-f32c8",  # stage 0 has blocks: the output is a plain 3x3 conv
    "interpolate-upblock",  # stage 0 empty and nearest x2 upsampling: the UpBlock's conv runs after interpolating
])
def test_last_layer_weight_is_the_last_conv_the_decoder_runs(layout):
    if layout == "interpolate-upblock":
        cfg = dataclasses.replace(PRESETS["tiny-f32c8"], upsample_block_type="interpolate")
    else:
        cfg = PRESETS[layout]
    model = DCAE.from_config(cfg).eval()
    convs = []
    handles = [m.register_forward_hook(lambda m, *_: convs.append(m)) for m in model.decoder.modules()
               if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.decode(torch.zeros(1, 8, 1, 1))
    for h in handles:
        h.remove()
    assert model.last_layer_weight is convs[-1].weight
    assert isinstance(model.last_layer_weight, torch.nn.Parameter) and model.last_layer_weight.shape[0] in (3, 12)
