"""DiT / U-ViT checkpoints: our folders (round trip, atomic), and the authors' (efficientvit's trainer checkpoints
and hub models, the original DiT's layout) with random weights saved in their key layout, run against independent
functional versions of their forwards."""
import json

import pytest
import safetensors.torch
import torch

from dcae.models.dit import DiT
from dcae.models.transformer_config import get_dit_config, get_uvit_config
from dcae.models.transformer_pretrained import config_from_hub_name
from dcae.models.transformers import load_transformer
from dcae.models.uvit import UViT

from .transformer_reference import authors_dit_state, original_dit_forward, randomize


@pytest.mark.parametrize("model", [
    pytest.param(lambda: DiT(get_dit_config("dit-tiny", attention="linear", ffn="glumbconv", patch_size=2)), id="dit"),
    pytest.param(lambda: UViT(get_uvit_config("uvit-tiny", latent_size=(8, 4), learn_sigma=True)), id="uvit"),
])
def test_our_folder_round_trips_config_and_weights(tmp_path, model):
    model = randomize(model())
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temporaries left
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["_class_name"] == type(model).__name__ and meta["_format_version"] == 1
    back = type(model).from_pretrained(tmp_path)
    assert back.config == model.config and not back.training
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    half = load_transformer(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    cfg = model.config
    x, t, y = torch.randn(1, cfg.in_channels, *cfg.latent_size), torch.tensor([9.0]), torch.tensor([2])
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-6)  # same weights
    other = UViT if isinstance(model, DiT) else DiT
    with pytest.raises(ValueError, match=f"holds a {type(model).__name__}, not a {other.__name__}"):
        other.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="do not pass config="):
        load_transformer(tmp_path, config=cfg)


@pytest.mark.parametrize("patch", [1, 2])
def test_efficientvit_dit_training_checkpoint_loads_and_matches_the_original_forward(tmp_path, patch):
    cfg = get_dit_config("dit-tiny", latent_shape=(4, 8, 8), patch_size=patch)
    state = authors_dit_state(cfg)
    # efficientvit's trainer: the trainable modules' weights under "dit.", the EMA as {decay: state dict}.
    torch.save({"state_dict": {"dit." + k: torch.zeros_like(v) for k, v in state.items()}, "global_step": 10,
                "ema": {0.9998: {"dit." + k: v for k, v in state.items()}}}, tmp_path / "checkpoint.pt")
    model = DiT.from_pretrained(tmp_path / "checkpoint.pt")
    assert model.config == cfg  # read off the shapes; the heads from dit-tiny's preset
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 800.0]), torch.tensor([9, cfg.num_classes])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), original_dit_forward(state, cfg, x, t, y), rtol=1e-5, atol=1e-5)


def test_hub_folder_layout_and_model_names(tmp_path):
    cfg = get_dit_config("dit-tiny", latent_shape=(4, 8, 8))
    state = {"diffusion_model." + k: v for k, v in authors_dit_state(cfg).items()}
    state["autoencoder.encoder.conv_in.weight"] = torch.zeros(2)
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_name": "dc-ae-f32c32-in-1.0-dit-xl-in-512px"}))
    assert DiT.from_pretrained(tmp_path, config=cfg).config == cfg
    with pytest.raises(ValueError, match="does not fit"):  # the name's DiT-XL is not what the weights hold
        DiT.from_pretrained(tmp_path)
    assert config_from_hub_name("dc-ae-f32c32-in-1.0-dit-xl-in-512px") == get_dit_config("dit-xl")
    assert config_from_hub_name("dc-ae-f64c128-in-1.0-uvit-2b-in-512px-train2000k") == get_uvit_config(
        "uvit-2b", "dc-ae-f64c128-in-1.0", 512)
    with pytest.raises(ValueError, match="unknown authors' model name"):
        config_from_hub_name("dc-ae-f32c32-in-1.0-usit-h-in-512px")


def test_authors_checkpoints_that_do_not_fit_are_refused_clearly(tmp_path):
    cfg = get_dit_config("dit-tiny", latent_shape=(4, 8, 8))
    state = authors_dit_state(cfg)
    torch.save({**state, "pos_embed": state["pos_embed"].flip(1)}, tmp_path / "shuffled.pt")
    with pytest.raises(ValueError, match="not DiT's fixed 2-D sin-cos embedding"):
        DiT.from_pretrained(tmp_path / "shuffled.pt")
    deeper = authors_dit_state(get_dit_config("dit-tiny", latent_shape=(4, 8, 8), depth=3))
    torch.save(deeper, tmp_path / "deeper.pt")
    with pytest.raises(ValueError, match="no preset has depth 3 and hidden size 64.*pass config="):
        DiT.from_pretrained(tmp_path / "deeper.pt")
    assert DiT.from_pretrained(tmp_path / "deeper.pt", config=get_dit_config(
        "dit-tiny", latent_shape=(4, 8, 8), depth=3)).config.depth == 3
    torch.save({k: v for k, v in state.items() if "blocks.1." not in k}, tmp_path / "holes.pt")
    with pytest.raises(ValueError, match=r"missing \(10\):\n    blocks.1.attn.qkv.weight"):
        DiT.from_pretrained(tmp_path / "holes.pt", config=cfg)
    with pytest.raises(FileNotFoundError):
        DiT.from_pretrained(tmp_path / "absent")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"_format": "dcae-transformer", "_format_version": 9}))
    with pytest.raises(ValueError, match="newer version or is damaged"):
        DiT.from_pretrained(tmp_path / "folder")
