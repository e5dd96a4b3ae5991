"""DCAEConfig validation: every field checked on construction, junk from dicts and JSON (ours and diffusers')
refused with a ValueError naming the field, never another exception."""
import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcae.models.config import MAX_DEPTH, MAX_WIDTH, PRESETS, ConfigError, DCAEConfig
from dcae.models.convert import config_from_diffusers, config_to_diffusers

TINY = PRESETS["tiny-f32c8"]


@pytest.mark.parametrize("change, field", [
    ({"latent_channels": 0}, "latent_channels"),
    ({"latent_channels": 3}, "latent_channels"),  # does not divide the last width
    ({"latent_channels": True}, "latent_channels"),
    ({"attention_head_dim": 0}, "attention_head_dim"),
    ({"attention_head_dim": 12.0}, "attention_head_dim"),
    ({"in_channels": -3}, "in_channels"),
    ({"encoder_widths": (16, 32, 64, 64, 64, 10**12)}, "encoder_widths"),
    ({"encoder_widths": (16, 32, 64, 64, 64, MAX_WIDTH + 64)}, "encoder_widths"),
    ({"decoder_widths": (16, 32, 64, 64, 64, "64")}, "decoder_widths"),
    ({"encoder_widths": "abcdef"}, "encoder_widths"),
    ({"encoder_widths": ()}, "encoder_widths"),
    ({"encoder_widths": (16, 32, 48, 64, 64, 64)}, "encoder_widths"),  # 4 * 32 = 128 is not a multiple of 48
    ({"decoder_depths": (0, 1, 0, 1, 1, 1)}, "decoder_depths"),  # an inner stage without blocks
    ({"encoder_depths": (0, 1, 1, 1, 1, MAX_DEPTH + 1)}, "encoder_depths"),
    ({"encoder_depths": (0, 1, 1, 1, 1, -1)}, "encoder_depths"),
    ({"encoder_block_types": ("ResBlock",) * 5 + (["ResBlock"],)}, "encoder_block_types"),
    ({"decoder_acts": ("silu",) * 5 + (None,)}, "decoder_acts"),
    ({"encoder_qkv_multiscales": (1, 2, 3, 4, 5, 6)}, "encoder_qkv_multiscales"),
    ({"decoder_qkv_multiscales": ((),) * 5 + ((4,),)}, "decoder_qkv_multiscales"),  # even kernel
    ({"downsample_block_type": ["conv"]}, "downsample_block_type"),
    ({"decoder_out_act": "tanh"}, "decoder_out_act"),
    ({"encoder_out_shortcut": "yes"}, "encoder_out_shortcut"),
    ({"scaling_factor": "x"}, "scaling_factor"),
    ({"scaling_factor": math.nan}, "scaling_factor"),
    ({"scaling_factor": math.inf}, "scaling_factor"),
    ({"scaling_factor": 0.0}, "scaling_factor"),
    ({"scaling_factor": True}, "scaling_factor"),
])
def test_bad_fields_are_refused_by_name(change, field):
    with pytest.raises(ConfigError, match=f"^{field}: ") as info:
        dataclasses.replace(TINY, **change)
    assert info.value.field == field and isinstance(info.value, ValueError)


def test_json_forms_are_accepted():
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.to_dict().items()}
    d["encoder_qkv_multiscales"] = [list(s) for s in d["encoder_qkv_multiscales"]]
    d["scaling_factor"] = 1
    cfg = DCAEConfig.from_dict(d)
    assert cfg == TINY and isinstance(cfg.scaling_factor, float)
    assert all(DCAEConfig.from_dict(p.to_dict()) == p for p in PRESETS.values())


@pytest.mark.parametrize("d, match", [
    ([1, 2], "dict of its fields"),
    ({"encoder_widths": [16, 32]}, "missing DCAEConfig fields"),
    ({**TINY.to_dict(), "widths": 3}, "unknown DCAEConfig fields"),
])
def test_from_dict_refuses_bad_dicts(d, match):
    with pytest.raises(ValueError, match=match):
        DCAEConfig.from_dict(d)


@pytest.mark.parametrize("change, key", [
    ({"latent_channels": 0}, "latent_channels"),
    ({"encoder_block_out_channels": 5}, "encoder_block_out_channels"),
    ({"decoder_layers_per_block": [3, 3, 3, 3, 3, 10**9]}, "decoder_layers_per_block"),
    ({"encoder_qkv_multiscales": [1, 2, 3, 4, 5, 6]}, "encoder_qkv_multiscales"),
    ({"decoder_act_fns": [1] * 6}, "decoder_act_fns"),
    ({"decoder_norm_types": {"a": 1}}, "decoder_norm_types"),
    ({"encoder_block_types": [["ResBlock"]] * 6}, "encoder_block_types"),
    ({"scaling_factor": "x"}, "scaling_factor"),
    ({"decoder_in_shortcut": None}, "decoder_in_shortcut"),
])
def test_bad_diffusers_configs_are_refused_by_their_key(change, key):
    with pytest.raises(ValueError, match=f"diffusers config {key}"):
        config_from_diffusers({**config_to_diffusers(TINY), **change})


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.floats(), st.text(max_size=4),
                 st.lists(st.one_of(st.integers(-1, 70), st.text(max_size=2), st.lists(st.integers(-1, 7), max_size=2)),
                          max_size=7))


@given(field=st.sampled_from([f.name for f in dataclasses.fields(DCAEConfig)]), value=JUNK)
def test_junk_field_values_raise_only_config_errors(field, value):
    try:
        DCAEConfig.from_dict({**TINY.to_dict(), field: value})
    except ConfigError as e:
        assert e.field in {f.name for f in dataclasses.fields(DCAEConfig)}


@given(key=st.sampled_from(sorted(config_to_diffusers(TINY))), value=JUNK)
def test_junk_diffusers_values_raise_only_value_errors(key, value):
    try:
        config_from_diffusers({**config_to_diffusers(TINY), key: value})
    except ValueError as e:
        assert str(e).startswith("diffusers config ")
