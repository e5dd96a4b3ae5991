"""The shared transformer pieces against peers (diffusers' Timesteps and 2-D sin-cos embedding) and independent
formulations (conv patch embedding, a depthwise conv over grid + extra tokens); the interface DiT and U-ViT share
(`LatentTransformer`): guidance, class dropout, input checks, gradient checkpointing, torch.compile."""
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import Timesteps, get_2d_sincos_pos_embed
from einops import rearrange

from dcae.models.dit import DiT
from dcae.models.transformer_blocks import (Attention, MixFFN, PatchEmbed, sincos_pos_embed_2d, timestep_sinusoid,
                                            unpatchify)
from dcae.models.transformer_config import get_dit_config, get_uvit_config
from dcae.models.uvit import UViT

from .transformer_reference import numpy_sincos_2d, randomize, sinusoid



def make_dit(**fields):
    return DiT(get_dit_config("dit-tiny", **fields))


def make_uvit(**fields):
    return UViT(get_uvit_config("uvit-tiny", **fields))


MODELS = [pytest.param(make_dit, id="dit"), pytest.param(make_uvit, id="uvit")]


def test_timestep_sinusoid_original_and_diffusers_conventions():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    torch.testing.assert_close(timestep_sinusoid(t, 256), sinusoid(t, 256), rtol=0, atol=0)
    diffusers = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)(t)
    torch.testing.assert_close(timestep_sinusoid(t, 256, freq_shift=1), diffusers, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(timestep_sinusoid(t, 256), diffusers, atol=1e-3)
    assert timestep_sinusoid(t, 7).shape == (4, 7) and (timestep_sinusoid(t, 7)[:, -1] == 0).all()


def test_sincos_pos_embed_matches_the_original_and_diffusers():
    ours = sincos_pos_embed_2d(64, 6, 6)
    torch.testing.assert_close(ours, numpy_sincos_2d(64, 6), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, get_2d_sincos_pos_embed(64, 6, base_size=6).float(), rtol=0, atol=1e-5)
    wide = sincos_pos_embed_2d(16, 2, 3)  # row-major; first half of the channels: the column
    torch.testing.assert_close(wide[4], torch.cat([sincos_pos_embed_2d(16, 1, 2)[1, :8],
                                                   sincos_pos_embed_2d(16, 2, 1)[1, 8:]]))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(18, 2, 2)


@pytest.mark.parametrize("patch", [1, 2])
def test_patchify_is_a_stride_p_conv_and_unpatchify_inverts_the_layout(patch):
    embed = PatchEmbed(3, 8, patch)
    x = torch.randn(2, 3, 4, 6)
    conv = F.conv2d(x, embed.proj.weight.reshape(8, 3, patch, patch), embed.proj.bias, stride=patch)
    torch.testing.assert_close(embed(x), conv.flatten(2).transpose(1, 2))
    tokens = rearrange(x, "b c (h i) (w j) -> b (h w) (c i j)", i=patch, j=patch)
    torch.testing.assert_close(unpatchify(tokens, (4 // patch, 6 // patch), 3, patch), x, rtol=0, atol=0)


def test_mix_ffn_treats_extra_tokens_as_one_pixel_images():
    torch.manual_seed(0)
    ffn = MixFFN(8, 6, grid=(3, 2), extra_tokens=2)
    x = torch.randn(2, 2 + 6, 8)
    h = F.silu(ffn.inverted_conv(x))
    grid = ffn.depth_conv(rearrange(h[:, 2:], "b (y x) c -> b c y x", y=3))
    extra = torch.stack([ffn.depth_conv(rearrange(h[:, k], "b c -> b c 1 1")) for k in range(2)], dim=1)
    h = torch.cat([extra.flatten(2), rearrange(grid, "b c y x -> b (y x) c")], dim=1)
    a, gate = h.chunk(2, dim=-1)
    torch.testing.assert_close(ffn(x), ffn.point_conv(a * F.silu(gate)))


def test_linear_attention_is_sanas_relu_attention():
    torch.manual_seed(0)
    attn = Attention(64, heads=2, qkv_bias=False, linear=True)
    x = torch.randn(2, 5, 64)
    q, k, v = rearrange(attn.qkv(x), "b n (p h d) -> p b h n d", p=3, h=2).unbind(0)
    scores = q.relu() @ k.relu().transpose(-1, -2)  # (b, h, n queries, n keys)
    out = (scores @ v) / (scores.sum(-1, keepdim=True) + 1e-15)
    torch.testing.assert_close(attn(x), attn.proj(rearrange(out, "b h n d -> b n (h d)")), rtol=1e-5, atol=1e-6)


def inputs(model, batch=3, seed=0):
    gen, cfg = torch.Generator().manual_seed(seed), model.config
    return (torch.randn(batch, cfg.in_channels, *cfg.latent_size, generator=gen),
            torch.rand(batch, generator=gen) * 1000, torch.randint(0, cfg.num_classes, (batch,), generator=gen))


@pytest.mark.parametrize("make", MODELS)
def test_guidance_batches_both_branches_and_guides_all_latent_channels(make):
    model = randomize(make(depth=2, learn_sigma=True, latent_shape=(8, 4, 4)), std=0.05).eval()
    x, t, y = inputs(model)
    c = model.config.in_channels
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, model.null_class))
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), cond, rtol=1e-5, atol=1e-5)
        guided = model.forward_with_cfg(x, t, y, 4.0)
        torch.testing.assert_close(guided[:, :c], uncond[:, :c] + 4.0 * (cond[:, :c] - uncond[:, :c]), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(guided[:, c:], cond[:, c:], rtol=1e-5, atol=1e-5)  # variance: conditional
        per_sample = model.forward_with_cfg(x, t, y, torch.tensor([1.0, 4.0, 4.0]))
        torch.testing.assert_close(per_sample[0], cond[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_sample[1:], guided[1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", MODELS)
def test_class_dropout_uses_the_null_class_at_the_configured_rate_reproducibly(make):
    model = make(depth=1, class_dropout_prob=0.2)
    y = torch.randint(0, model.config.num_classes, (20_000,), generator=torch.Generator().manual_seed(1))
    dropped = model.drop_labels(y, torch.Generator().manual_seed(7))
    replaced = dropped != y
    assert (dropped[replaced] == model.null_class).all() and model.null_class == model.config.num_classes
    assert abs(replaced.float().mean().item() - 0.2) < 0.01
    assert torch.equal(dropped, model.drop_labels(y, torch.Generator().manual_seed(7)))
    assert not torch.equal(dropped, model.drop_labels(y, torch.Generator().manual_seed(8)))
    assert torch.equal(make(depth=1, class_dropout_prob=0.0).drop_labels(y), y)


@pytest.mark.parametrize("make", MODELS)
def test_inputs_are_checked(make):
    model = make(depth=1)
    x, t, y = inputs(model, batch=2)
    with pytest.raises(ValueError, match=r"x must be \(B, 8, 8, 8\)"):
        model(x[:, :4], t, y)
    with pytest.raises(ValueError, match=r"x must be \(B, 8, 8, 8\)"):
        model(x[..., :4], t, y)
    with pytest.raises(ValueError, match=r"t must be a \(2,\) tensor"):
        model(x, t[:1], y)
    with pytest.raises(ValueError, match=r"y must be a \(2,\) tensor"):
        model(x, t, 3)
    with pytest.raises(TypeError, match="integer class ids"):
        model(x, t, y.float())


@pytest.mark.parametrize("make", MODELS)
def test_bf16_autocast_training_step_and_bf16_weights(make):
    """The residual stream stays fp32 under autocast (as in the original: the fp32 position embedding promotes it);
    a model cast to bf16 runs in bf16 throughout."""
    model = randomize(make(depth=1, latent_shape=(8, 4, 4), patch_size=2, learn_sigma=True), std=0.05)
    x, t, y = inputs(model, batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and all(p.grad is not None and p.grad.isfinite().all()
                                               for p in model.parameters())
    with torch.no_grad():
        half = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert half.dtype == torch.bfloat16 and (half.float() - out.float()).abs().max() < 0.05


@pytest.mark.parametrize("make", MODELS)
def test_gradient_checkpointing_gives_the_same_gradients(make):
    model = randomize(make(depth=2, latent_shape=(8, 4, 4)), std=0.05)
    x, t, y = inputs(model, batch=2)
    grads = []
    for enabled in (False, True):
        model.enable_gradient_checkpointing(enabled)
        model.zero_grad()
        model(x, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("make, fields", [
    pytest.param(make_dit, dict(depth=1, patch_size=2, attention="linear", ffn="glumbconv"), id="dit"),
    pytest.param(make_uvit, dict(depth=2, latent_shape=(8, 4, 4)), id="uvit"),
])
def test_torch_compile_traces_the_whole_model_in_one_graph(make, fields):
    """fullgraph=True fails on any graph break; the eager backend keeps it fast (the reference ops run)."""
    model = randomize(make(**fields), std=0.05)
    model.enable_gradient_checkpointing()
    x, t, y = inputs(model, batch=2)
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="eager")(x, t, y)
    torch.testing.assert_close(out, model(x, t, y), rtol=1e-5, atol=1e-6)
