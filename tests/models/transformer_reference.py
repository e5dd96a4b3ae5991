"""Independent references for the DiT / U-ViT tests: random state dicts in the authors' key layout (efficientvit's
DiT = the original DiT's, and efficientvit's UViT: conv patch embedding, patch values ordered (row, column,
channel)) and functional forwards written from the authors' code, unfused (LayerNorm, then modulate, then the gated
residual add), with numpy position embeddings."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange


def numpy_sincos_2d(dim: int, side: int) -> torch.Tensor:
    """The original DiT's get_2d_sincos_pos_embed (meshgrid with w first; sin then cos), (side * side, dim)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32)), axis=0)
    return torch.from_numpy(np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)).float()


def sinusoid(t: torch.Tensor, dim: int, shift: int = 0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - shift))
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _randn(gen, *shape, std=0.1):
    return torch.randn(*shape, generator=gen) * std


def authors_dit_state(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with efficientvit's / the original DiT's names and shapes for a `DiTConfig`."""
    gen, h, p, c = torch.Generator().manual_seed(seed), cfg.hidden_size, cfg.patch_size, cfg.in_channels
    mlp = int(h * cfg.mlp_ratio)
    sd = {"x_embedder.proj.weight": _randn(gen, h, c, p, p, std=0.3), "x_embedder.proj.bias": _randn(gen, h),
          "pos_embed": numpy_sincos_2d(h, cfg.grid[0])[None],
          "t_embedder.mlp.0.weight": _randn(gen, h, 256), "t_embedder.mlp.0.bias": _randn(gen, h),
          "t_embedder.mlp.2.weight": _randn(gen, h, h), "t_embedder.mlp.2.bias": _randn(gen, h),
          "y_embedder.embedding_table.weight": _randn(gen, cfg.num_classes + 1, h, std=1.0),
          "final_layer.linear.weight": _randn(gen, p * p * cfg.out_channels, h),
          "final_layer.linear.bias": _randn(gen, p * p * cfg.out_channels),
          "final_layer.adaLN_modulation.1.weight": _randn(gen, 2 * h, h),
          "final_layer.adaLN_modulation.1.bias": _randn(gen, 2 * h)}
    for i in range(cfg.depth):
        for name, shape in (("attn.qkv", (3 * h, h)), ("attn.proj", (h, h)), ("mlp.fc1", (mlp, h)),
                            ("mlp.fc2", (h, mlp)), ("adaLN_modulation.1", (6 * h, h))):
            sd[f"blocks.{i}.{name}.weight"] = _randn(gen, *shape)
            sd[f"blocks.{i}.{name}.bias"] = _randn(gen, shape[0])
    return sd


def _attention(x, w_qkv, b_qkv, w_proj, b_proj, heads):
    qkv = rearrange(F.linear(x, w_qkv, b_qkv), "b n (k h d) -> k b h n d", k=3, h=heads)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return F.linear(rearrange(out, "b h n d -> b n (h d)"), w_proj, b_proj)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def original_dit_forward(sd, cfg, x, t, y):
    """The original DiT's forward_without_cfg (no label dropout) on a state dict in its layout."""
    h, p = cfg.hidden_size, cfg.patch_size
    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    tokens = tokens + sd["pos_embed"]
    temb = sinusoid(t, 256, cfg.timestep_freq_shift)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    for i in range(cfg.depth):
        w = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        mod = F.linear(F.silu(c), w["adaLN_modulation.1.weight"], w["adaLN_modulation.1.bias"]).chunk(6, dim=1)
        n = _modulate(F.layer_norm(tokens, (h,), eps=1e-6), mod[0], mod[1])
        tokens = tokens + mod[2][:, None] * _attention(n, w["attn.qkv.weight"], w["attn.qkv.bias"],
                                                       w["attn.proj.weight"], w["attn.proj.bias"], cfg.num_heads)
        n = _modulate(F.layer_norm(tokens, (h,), eps=cfg.mlp_norm_eps), mod[3], mod[4])
        m = F.linear(F.gelu(F.linear(n, w["mlp.fc1.weight"], w["mlp.fc1.bias"]), approximate="tanh"),
                     w["mlp.fc2.weight"], w["mlp.fc2.bias"])
        tokens = tokens + mod[5][:, None] * m
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    out = F.linear(_modulate(F.layer_norm(tokens, (h,), eps=1e-6), shift, scale), sd["final_layer.linear.weight"],
                   sd["final_layer.linear.bias"])
    gh, gw = cfg.grid
    return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=gh, w=gw, p=p, q=p)


