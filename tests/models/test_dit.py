"""DiT: adaLN-Zero at initialisation, and the fused residual chain against the original block math (unfused:
LayerNorm, modulate, gated add) for every attention / FFN / patch variant."""
import pytest
import torch
import torch.nn.functional as F

from dcae.models.dit import DiT
from dcae.models.transformer_blocks import unpatchify
from dcae.models.transformer_config import get_dit_config, get_uvit_config

from .transformer_reference import randomize


def unfused_forward(model: DiT, x, t, y):
    """The original DiT's forward on our modules, with plain LayerNorm / modulate / gated adds."""
    cfg = model.config

    def modulated(h, shift, scale, eps):
        return F.layer_norm(h, h.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]

    c = model.t_embedder(t) + model.y_embedder(y)
    h = model.x_embedder(x) + model.pos_embed
    for block in model.blocks:
        s1, c1, g1, s2, c2, g2 = block.adaLN_modulation(c).chunk(6, dim=1)
        h = h + g1[:, None] * block.attn(modulated(h, s1, c1, 1e-6))
        h = h + g2[:, None] * block.mlp(modulated(h, s2, c2, cfg.mlp_norm_eps))
    shift, scale = model.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    out = model.final_layer.linear(modulated(h, shift, scale, 1e-6))
    return unpatchify(out, cfg.grid, cfg.out_channels, cfg.patch_size)


@pytest.mark.parametrize("fields", [
    dict(patch_size=1),
    dict(patch_size=2, attention="linear", ffn="glumbconv", mlp_norm_eps=1e-5, latent_size=(8, 4)),
])
def test_fused_chain_equals_the_original_block_math(fields):
    model = randomize(DiT(get_dit_config("dit-tiny", depth=3, **fields)))
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, *cfg.latent_size)
    t, y = torch.tensor([1.0, 640.5]), torch.tensor([0, cfg.num_classes])
    with torch.no_grad():
        out = model(x, t, y)
        torch.testing.assert_close(out, unfused_forward(model, x, t, y), rtol=1e-5, atol=1e-5)
    assert out.shape == (2, 2 * cfg.in_channels, *cfg.latent_size) and out.abs().mean() > 0.01


def test_adaln_zero_starts_at_zero_and_learn_sigma_doubles_the_channels():
    for learn_sigma in (True, False):
        model = DiT(get_dit_config("dit-tiny", learn_sigma=learn_sigma))
        x = torch.randn(2, 8, 8, 8)
        out = model(x, torch.tensor([3.0, 4.0]), torch.tensor([1, 2]))
        assert out.shape == (2, 16 if learn_sigma else 8, 8, 8) and not out.any()
        last = model.blocks[-1].adaLN_modulation[-1]
        assert not last.weight.any() and not model.final_layer.linear.weight.any()
        assert model.blocks[0].attn.qkv.weight.std() > 0 and model.t_embedder.mlp[0].weight.std() > 0


def test_wrong_config_type_is_refused():
    with pytest.raises(TypeError, match="DiTConfig"):
        DiT(get_uvit_config("uvit-tiny"))
