"""Drop-in patching of diffusers models onto the ops, in place: ``patch(model)`` / ``unpatch(model)``.

``patch`` swaps the forward of the DC-AE pieces of an ``AutoencoderDC`` (DCDownBlock2d / DCUpBlock2d and the
encoder-output / decoder-input shortcuts, ResBlock, GLUMBConv and the decoder's output norm: the shortcuts and
channel RMSNorms with their residual adds fused) and the processors of its ``SanaMultiscaleLinearAttention``s
and of the ``SanaLinearAttnProcessor2_0`` attentions of a ``SanaTransformer2DModel``, for versions that compute
what diffusers' code computes on our ops. No parameter or buffer is added, moved or renamed, so state dicts,
``save_pretrained`` / ``from_pretrained`` and LoRA tooling see the model unchanged. A swapped forward is a
``functools.partial`` in the module's ``__dict__`` (it pickles and deep-copies with the model); ``unpatch``
deletes it, and puts back the original processor object.

Exactness: in fp32 a patched model computes the same function with the same roundings up to summation order.
In fp16 / bf16 the ops accumulate in fp32 and round once where diffusers rounds a channel RMSNorm's result after
its normalisation, weight and bias, and a shortcut before its residual add. Output dtypes follow diffusers'
type promotion (e.g. fp32 from bf16 activations with fp32 norm weights under autocast). Where an op would not
compute what diffusers computes, the patched code runs diffusers' own at call time: fp64 activations (diffusers
computes RMSNorm statistics and linear attention in fp32 there), norm weights in another half dtype than the
activations, and a multi-scale attention over N <= head_dim positions (diffusers' quadratic form, which rounds
its scores to the activations' dtype; nothing to speed up at <= head_dim positions).

diffusers is an optional dependency: its classes are looked up only when it has been imported (a model built
from its classes implies that), so ``import dcae_kernels`` neither needs nor loads it.
"""
import functools
import logging
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .linear_attention import (MAX_HEAD_DIM, relu_linear_attention, relu_linear_attention_tokens,
                               relu_linear_attention_tokens_apply, relu_linear_attention_tokens_state)
from .norm import rms_norm_2d
from .shortcut import channel_to_space_dup, space_to_channel_avg

logger = logging.getLogger(__name__)

_NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ONLY_RMS = "only RMSNorm maps onto rms_norm_2d"
_NO_SHORTCUT = "without a shortcut (a conv only: nothing to map)"


@dataclass
class PatchReport:
    """What `patch` maps onto the ops in a model (counts) and what it leaves to diffusers' code (reason -> count).

    ``fused_residuals`` counts the RMSNorms (of ``rms_norms``) whose residual add runs inside ``rms_norm_2d``.
    """
    down_shortcuts: int = 0
    up_shortcuts: int = 0
    rms_norms: int = 0
    fused_residuals: int = 0
    attentions: int = 0
    unpatched: Counter = field(default_factory=Counter)

    @property
    def patched(self) -> int:
        """How many pieces run on the ops (shortcuts, RMSNorms and attentions)."""
        return self.down_shortcuts + self.up_shortcuts + self.rms_norms + self.attentions

    def __str__(self) -> str:
        left = sum(self.unpatched.values())
        reasons = "; ".join(f"{n} x {reason}" for reason, n in sorted(self.unpatched.items()))
        return (f"patched {self.down_shortcuts} down shortcuts, {self.up_shortcuts} up shortcuts, {self.rms_norms} "
                f"RMSNorms ({self.fused_residuals} with the residual add fused), {self.attentions} attentions; "
                f"left {left} unpatched" + (f" ({reasons})" if reasons else ""))


@dataclass
class _Plan:
    """What patching one module means: report fields to add to, the modules' RMSNorms it accounts for, and either
    the new forward ``fn(module, *args)`` or ``processor(original)``, the processor that replaces the module's; or,
    when the module cannot be mapped, the reasons."""
    counts: dict = field(default_factory=dict)
    norms: tuple = ()
    forward: Callable | None = None
    processor: Callable | None = None
    reasons: tuple = ()


# ------------------------------------------------------------------------------------ the ops, as diffusers
def _shortcut_add(op, x: torch.Tensor, residual: torch.Tensor, factor: int) -> torch.Tensor:
    """op(x) (a shortcut to residual's channel count) + residual: fused when the two share a dtype, else added
    with torch's type promotion as diffusers adds them."""
    if residual.dtype == x.dtype:
        return op(x, residual.shape[1], factor, residual)
    return op(x, residual.shape[1], factor) + residual


