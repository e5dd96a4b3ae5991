"""DiT (Peebles & Xie): a transformer with adaLN-Zero conditioning on patchified latents.

Parameter names follow the original (facebookresearch/DiT, efficientvit's copy), except that the patch embedding
is a Linear on space-to-channel patches (theirs: a p x p stride-p conv, the same weights reshaped) and the final
Linear's outputs are ordered (channel, row, column) within a patch (theirs: row, column, channel).

The residual stream runs through `dcae_kernels.modulated_layer_norm`, which adds a gated sub-block output to the
stream and normalises and modulates the sum in one step. The original block
``x = x + g1 * attn(mod(LN(x), s1, c1)); x = x + g2 * mlp(mod(LN(x), s2, c2))`` is, chained:
``(n, x) = mln(m_prev, s1, c1, residual=x, gate=g2_prev); a = attn(n); (n, x) = mln(a, s2, c2, residual=x,
gate=g1); m = mlp(n)``: each block hands its MLP output and gate to the next block's first step (the first block
has none), and the last block's to the final layer's.
"""
import torch
from torch import nn

import dcae_kernels

from .latent_transformer import LatentTransformer
from .transformer_blocks import (Attention, ClassEmbedder, PatchEmbed, TimestepEmbedder, make_ffn, run_block,
                                 sincos_pos_embed_2d, unpatchify)
from .transformer_config import DiTConfig, get_dit_config

NORM_EPS = 1e-6  # the LayerNorm before attention and the final one (original and diffusers)


class DiTBlock(nn.Module):
    """One adaLN-Zero block. ``forward(x, h, gate, c)``: x (B, N, C) the previous sub-block's output to add to the
    stream h with ``gate`` (h, gate None: x is the stream), c (B, C) the conditioning ->
    (this block's MLP output, the stream before it, its gate)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        hidden = config.hidden_size
        self.mlp_norm_eps = config.mlp_norm_eps
        self.attn = Attention(hidden, config.heads, config.qkv_bias, config.attention == "linear")
        self.mlp = make_ffn(config, approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, h, gate, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        n, h = dcae_kernels.modulated_layer_norm(x if h is None else x.to(h.dtype), shift_msa, scale_msa, NORM_EPS,
                                                 h, gate)
        a = self.attn(n)
        n, h = dcae_kernels.modulated_layer_norm(a.to(h.dtype), shift_mlp, scale_mlp, self.mlp_norm_eps, h, gate_msa)
        return self.mlp(n), h, gate_mlp


class FinalLayer(nn.Module):
    """The last gated add, adaLN (shift, scale) LayerNorm and the Linear to each patch's output values."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        hidden = config.hidden_size
        self.linear = nn.Linear(hidden, config.patch_size ** 2 * config.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, h, gate, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        n, _ = dcae_kernels.modulated_layer_norm(x.to(h.dtype), shift, scale, NORM_EPS, h, gate)
        return self.linear(n)


class DiT(LatentTransformer):
    """DiT on latents (B, in_channels, H, W): ``forward(x, t, y)`` -> (B, out_channels, H, W), the noise
    prediction then (learn_sigma) the variance interpolation values. See `LatentTransformer` for t and y, and for
    ``from_config`` / ``from_pretrained`` / ``save_pretrained`` (``format="diffusers"``: a `DiTTransformer2DModel`
    folder)."""

    config_class = DiTConfig
    get_config = staticmethod(get_dit_config)

    def __init__(self, config: DiTConfig):
        super().__init__(config)
        hidden = config.hidden_size
        self.x_embedder = PatchEmbed(config.in_channels, hidden, config.patch_size)
        self.t_embedder = TimestepEmbedder(hidden, config.timestep_freq_shift)
        self.y_embedder = ClassEmbedder(config.num_classes, hidden)
        self.register_buffer("pos_embed", torch.empty(config.num_patches, hidden), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The original's: xavier-uniform Linears with zero biases, N(0, 0.02) class table and timestep MLP, the
        fixed sin-cos position embedding, zero adaLN modulations and final Linear (the model starts at output 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for i in (0, 2):
            nn.init.normal_(self.t_embedder.mlp[i].weight, std=0.02)
        for layer in [*(block.adaLN_modulation[-1] for block in self.blocks), self.final_layer.adaLN_modulation[-1],
                      self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the fixed position embedding buffer (not in the state dict) on the weights' device."""
        device = self.x_embedder.proj.weight.device
        self.pos_embed = sincos_pos_embed_2d(self.config.hidden_size, *self.config.grid, device=device).to(
            self.x_embedder.proj.weight.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, t, y)
        cfg = self.config
        c = self.t_embedder(t) + self.y_embedder(y)
        out, h, gate = self.x_embedder(x) + self.pos_embed, None, None
        for block in self.blocks:
            out, h, gate = run_block(block, self.gradient_checkpointing, out, h, gate, c)
        return unpatchify(self.final_layer(out, h, gate, c), cfg.grid, cfg.out_channels, cfg.patch_size)
