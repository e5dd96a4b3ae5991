"""Config and key conversion: diffusers' AutoencoderDC and the authors' efficientvit layout, both directions,
for every preset (built on the meta device: no memory)."""
import dataclasses
import inspect

import pytest
import torch

from dcae import DCAE, PRESETS
from dcae.models.convert import (AUTHORS_MODEL_NAMES, DIFFUSERS_DEFAULTS, check_authors_expressible,
                                 config_from_diffusers, config_to_diffusers, guess_layout, infer_preset,
                                 is_optional, key_map, preset_name)
from dcae.weights import check_state_dict

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderDC  # noqa: E402
from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers  # noqa: E402

# As published in the hub's dc-ae-f32c32-sana-1.0-diffusers config.json (scalar norm/act, "Conv" downsample).
SANA_HUB_CONFIG = {
    "_class_name": "AutoencoderDC", "_diffusers_version": "0.32.0", "attention_head_dim": 32,
    "decoder_act_fns": "silu", "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3], "decoder_norm_types": "rms_norm",
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]], "downsample_block_type": "Conv",
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3], "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "in_channels": 3, "latent_channels": 32, "scaling_factor": 0.41407, "upsample_block_type": "interpolate",
}


def meta_state_dict(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_diffusers_defaults_are_autoencoderdc_defaults():
    params = inspect.signature(AutoencoderDC.__init__).parameters
    assert {k: p.default for k, p in params.items() if k != "self"} == DIFFUSERS_DEFAULTS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_diffusers_config_and_keys_round_trip(name):
    cfg = PRESETS[name]
    kwargs = config_to_diffusers(cfg)
    assert config_from_diffusers(kwargs) == cfg
    with torch.device("meta"):
        theirs = AutoencoderDC(**kwargs)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == key_map(DCAE, cfg, "diffusers").their_shapes


def test_hub_configs_give_the_presets():
    assert config_from_diffusers(SANA_HUB_CONFIG) == PRESETS["dc-ae-f32c32-sana-1.0"]
    in_layout = {**config_to_diffusers("dc-ae-f32c32-in-1.0"), "decoder_act_fns": ["relu"] * 3 + ["swish"] * 3}
    assert config_from_diffusers(in_layout) == PRESETS["dc-ae-f32c32-in-1.0"]


def test_diffusers_defaults_and_scalar_forms():
    cfg = config_from_diffusers({"_class_name": "AutoencoderDC"})
    assert cfg.encoder_widths == DIFFUSERS_DEFAULTS["encoder_block_out_channels"]
    assert cfg.encoder_block_types == ("ResBlock",) * 6 and cfg.decoder_depths == (3,) * 6
    assert cfg.encoder_norms == ("rms_norm",) * 6 and cfg.encoder_acts == ("silu",) * 6
    assert cfg.downsample_block_type == "pixel_unshuffle" and cfg.upsample_block_type == "pixel_shuffle"
    cfg = config_from_diffusers({"decoder_act_fns": "SWISH", "decoder_norm_types": "batch_norm",
                                 "decoder_conv_act_fn": "silu", "downsample_block_type": "conv"})
    assert cfg.decoder_acts == ("silu",) * 6 and cfg.decoder_norms == ("batch_norm",) * 6
    assert cfg.decoder_out_act == "silu" and cfg.downsample_block_type == "conv"


@pytest.mark.parametrize("change, match", [
    ({"decoder_act_fns": "mish"}, "activation 'mish'"),
    ({"decoder_conv_act_fn": "relu6"}, "decoder_conv_act_fn"),
    ({"decoder_norm_types": "layer_norm"}, "decoder_norm_types"),
    ({"encoder_block_types": "ViTBlock"}, "encoder_block_types"),
])
def test_diffusers_settings_we_cannot_express_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        config_from_diffusers(change)


def test_unknown_diffusers_keys_warn():
    with pytest.warns(UserWarning, match="block_out_channels"):
        config_from_diffusers({"block_out_channels": [128, 256, 512, 512, 1024, 1024]})


@pytest.mark.parametrize("change, match", [
    ({"decoder_acts": ("relu6",) * 6}, "relu6"),
    ({"encoder_norms": ("batch_norm",) * 6}, "rms_norm \\+ silu"),
    ({"encoder_acts": ("gelu",) * 6}, "rms_norm \\+ silu"),
])
def test_configs_diffusers_cannot_express_are_refused(change, match):
    cfg = dataclasses.replace(PRESETS["tiny-f32c8"], **change)
    with pytest.raises(ValueError, match=match):
        config_to_diffusers(cfg)


def test_diffusers_state_dict_round_trip_is_exact():
    torch.manual_seed(0)
    cfg = PRESETS["tiny-sana-f32c8"]
    ours = DCAE(cfg).state_dict()
    theirs = key_map(DCAE, cfg, "diffusers").to_theirs(ours)
    assert theirs["encoder.down_blocks.3.0.attn.to_q.weight"].shape == (64, 64)
    torch.testing.assert_close(torch.cat([theirs[f"decoder.up_blocks.4.1.attn.to_{x}.weight"] for x in "qkv"]),
                               ours["decoder.up_blocks.4.1.attn.qkv.weight"].flatten(1), rtol=0, atol=0)
    AutoencoderDC(**config_to_diffusers(cfg)).load_state_dict(theirs, strict=True)
    back = key_map(DCAE, cfg, "diffusers").to_ours(theirs)
    assert back.keys() == ours.keys()
    for k in ours:
        torch.testing.assert_close(back[k], ours[k], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_authors_keys_cover_every_key_and_match_diffusers_converter(name):
    """Ours -> authors' names (ours) -> diffusers' own converter of the authors' checkpoints -> exactly
    diffusers' keys and shapes; and back to ours."""
    cfg = PRESETS[name]
    authors = key_map(DCAE, cfg, "authors")
    assert len(authors.their_shapes) == len(authors.shapes)  # one-to-one: no two keys share a name
    sd = meta_state_dict(authors.their_shapes)
    converted = convert_autoencoder_dc_checkpoint_to_diffusers(dict(sd))
    assert {k: v.shape for k, v in converted.items()} == key_map(DCAE, cfg, "diffusers").their_shapes
    back = authors.to_ours(sd)
    assert {k: v.shape for k, v in back.items()} == authors.shapes
    assert authors.to_theirs(back).keys() == sd.keys()


def test_authors_key_names():
    """Spot checks of efficientvit's module tree: ResidualBlock.main, ConvLayer.conv/.norm, OpSequential.op_list."""
    f32 = key_map(DCAE, "dc-ae-f32c32-in-1.0", "authors").their_shapes
    for key in ("encoder.project_in.conv.conv.weight",  # ConvPixelUnshuffleDownSampleLayer.conv (a ConvLayer)
                "encoder.stages.1.op_list.0.main.conv1.conv.bias",
                "encoder.stages.1.op_list.0.main.conv2.norm.weight",
                "encoder.stages.1.op_list.4.main.conv.conv.weight",  # the stage's downsample
                "encoder.stages.3.op_list.1.context_module.main.qkv.conv.weight",
                "encoder.stages.3.op_list.1.context_module.main.proj.norm.bias",
                "encoder.stages.5.op_list.1.local_module.main.point_conv.norm.weight",
                "encoder.project_out.main.op_list.0.conv.weight",
                "decoder.project_in.main.conv.weight",
                "decoder.stages.1.op_list.0.main.conv.conv.bias",  # diffusers' detection key for these checkpoints
                "decoder.stages.1.op_list.5.main.conv2.norm.running_var",
                "decoder.stages.1.op_list.5.main.conv2.norm.num_batches_tracked",
                "decoder.project_out.op_list.0.weight",
                "decoder.project_out.op_list.2.conv.conv.weight"):
        assert key in f32, key
    assert f32["encoder.stages.3.op_list.1.context_module.main.qkv.conv.weight"] == (1536, 512, 1, 1)
    sana = key_map(DCAE, "dc-ae-f32c32-sana-1.0", "authors").their_shapes
    for key in ("encoder.project_in.conv.bias",  # diffusers' detection key for the sana checkpoint
                "encoder.stages.0.op_list.2.main.conv.weight",  # stride-2 "Conv" downsample: a ConvLayer
                "encoder.stages.3.op_list.0.context_module.main.aggreg.0.0.weight",
                "encoder.stages.3.op_list.0.context_module.main.aggreg.0.1.weight",
                "decoder.stages.4.op_list.0.main.conv.conv.weight",  # InterpolateConvUpSampleLayer.conv
                "decoder.project_out.op_list.2.conv.weight"):
        assert key in sana, key
    assert sana["encoder.stages.3.op_list.0.context_module.main.proj.conv.weight"] == (512, 1024, 1, 1)


@pytest.mark.parametrize("change, match", [
    ({"attention_head_dim": 16}, "attention_head_dim"),
    ({"decoder_norms": ("batch_norm",) * 6}, "EfficientViTBlock with batch_norm"),
    ({"encoder_qkv_multiscales": ((),) * 3 + ((3, 5),) * 3}, "multiscales"),
    ({"decoder_acts": ("gelu",) * 6}, "gelu"),
])
def test_configs_the_authors_cannot_express_are_refused(change, match):
    cfg = dataclasses.replace(PRESETS["tiny-f32c8"], **change)
    with pytest.raises(ValueError, match=match):
        check_authors_expressible(cfg)
    with pytest.raises(ValueError, match=match):
        key_map(DCAE, cfg, "authors")


def test_preset_names():
    assert set(AUTHORS_MODEL_NAMES) == {n for n in PRESETS if n.startswith("dc-ae-")}
    assert preset_name("mit-han-lab/dc-ae-f64c128-mix-1.0-diffusers") == "dc-ae-f64c128-mix-1.0"
    assert preset_name("dc-ae-f32c32-sana-1.1") == "dc-ae-f32c32-sana-1.1"
    with pytest.raises(ValueError, match="unknown DC-AE model"):
        preset_name("dc-ae-f16c4")


def test_check_state_dict_lists_every_problem():
    expected = {f"w{i}": torch.Size([2]) for i in range(30)}
    given = {**{f"w{i}": torch.zeros(2) for i in range(5, 30)}, "w7": torch.zeros(3), "extra": torch.zeros(1)}
    with pytest.raises(ValueError) as info:
        check_state_dict(given, expected, "ckpt", optional=is_optional, limit=3)
    msg = str(info.value)
    assert "5 missing, 1 unexpected, 1 mis-shaped" in msg
    assert "w0\n    w1\n    w2\n    ... and 2 more" in msg and "extra" in msg and "w7: (3,), expected (2,)" in msg
    # optional keys may be absent
    check_state_dict({}, {"bn.num_batches_tracked": torch.Size([])}, "ckpt", optional=is_optional)


def test_layout_and_preset_inference():
    for name in ("tiny-f32c8", "tiny-sana-f32c8", "tiny-f128c16"):
        for layout in ("dcae", "diffusers", "authors"):
            sd = meta_state_dict(key_map(DCAE, name, layout).their_shapes)
            assert guess_layout(sd) == layout
            assert infer_preset(DCAE, sd, layout) == name
    sd = meta_state_dict(key_map(DCAE, "dc-ae-f32c32-in-1.0", "authors").their_shapes)
    with pytest.raises(ValueError, match=r"dc-ae-f32c32-in-1.0', 'dc-ae-f32c32-mix-1.0'.*scaling_factor"):
        infer_preset(DCAE, sd, "authors")
    sd.pop("decoder.project_out.op_list.0.bias")
    with pytest.raises(ValueError, match="fit no preset"):
        infer_preset(DCAE, sd, "authors")