def _norm_dtype(norm, x: torch.Tensor) -> torch.dtype | None:
    """The dtype diffusers' RMSNorm returns for ``x`` where rms_norm_2d computes it (x fp16/bf16/fp32 with no
    weights, weights in x's dtype, or fp32 weights: then the result is fp32); None elsewhere."""
    weight, bias = norm.weight, norm.bias
    if x.dtype not in _NORM_DTYPES or (bias is not None and bias.dtype != weight.dtype):
        return None
    if weight is None or weight.dtype == x.dtype:
        return x.dtype
    return torch.float32 if weight.dtype == torch.float32 else None


def _rms_norm(norm, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' ``RMSNorm`` ``norm`` over the channels of x (B, C, H, W) (+ residual), on rms_norm_2d.

    diffusers applies it as ``norm(x.movedim(1, -1)).movedim(-1, 1)``: y = x * rsqrt(mean_c(x^2) + eps) * weight +
    bias, weight and bias optional. Where rms_norm_2d does not compute that (see `_norm_dtype`), diffusers' code.
    """
    dtype = _norm_dtype(norm, x)
    if dtype is None:
        y = type(norm).forward(norm, x.movedim(1, -1)).movedim(-1, 1)
        return y if residual is None else y + residual
    weight = norm.weight if norm.weight is not None else x.new_ones(x.shape[1], dtype=dtype)
    bias = norm.bias if norm.bias is not None else torch.zeros_like(weight)
    x = x.to(dtype)
    if residual is None or residual.dtype != dtype:
        y = rms_norm_2d(x, weight, bias, norm.eps)
        return y if residual is None else y + residual
    return rms_norm_2d(x, weight, bias, norm.eps, residual)


# ------------------------------------------------------------------ patched forwards (diffusers 0.42.1's math)
def _down_block_forward(block, hidden_states):
    """DCDownBlock2d: conv (+ pixel_unshuffle) + the space-to-channel averaging shortcut, add fused."""
    x = block.conv(hidden_states)
    if block.downsample:
        x = F.pixel_unshuffle(x, block.factor)
    return _shortcut_add(space_to_channel_avg, hidden_states, x, block.factor)


def _up_block_forward(block, hidden_states):
    """DCUpBlock2d: (interpolate +) conv (+ pixel_shuffle) + the channel-duplicating shortcut, add fused."""
    if block.interpolate:
        x = block.conv(F.interpolate(hidden_states, scale_factor=block.factor, mode=block.interpolation_mode))
    else:
        x = F.pixel_shuffle(block.conv(hidden_states), block.factor)
    return _shortcut_add(channel_to_space_dup, hidden_states, x, block.factor)


def _encoder_forward(encoder, hidden_states):
    """Encoder: its blocks, then conv_out + the channel-averaging output shortcut (factor 1), add fused."""
    hidden_states = encoder.conv_in(hidden_states)
    for down_block in encoder.down_blocks:
        hidden_states = down_block(hidden_states)
    return _shortcut_add(space_to_channel_avg, hidden_states, encoder.conv_out(hidden_states), 1)


def _decoder_forward(decoder, hidden_states):
    """Decoder: conv_in (+ the channel-duplicating input shortcut, add fused), its blocks, norm_out on
    rms_norm_2d, activation, conv_out."""
    if decoder.in_shortcut:
        hidden_states = _shortcut_add(channel_to_space_dup, hidden_states, decoder.conv_in(hidden_states), 1)
    else:
        hidden_states = decoder.conv_in(hidden_states)
    for up_block in reversed(decoder.up_blocks):
        hidden_states = up_block(hidden_states)
    hidden_states = _rms_norm(decoder.norm_out, hidden_states)
    return decoder.conv_out(decoder.conv_act(hidden_states))


def _res_block_forward(block, hidden_states):
    """ResBlock with an RMSNorm: conv, activation, conv, then the norm and the residual add in one op."""
    x = block.conv2(block.nonlinearity(block.conv1(hidden_states)))
    return _rms_norm(block.norm, x, hidden_states)


def _glumbconv_forward(block, hidden_states):
    """GLUMBConv with an RMSNorm: inverted conv, depthwise conv, gate, point conv, then the norm (and the residual
    add, where the block has one) in one op."""
    x = block.nonlinearity(block.conv_inverted(hidden_states))
    x, gate = torch.chunk(block.conv_depth(x), 2, dim=1)
    x = block.conv_point(x * block.nonlinearity(gate))
    return _rms_norm(block.norm, x, hidden_states if block.residual_connection else None)


_FORWARDS = (_down_block_forward, _up_block_forward, _encoder_forward, _decoder_forward, _res_block_forward,
             _glumbconv_forward)


class MultiscaleLinearAttnProcessor:
    """``SanaMultiscaleAttnProcessor2_0`` on ``relu_linear_attention``: diffusers' [q; k; v] projections and
    multi-scale copies concatenated over channels are exactly the op's per-head interleaved layout (each copy's
    heads are more heads); with ``fused_norm``, its RMSNorm norm_out and the residual add run in ``rms_norm_2d``.
    ``original`` is the processor it replaced, which runs N <= head_dim (diffusers' quadratic form) and fp64
    activations."""

    def __init__(self, original, fused_norm: bool):
        self.original, self.fused_norm = original, fused_norm

    def __call__(self, attn, hidden_states: torch.Tensor) -> torch.Tensor:
        height, width = hidden_states.shape[-2:]
        if height * width <= attn.attention_head_dim or hidden_states.dtype == torch.float64:
            return self.original(attn, hidden_states)
        x = hidden_states.movedim(1, -1)
        qkv = torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], dim=3).movedim(-1, 1)
        qkv = torch.cat([qkv, *(block(qkv) for block in attn.to_qkv_multiscale)], dim=1)
        out = relu_linear_attention(qkv, attn.attention_head_dim, attn.eps).to(hidden_states.dtype)
        out = attn.to_out(out.movedim(1, -1)).movedim(-1, 1)
        residual = hidden_states if attn.residual_connection else None
        if self.fused_norm:
            return _rms_norm(attn.norm_out, out, residual)
        if attn.norm_type == "rms_norm":  # a norm_out the op does not map, called as diffusers calls it
            out = attn.norm_out(out.movedim(1, -1)).movedim(-1, 1)
        else:
            out = attn.norm_out(out)
        return out if residual is None else out + residual


class LinearAttnProcessor:
    """``SanaLinearAttnProcessor2_0`` (Sana's ReLU linear attention, eps 1e-15, no mask) on the token-layout ops:
    ``relu_linear_attention_tokens`` for self-attention over N > head_dim tokens, its state + apply otherwise (the
    linear form at every N, as diffusers computes it). ``original`` is the processor it replaced, which runs fp64
    activations (diffusers computes them in fp32)."""

    def __init__(self, original):
        self.original = original

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        original_dtype = hidden_states.dtype
        if original_dtype == torch.float64:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        dtype = functools.reduce(torch.promote_types, (query.dtype, key.dtype, value.dtype))
        q, k, v = (t.to(dtype).unflatten(-1, (attn.heads, -1)) for t in (query, key, value))  # (B, N, heads, d)
        if encoder_hidden_states is None and q.shape[1] > q.shape[-1]:
            out = relu_linear_attention_tokens(q, k, v, 1e-15)
        else:
            out = relu_linear_attention_tokens_apply(q, relu_linear_attention_tokens_state(k, v), 1e-15)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2).to(original_dtype)))
        return out.clip(-65504, 65504) if original_dtype == torch.float16 else out


_PROCESSORS = (MultiscaleLinearAttnProcessor, LinearAttnProcessor)


# ------------------------------------------------------------------------------------------------ planning
@functools.cache
def _classes(loaded: bool) -> SimpleNamespace | None:
    """diffusers' classes that `patch` maps (None when diffusers is not loaded: no model can hold them)."""
    if not loaded:
        return None
    try:
        from diffusers.models.attention_processor import (Attention, SanaLinearAttnProcessor2_0,
                                                          SanaMultiscaleAttnProcessor2_0,
                                                          SanaMultiscaleLinearAttention)
        from diffusers.models.autoencoders.autoencoder_dc import (DCDownBlock2d, DCUpBlock2d, Decoder, Encoder,
                                                                  ResBlock)
        from diffusers.models.normalization import RMSNorm
        from diffusers.models.transformers.sana_transformer import GLUMBConv
    except ImportError as e:
        raise ImportError(f"dcae_kernels.patch needs a diffusers with AutoencoderDC and SanaTransformer2DModel "
                          f"(tested with 0.42.1): {e}") from e
    return SimpleNamespace(**{c.__name__: c for c in (
        Attention, DCDownBlock2d, DCUpBlock2d, Decoder, Encoder, GLUMBConv, RMSNorm, ResBlock,
        SanaLinearAttnProcessor2_0, SanaMultiscaleAttnProcessor2_0, SanaMultiscaleLinearAttention)})


def _plan_shortcut_block(block, d) -> _Plan:
    down = isinstance(block, d.DCDownBlock2d)
    if not block.shortcut:
        return _Plan(reasons=(f"{type(block).__name__} {_NO_SHORTCUT}",))
    return _Plan({"down_shortcuts" if down else "up_shortcuts": 1},
                 forward=_down_block_forward if down else _up_block_forward)


def _plan_encoder(encoder, d) -> _Plan:
    if not encoder.out_shortcut:
        return _Plan(reasons=(f"Encoder output {_NO_SHORTCUT}",))
    return _Plan({"down_shortcuts": 1}, forward=_encoder_forward)


def _plan_decoder(decoder, d) -> _Plan:
    if type(decoder.norm_out) is not d.RMSNorm:
        return _Plan(norms=(decoder.norm_out,), reasons=(f"Decoder norm_out {type(decoder.norm_out).__name__} "
                                                         f"({_ONLY_RMS})",))
    return _Plan({"up_shortcuts": int(decoder.in_shortcut), "rms_norms": 1}, norms=(decoder.norm_out,),
                 forward=_decoder_forward)


def _plan_normed_block(block, d) -> _Plan:
    """ResBlock / GLUMBConv: patched when their norm is an RMSNorm (its residual add fused)."""
    name, fused = type(block).__name__, getattr(block, "residual_connection", True)
    if block.norm_type != "rms_norm" or type(block.norm) is not d.RMSNorm:
        why = ("Mix-FFN without a norm: no op here fuses its convolutions and gate" if block.norm is None
               else f"{block.norm_type} norm: {_ONLY_RMS}")
        return _Plan(norms=(block.norm,), reasons=(f"{name} ({why})",))
    forward = _res_block_forward if isinstance(block, d.ResBlock) else _glumbconv_forward
    return _Plan({"rms_norms": 1, "fused_residuals": int(fused)}, norms=(block.norm,), forward=forward)


def _plan_multiscale_attention(attn, d) -> _Plan:
    processor = attn.processor
    if type(processor) not in (d.SanaMultiscaleAttnProcessor2_0, MultiscaleLinearAttnProcessor):
        why = f"processor {type(processor).__name__}"
    elif type(attn.nonlinearity) is not nn.ReLU:
        why = f"nonlinearity {type(attn.nonlinearity).__name__}: the op is ReLU linear attention"
    elif attn.attention_head_dim > MAX_HEAD_DIM:
        why = f"attention_head_dim {attn.attention_head_dim} > {MAX_HEAD_DIM}"
    else:
        counts, reasons = {"attentions": 1}, ()
        fused_norm = attn.norm_type == "rms_norm" and type(attn.norm_out) is d.RMSNorm
        if fused_norm:
            counts.update(rms_norms=1, fused_residuals=int(attn.residual_connection))
        else:
            reasons = (f"SanaMultiscaleLinearAttention norm_out {type(attn.norm_out).__name__} ({_ONLY_RMS})",)
        return _Plan(counts, norms=(attn.norm_out,), reasons=reasons,
                     processor=functools.partial(MultiscaleLinearAttnProcessor, fused_norm=fused_norm))
    return _Plan(norms=(attn.norm_out,), reasons=(f"SanaMultiscaleLinearAttention ({why})",))


def _plan_attention(attn, d) -> _Plan:
    processor_type = type(attn.processor)
    if processor_type not in (d.SanaLinearAttnProcessor2_0, LinearAttnProcessor):
        return _Plan(reasons=(f"Attention with {processor_type.__name__} (only SanaLinearAttnProcessor2_0's ReLU "
                              "linear attention maps onto the ops)",))
    if attn.inner_dim != attn.inner_kv_dim or attn.inner_dim % attn.heads:
        return _Plan(reasons=("Attention with SanaLinearAttnProcessor2_0 (keys and values not in the queries' heads)",))
    if attn.inner_dim // attn.heads > MAX_HEAD_DIM:
        return _Plan(reasons=(f"Attention with SanaLinearAttnProcessor2_0 (head_dim {attn.inner_dim // attn.heads} "
                              f"> {MAX_HEAD_DIM})",))
    return _Plan({"attentions": 1}, processor=LinearAttnProcessor)


def _planners(d) -> dict:
    return {d.DCDownBlock2d: _plan_shortcut_block, d.DCUpBlock2d: _plan_shortcut_block, d.Encoder: _plan_encoder,
            d.Decoder: _plan_decoder, d.ResBlock: _plan_normed_block, d.GLUMBConv: _plan_normed_block,
            d.SanaMultiscaleLinearAttention: _plan_multiscale_attention, d.Attention: _plan_attention}


def _is_patched_forward(forward) -> bool:
    return isinstance(forward, functools.partial) and forward.func in _FORWARDS


def _walk(model: nn.Module, apply: bool) -> PatchReport:
    """The report of what `patch` maps in ``model``; with ``apply``, patch it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    d = _classes("diffusers" in sys.modules)
    if d is None:
        return report
    planners, seen_norms = _planners(d), set()
    for module in model.modules():
        base = next((cls for cls in planners if isinstance(module, cls)), None)
        if base is None:
            continue
        if type(module) is not base:
            report.unpatched[f"{type(module).__name__} (a subclass of {base.__name__}: its forward may differ)"] += 1
            continue
        plan = planners[base](module, d)
        seen_norms.update(id(norm) for norm in plan.norms)
        forward = module.__dict__.get("forward")
        if plan.forward is not None and forward is not None and not _is_patched_forward(forward):
            plan = _Plan(reasons=(f"{base.__name__} (its forward was already replaced, e.g. by a hook)",))
        report.unpatched.update(plan.reasons)
        for name, n in plan.counts.items():
            setattr(report, name, getattr(report, name) + n)
        if not apply:
            continue
        if plan.forward is not None and forward is None:
            module.forward = functools.partial(plan.forward, module)
        if plan.processor is not None and not isinstance(module.processor, _PROCESSORS):
            module.processor = plan.processor(module.processor)
    for module in model.modules():
        if isinstance(module, d.RMSNorm) and id(module) not in seen_norms:
            report.unpatched["RMSNorm outside a DC-AE block (e.g. over tokens: rms_norm_2d normalises the channels "
                             "of (B, C, H, W))"] += 1
    return report


# ------------------------------------------------------------------------------------------------- the API
def patch_report(model: nn.Module) -> PatchReport:
    """What `patch` maps onto the ops in ``model`` (or has mapped: patched pieces count as patched) and what it
    leaves to diffusers' code, with the reasons. Changes nothing."""
    return _walk(model, apply=False)


def patch(model: nn.Module) -> nn.Module:
    """Run the DC-AE pieces of a diffusers model on dcae_kernels' ops, in place; returns ``model`` itself.

    AutoencoderDC: the down/up-sampling shortcuts (``space_to_channel_avg`` / ``channel_to_space_dup`` with the
    residual add fused), its channel RMSNorms (``rms_norm_2d``, fused with the ResBlock / GLUMBConv / attention
    residual add) and its multi-scale linear attention (``relu_linear_attention``). SanaTransformer2DModel: its
    ReLU linear self-attention (``relu_linear_attention_tokens``). Parameters and state-dict keys are unchanged;
    patching a patched model changes nothing; ``unpatch`` restores the originals. Logs a `PatchReport` (INFO on
    the ``dcae_kernels.patch`` logger); warns, naming the model's class, when there is nothing to patch.
    """
    report = _walk(model, apply=True)
    if report.patched:
        logger.info("dcae_kernels.patch(%s): %s", type(model).__name__, report)
    else:
        left = "; ".join(f"{n} x {reason}" for reason, n in sorted(report.unpatched.items()))
        warnings.warn(f"dcae_kernels.patch: nothing to patch in {type(model).__name__}" +
                      (f" (left unpatched: {left})" if left else "") + "; returned unchanged", stacklevel=2)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch` in place (a no-op on an unpatched model): every swapped forward is removed and every swapped
    processor is replaced by the original object. Returns ``model`` itself."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if _is_patched_forward(module.__dict__.get("forward")):
            del module.forward
        if isinstance(getattr(module, "processor", None), _PROCESSORS):
            module.processor = module.processor.original
    return model
