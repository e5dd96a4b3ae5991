"""Plain torch + einops versions of every op: the ground truth for tests and the CPU path."""
import functools

import torch
from einops import rearrange, reduce, repeat

from .outputs import accumulation_dtype


def space_to_channel_avg(x: torch.Tensor, out_channels: int, factor: int = 2,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: (B, C, H, W) -> (B, out_channels, H/f, W/f).

    y = mean over groups of G = C*f*f/out_channels consecutive channels of pixel_unshuffle(x, f) (+ residual).
    """
    y = rearrange(x, "b c (h i) (w j) -> b (c i j) h w", i=factor, j=factor)
    y = reduce(y, "b (o g) h w -> b o h w", "mean", o=out_channels)
    return y if residual is None else y + residual


def channel_to_space_dup(x: torch.Tensor, out_channels: int, factor: int = 2,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: (B, C, H, W) -> (B, out_channels, H*f, W*f).

    y = pixel_shuffle(x.repeat_interleave(R, dim=1), f) with R = out_channels*f*f/C (+ residual).
    """
    r = out_channels * factor * factor // x.shape[1]
    y = repeat(x, "b c h w -> b (c r) h w", r=r)
    y = rearrange(y, "b (c i j) h w -> b c (h i) (w j)", i=factor, j=factor)
    return y if residual is None else y + residual


def _in_accumulation_dtype(fn):
    """Run ``fn`` (whose tensor arguments are already in the accumulation dtype) with autocast off, so that its
    matmuls sum in that dtype under ``torch.autocast`` too, as the kernels do."""
    @functools.wraps(fn)
    def run(first: torch.Tensor, *args, **kwargs):
        with torch.autocast(first.device.type, enabled=False):
            return fn(first, *args, **kwargs)
    return run


@_in_accumulation_dtype
def _state(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k, v: (..., D, N) -> [v; 1] relu(k)^T (..., D+1, D): a sum over the N positions."""
    return torch.nn.functional.pad(v, (0, 0, 0, 1), value=1.0) @ torch.relu(k).transpose(-1, -2)


@_in_accumulation_dtype
def _apply(state: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    """state (..., D+1, D), q (..., D, N) -> (state relu(q)) rows :D over row D + eps, (..., D, N)."""
    out = state @ torch.relu(q)
    return out[..., :-1, :] / (out[..., -1:, :] + eps)


@_in_accumulation_dtype
def _relu_linear_attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """q, k, v: (..., D, N) channels first, already in the accumulation dtype -> (..., D, N).

    Linear form ([v; 1] relu(k)^T) relu(q), rows :D over row D + eps; the authors' quadratic form
    v (relu(k)^T relu(q) / (column sums + eps)) when N <= D. Both are the same function.
    """
    if q.shape[-1] <= q.shape[-2]:
        att = torch.relu(k).transpose(-1, -2) @ torch.relu(q)  # (N keys, N queries)
        return v @ (att / (att.sum(-2, keepdim=True) + eps))
    return _apply(_state(k, v), q, eps)


def _split_heads(qkv: torch.Tensor, head_dim: int):
    """(B, heads*3*head_dim, H, W) -> q, k, v (B, heads, head_dim, H*W) in the accumulation dtype."""
    return rearrange(qkv.to(accumulation_dtype(qkv)), "b (h p d) x y -> p b h d (x y)", p=3, d=head_dim)


def relu_linear_attention(qkv: torch.Tensor, head_dim: int = 32, eps: float = 1e-15) -> torch.Tensor:
    """qkv: (B, heads*3*head_dim, H, W), per head q, k, v blocks -> (B, heads*head_dim, H, W).

    Per head, N = H*W: out = ([v; 1] relu(k)^T) relu(q), rows :D divided by row D + eps, in fp32 (diffusers).
    """
    out = _relu_linear_attention_heads(*_split_heads(qkv, head_dim), eps)
    return rearrange(out, "b h d (x y) -> b (h d) x y", x=qkv.shape[2], y=qkv.shape[3]).to(qkv.dtype)


def relu_linear_attention_state(qkv: torch.Tensor, head_dim: int = 32) -> torch.Tensor:
    """qkv: (B, heads*3*head_dim, H, W) -> the state [v; 1] relu(k)^T (B, heads, head_dim+1, head_dim), summed
    over the H*W positions in the accumulation dtype. States of disjoint regions add up to the whole's."""
    _, k, v = _split_heads(qkv, head_dim)
    return _state(k, v)


def relu_linear_attention_apply(qkv: torch.Tensor, state: torch.Tensor, head_dim: int = 32,
                                eps: float = 1e-15) -> torch.Tensor:
    """The attention of qkv's queries (B, heads*3*head_dim, H, W) over the keys summed into ``state``
    (`relu_linear_attention_state`, possibly of a larger region) -> (B, heads*head_dim, H, W). The linear form at
    every N (`relu_linear_attention` takes the quadratic one for N <= head_dim: equal up to rounding)."""
    q, _, _ = _split_heads(qkv, head_dim)
    out = _apply(state, q, eps)
    return rearrange(out, "b h d (x y) -> b (h d) x y", x=qkv.shape[2], y=qkv.shape[3]).to(qkv.dtype)


def relu_linear_attention_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 eps: float = 1e-15) -> torch.Tensor:
    """q, k, v: (B, N, heads, head_dim) -> (B, N, heads, head_dim); the same math per (batch, head)."""
    dtype = q.dtype
    q, k, v = (rearrange(t.to(accumulation_dtype(t)), "b n h d -> b h d n") for t in (q, k, v))
    return rearrange(_relu_linear_attention_heads(q, k, v, eps), "b h d n -> b n h d").to(dtype)


def relu_linear_attention_tokens_state(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k, v: (B, N, heads, head_dim) -> the state [v; 1] relu(k)^T (B, heads, head_dim+1, head_dim), summed over
    the N tokens in the accumulation dtype. States of disjoint token sets add up to the whole's."""
    k, v = (rearrange(t.to(accumulation_dtype(t)), "b n h d -> b h d n") for t in (k, v))
    return _state(k, v)


def relu_linear_attention_tokens_apply(q: torch.Tensor, state: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """The attention of q's tokens (B, N, heads, head_dim) over the keys summed into ``state``
    (`relu_linear_attention_tokens_state`, possibly of more tokens) -> (B, N, heads, head_dim)."""
    out = _apply(state, rearrange(q.to(accumulation_dtype(q)), "b n h d -> b h d n"), eps)
    return rearrange(out, "b h d n -> b n h d").to(q.dtype)


def rms_norm_2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: (B, C, H, W), weight, bias: (C,) -> (B, C, H, W) in x's dtype.

    y = x * rsqrt(mean_c(x^2) + eps) * weight[c] + bias[c] (+ residual), in fp32 (fp64 for fp64), rounded once.
    """
    acc = accumulation_dtype(x)
    h = x.to(acc)
    h = h * torch.rsqrt(h.square().mean(1, keepdim=True) + eps)
    h = h * weight.to(acc)[:, None, None] + bias.to(acc)[:, None, None]
    if residual is not None:
        h = h + residual.to(acc)
    return h.to(x.dtype)


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                         residual: torch.Tensor | None = None,
                         gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (B, N, C), shift, scale, gate: (B, C) -> (y, h), both (B, N, C) in x's dtype.

    h = residual + gate * x (gate = 1 when None; h is x itself when there is no residual), then LayerNorm over C
    without affine weights, modulated: y = (h - mean_C(h)) * rsqrt(var_C(h) + eps) * (1 + scale) + shift (biased
    variance), in fp32 (fp64 for fp64), rounded once.
    """
    acc = accumulation_dtype(x)
    h = x.to(acc)
    if residual is not None:
        h = residual.to(acc) + (h if gate is None else gate.to(acc)[:, None] * h)
    centered = h - h.mean(-1, keepdim=True)
    xhat = centered * torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
    y = xhat * (1 + scale.to(acc)[:, None]) + shift.to(acc)[:, None]
    return y.to(x.dtype), x if residual is None else h.to(x.dtype)
