"""U-ViT (Bao et al.) as efficientvit trains it on DC-AE latents: time and class as tokens, long skips.

Tokens: [class, time, patches] + a learned position embedding; ``depth // 2`` in-blocks, a mid-block and
``depth // 2`` out-blocks, out-block i taking in-block ``depth // 2 - 1 - i``'s output through
``skip_linear(cat[x, skip])``; pre-norm blocks (LayerNorm, eps 1e-5, with affine); final LayerNorm -> Linear on
the patch tokens. The time token is the timestep sinusoid of hidden_size frequencies itself (no time MLP).
Parameter names follow efficientvit's, except the patch embedding (a Linear on space-to-channel patches, theirs a
stride-p conv: the same weights reshaped) and ``decoder_pred``'s output order (channel, row, column) within a patch
(theirs: row, column, channel).
"""
import torch
from torch import nn

from .latent_transformer import LatentTransformer
from .transformer_blocks import Attention, ClassEmbedder, PatchEmbed, make_ffn, run_block, timestep_sinusoid, unpatchify
from .transformer_config import EXTRA_TOKENS, UViTConfig, get_uvit_config


class UViTBlock(nn.Module):
    """Pre-norm transformer block; with ``skip``, first ``x = skip_linear(cat[x, skip])``. (B, N, C) -> (B, N, C)."""

    def __init__(self, config: UViTConfig, skip: bool = False):
        super().__init__()
        hidden = config.hidden_size
        self.skip_linear = nn.Linear(2 * hidden, hidden) if skip else None
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = Attention(hidden, config.heads, config.qkv_bias, config.attention == "linear")
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = make_ffn(config, approximate="none", extra_tokens=EXTRA_TOKENS)

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(LatentTransformer):
    """U-ViT on latents (B, in_channels, H, W): ``forward(x, t, y)`` -> (B, out_channels, H, W). See
    `LatentTransformer` for t and y, and for ``from_config`` / ``from_pretrained`` / ``save_pretrained`` (diffusers
    has no U-ViT: ``format="diffusers"`` is refused)."""

    config_class = UViTConfig
    get_config = staticmethod(get_uvit_config)

    def __init__(self, config: UViTConfig):
        super().__init__(config)
        hidden = config.hidden_size
        self.patch_embed = PatchEmbed(config.in_channels, hidden, config.patch_size)
        self.label_emb = ClassEmbedder(config.num_classes, hidden)
        self.pos_embed = nn.Parameter(torch.empty(1, EXTRA_TOKENS + config.num_patches, hidden))
        self.in_blocks = nn.ModuleList(UViTBlock(config) for _ in range(config.depth // 2))
        self.mid_block = UViTBlock(config)
        self.out_blocks = nn.ModuleList(UViTBlock(config, skip=True) for _ in range(config.depth // 2))
        self.norm = nn.LayerNorm(hidden)
        self.decoder_pred = nn.Linear(hidden, config.patch_size ** 2 * config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """efficientvit's: truncated N(0, 0.02) position embedding and Linear weights, zero biases, LayerNorms at
        identity; the class table keeps `nn.Embedding`'s N(0, 1)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, t, y)
        cfg = self.config
        time = timestep_sinusoid(t, cfg.hidden_size).to(self.pos_embed.dtype)
        tokens = torch.cat([self.label_emb(y)[:, None], time[:, None], self.patch_embed(x)], dim=1) + self.pos_embed
        skips = []
        for block in self.in_blocks:
            tokens = run_block(block, self.gradient_checkpointing, tokens)
            skips.append(tokens)
        tokens = run_block(self.mid_block, self.gradient_checkpointing, tokens)
        for block in self.out_blocks:
            tokens = run_block(block, self.gradient_checkpointing, tokens, skips.pop())
        out = self.decoder_pred(self.norm(tokens))[:, EXTRA_TOKENS:]
        return unpatchify(out, cfg.grid, cfg.out_channels, cfg.patch_size)