def authors_uvit_state(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with efficientvit's UViT names and shapes for a `UViTConfig` (qkv without bias)."""
    gen, h, p, c = torch.Generator().manual_seed(seed), cfg.hidden_size, cfg.patch_size, cfg.in_channels
    mlp = int(h * cfg.mlp_ratio)
    sd = {"patch_embed.proj.weight": _randn(gen, h, c, p, p, std=0.3), "patch_embed.proj.bias": _randn(gen, h),
          "pos_embed": _randn(gen, 1, 2 + cfg.num_patches, h),
          "label_emb.embedding_table.weight": _randn(gen, cfg.num_classes + 1, h, std=1.0),
          "norm.weight": 1 + _randn(gen, h), "norm.bias": _randn(gen, h),
          "decoder_pred.weight": _randn(gen, p * p * cfg.out_channels, h),
          "decoder_pred.bias": _randn(gen, p * p * cfg.out_channels)}
    blocks = ([f"in_blocks.{i}" for i in range(cfg.depth // 2)] + ["mid_block"]
              + [f"out_blocks.{i}" for i in range(cfg.depth // 2)])
    for block in blocks:
        for norm in ("norm1", "norm2"):
            sd[f"{block}.{norm}.weight"], sd[f"{block}.{norm}.bias"] = 1 + _randn(gen, h), _randn(gen, h)
        sd[f"{block}.attn.qkv.weight"] = _randn(gen, 3 * h, h)
        for name, shape in (("attn.proj", (h, h)), ("mlp.fc1", (mlp, h)), ("mlp.fc2", (h, mlp)))\
                + ((("skip_linear", (h, 2 * h)),) if block.startswith("out") else ()):
            sd[f"{block}.{name}.weight"] = _randn(gen, *shape)
            sd[f"{block}.{name}.bias"] = _randn(gen, shape[0])
    return sd


def efficientvit_uvit_forward(sd, cfg, x, t, y, skip_scale: float = 1.0):
    """efficientvit's UViT forward_without_cfg (no label dropout) on a state dict in its layout; ``skip_scale``
    multiplies the long skips (0: the model without them)."""
    h, p = cfg.hidden_size, cfg.patch_size

    def block(name, z, skip=None):
        w = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        if skip is not None:
            z = F.linear(torch.cat([z, skip_scale * skip], dim=-1), w["skip_linear.weight"], w["skip_linear.bias"])
        z = z + _attention(F.layer_norm(z, (h,), w["norm1.weight"], w["norm1.bias"]), w["attn.qkv.weight"], None,
                           w["attn.proj.weight"], w["attn.proj.bias"], cfg.num_heads)
        n = F.layer_norm(z, (h,), w["norm2.weight"], w["norm2.bias"])
        return z + F.linear(F.gelu(F.linear(n, w["mlp.fc1.weight"], w["mlp.fc1.bias"])), w["mlp.fc2.weight"],
                            w["mlp.fc2.bias"])

    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    tokens = torch.cat([sd["label_emb.embedding_table.weight"][y][:, None], sinusoid(t, h)[:, None],
                        tokens.flatten(2).transpose(1, 2)], dim=1) + sd["pos_embed"]
    skips = []
    for i in range(cfg.depth // 2):
        tokens = block(f"in_blocks.{i}", tokens)
        skips.append(tokens)
    tokens = block("mid_block", tokens)
    for i in range(cfg.depth // 2):
        tokens = block(f"out_blocks.{i}", tokens, skips.pop())
    out = F.linear(F.layer_norm(tokens, (h,), sd["norm.weight"], sd["norm.bias"]), sd["decoder_pred.weight"],
                   sd["decoder_pred.bias"])[:, 2:]
    gh, gw = cfg.grid
    return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=gh, w=gw, p=p, q=p)


def randomize(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Every parameter N(0, std) (DiT starts with zero adaLN and output layers, which would hide most of it)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model
