"""DiT / U-ViT configs as data: presets on DC-AE latents, JSON round trip, validation, parameter counts (meta)."""
import dataclasses
import json

import pytest
import torch

from dcae.models.dit import DiT
from dcae.models.transformer_config import (DIT_PRESETS, UVIT_PRESETS, DiTConfig, UViTConfig, get_dit_config,
                                            get_uvit_config, latent_shape_of)
from dcae.models.uvit import UViT


def trainable(cls, config) -> int:
    with torch.device("meta"):
        model = cls(config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("cls, get, name, expected", [
    (DiT, get_dit_config, "dit-xl", 674_890_048),
    (UViT, get_uvit_config, "uvit-s", 44_788_768),
    (UViT, get_uvit_config, "uvit-h", 500_868_896),
    (UViT, get_uvit_config, "uvit-2b", 1_580_396_576),
])
def test_parameter_counts_at_512px_on_dc_ae_f32c32(cls, get, name, expected):
    config = get(name, "dc-ae-f32c32-in-1.0", 512)
    assert (config.in_channels, config.latent_size, config.patch_size) == (32, (16, 16), 1)
    assert trainable(cls, config) == expected


def test_dit_position_embedding_is_a_fixed_buffer_outside_the_state_dict():
    with torch.device("meta"):
        model = DiT(get_dit_config("dit-xl"))
    assert model.pos_embed.numel() == 294_912 and "pos_embed" not in model.state_dict()
    assert all(p is not model.pos_embed for p in model.parameters())


def test_presets_match_the_papers_table_and_take_the_latents_of_a_dc_ae_preset():
    assert {k: v for k, v in DIT_PRESETS.items() if k != "dit-tiny"} == {
        "dit-s": (12, 384, 6), "dit-b": (12, 768, 12), "dit-l": (24, 1024, 16), "dit-xl": (28, 1152, 16)}
    assert {k: v for k, v in UVIT_PRESETS.items() if k != "uvit-tiny"} == {
        "uvit-s": (12, 512, 8), "uvit-m": (16, 768, 12), "uvit-l": (20, 1024, 16), "uvit-h": (28, 1152, 16),
        "uvit-2b": (28, 2048, 32)}
    dit = get_dit_config("dit-xl")
    assert (dit.depth, dit.hidden_size, dit.num_heads, dit.learn_sigma, dit.qkv_bias, dit.num_classes) == \
        (28, 1152, 16, True, True, 1000)
    uvit = get_uvit_config("uvit-h", "dc-ae-f64c128-in-1.0", 512)
    assert (uvit.in_channels, uvit.latent_size, uvit.qkv_bias, uvit.learn_sigma) == (128, (8, 8), False, False)
    sd_vae = get_dit_config("dit-xl", latent_shape=(4, 64, 64), patch_size=2)
    assert (sd_vae.grid, sd_vae.num_patches, sd_vae.out_channels) == ((32, 32), 1024, 8)
    assert latent_shape_of("tiny-f32c8", 128) == (8, 4, 4)
    for tiny in (get_dit_config("dit-tiny"), get_uvit_config("uvit-tiny")):
        assert (tiny.in_channels, tiny.latent_size, tiny.num_classes) == (8, (8, 8), 10)
        assert tiny.depth <= 6 and tiny.hidden_size <= 128


@pytest.mark.parametrize("config", [
    get_dit_config("dit-b", attention="linear", ffn="glumbconv", latent_size=(16, 8), patch_size=2),
    get_uvit_config("uvit-tiny", learn_sigma=True, class_dropout_prob=0.15),
])
def test_json_round_trip(config):
    back = type(config).from_dict(json.loads(config.to_json()))
    assert back == config and isinstance(back.latent_size, tuple)


def test_defaults_by_ffn_and_attention():
    config = get_dit_config("dit-b", attention="linear", ffn="glumbconv")
    assert config.mlp_ratio == 2.5 and config.heads == 768 // 32 and config.mlp_hidden == 1920
    assert get_dit_config("dit-b").mlp_ratio == 4.0 and get_dit_config("dit-b").heads == 12
    assert DiTConfig(latent_size=4, in_channels=8, hidden_size=64, depth=1, num_heads=2).latent_size == (4, 4)


@pytest.mark.parametrize("fields, message", [
    (dict(attention="flash"), "attention must be one of"),
    (dict(ffn="swiglu"), "ffn must be one of"),
    (dict(patch_size=3), "divisible by patch_size"),
    (dict(num_heads=5), "divisible by num_heads 5"),
    (dict(attention="linear", linear_head_dim=48), "divisible by linear_head_dim 48"),
    (dict(class_dropout_prob=1.0), "class_dropout_prob"),
    (dict(num_classes=0), "num_classes must be an int >= 1"),
    (dict(latent_size=(8, 0)), "latent_size"),
    (dict(timestep_freq_shift=2), "timestep_freq_shift"),
])
def test_invalid_configs_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        get_dit_config("dit-tiny", **fields)


def test_lookup_errors():
    with pytest.raises(ValueError, match="unknown DiT preset 'dit-xxl'"):
        get_dit_config("dit-xxl")
    with pytest.raises(ValueError, match="unknown UViTConfig fields"):
        UViTConfig.from_dict({**get_uvit_config("uvit-tiny").to_dict(), "conv": True})
    with pytest.raises(ValueError, match="either latent_shape or autoencoder"):
        get_dit_config("dit-xl", "dc-ae-f32c32-in-1.0", latent_shape=(4, 64, 64))
    with pytest.raises(ValueError, match="not a multiple"):
        get_uvit_config("uvit-s", "dc-ae-f32c32-in-1.0", 500)
    with pytest.raises(TypeError, match="expected a DiTConfig"):
        get_dit_config(get_uvit_config("uvit-tiny"))
    config = get_uvit_config("uvit-tiny")
    assert get_uvit_config(config) is config and get_uvit_config(config.to_dict()) == config
    assert get_uvit_config(config, depth=6) == dataclasses.replace(config, depth=6)
