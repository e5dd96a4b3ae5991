"""Our DiT against diffusers' DiTTransformer2DModel (the peer), fp32 on CPU: exported to a diffusers folder and run by
diffusers, and diffusers' own folders loaded as ours. diffusers computes two details differently from the original
DiT; our config has both as fields (timestep_freq_shift, mlp_norm_eps), the original as default."""
import json

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.utils import logging

from dcae.models.dit import DiT
from dcae.models.transformer_config import get_dit_config

from .transformer_reference import randomize

logging.set_verbosity_error()
DIFFUSERS_WAY = dict(timestep_freq_shift=1, mlp_norm_eps=1e-5)


def tiny(**fields):
    return get_dit_config("dit-tiny", latent_shape=(4, 8, 8), depth=2, learn_sigma=True, **fields)


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def batch(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(3, cfg.in_channels, *cfg.latent_size, generator=gen), torch.tensor([0.0, 261.5, 999.0]),
            torch.tensor([4, 0, cfg.num_classes]))


@pytest.mark.parametrize("patch", [1, 2])
def test_exported_dit_runs_the_same_in_diffusers(tmp_path, patch):
    ours = randomize(DiT(tiny(patch_size=patch, **DIFFUSERS_WAY)), std=0.2).eval()
    ours.save_pretrained(tmp_path, format="diffusers")
    theirs = DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    x, t, y = batch(ours.config)
    with torch.no_grad():
        expected = theirs(x, t, y).sample
        assert expected.shape == (3, 8, 8, 8)
        assert relative_error(ours(x, t, y), expected) <= 1e-4
        # The original DiT's sinusoid and eps (our defaults) are measurably different functions.
        original = DiT(tiny(patch_size=patch)).eval()
        original.load_state_dict(ours.state_dict())
        assert relative_error(original(x, t, y), expected) > 1e-3


def test_diffusers_folder_loads_when_its_embedder_copies_are_equal(tmp_path):
    torch.manual_seed(0)
    theirs = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                   num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    randomize(theirs, std=0.2)
    theirs.save_pretrained(tmp_path / "random")
    with pytest.raises(ValueError, match=r"transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight differs "
                                         "from block 0's copy"):
        DiT.from_pretrained(tmp_path / "random")
    shared = theirs.transformer_blocks[0].norm1.emb
    theirs.transformer_blocks[1].norm1.emb.load_state_dict(shared.state_dict())
    theirs.save_pretrained(tmp_path / "converted")
    ours = DiT.from_pretrained(tmp_path / "converted")
    assert ours.config == tiny(patch_size=2, hidden_size=32, num_heads=2, **DIFFUSERS_WAY)
    x, t, y = batch(ours.config, seed=1)
    with torch.no_grad():
        assert relative_error(ours(x, t, y), theirs(x, t, y).sample) <= 1e-4


def test_configs_diffusers_cannot_express_are_refused(tmp_path):
    with pytest.raises(ValueError, match="timestep_freq_shift=0"):
        DiT(tiny()).save_pretrained(tmp_path / "original", format="diffusers")
    with pytest.raises(ValueError, match="attention='linear'.*ffn='glumbconv'.*latent_size=\\(8, 4\\)"):
        DiT(tiny(attention="linear", ffn="glumbconv", latent_size=(8, 4), **DIFFUSERS_WAY)).save_pretrained(
            tmp_path / "sana", format="diffusers")
    assert not (tmp_path / "original").exists() and not (tmp_path / "sana").exists()


def test_transformer2dmodel_class_name_of_converted_hub_folders_is_read(tmp_path):
    ours = randomize(DiT(tiny(patch_size=2, **DIFFUSERS_WAY)))
    ours.save_pretrained(tmp_path, format="diffusers")
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "_class_name": "Transformer2DModel"}))
    back = DiT.from_pretrained(tmp_path)
    assert back.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))
