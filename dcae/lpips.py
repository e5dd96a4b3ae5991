"""LPIPS v0.1 (Zhang et al. 2018) with a VGG16 trunk, in plain torch; weights come only from a local file.

    d(a, b) = sum_l mean_hw( w_l . (n(f_l(a)) - n(f_l(b)))^2 )

f_l: the VGG16 outputs relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the input scaled by (x - shift) / scale;
n: unit length over channels; w_l: the learned non-negative 1x1 heads (no bias).

One weight file holds trunk and heads under this module's key names. Make it from the two files users have,
torchvision's vgg16-397923af.pth and the lpips package's weights/v0.1/vgg.pth:

    python -m dcae.lpips convert --vgg vgg16-397923af.pth --heads vgg.pth --out lpips_vgg.safetensors
"""
import argparse
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .weights import check_state_dict, freeze, load_frozen, read_state_dict

# torchvision's VGG16 `features` up to relu5_3: 3x3 conv widths (each followed by ReLU), "M" a 2x2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


class LPIPS(nn.Module):
    """LPIPS-VGG distance: a, b (B, 3, H, W) in [-1, 1] -> (B,). Frozen; differentiable in a and b."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for width in VGG16_LAYOUT:
            if width == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU()]
                c_in = width
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        freeze(self)

    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPS":
        """Trunk and heads from one local file under this module's keys (see `convert`)."""
        return load_frozen(cls(), path, "LPIPS")

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) scaled input -> the five ReLU outputs (N, C_l, H / 2^l, W / 2^l)."""
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
            raise ValueError(f"a and b must both be (B, 3, H, W), got {tuple(a.shape)} and {tuple(b.shape)}")
        distance = 0
        for f, head in zip(self.taps((torch.cat([a, b]) - self.shift) / self.scale), self.heads):
            # vector_norm's gradient is 0 where a pixel's features are all 0 (sqrt's would be NaN)
            f = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + EPS)
            f_a, f_b = f.chunk(2)
            distance = distance + head((f_a - f_b).square()).mean(dim=(1, 2, 3))
        return distance


def load_lpips(path: str | Path | None) -> tuple[LPIPS | None, str]:
    """(frozen LPIPS, what was loaded) from a local file, or (None, why LPIPS is off) when no path is given.

    A path that is given but absent raises FileNotFoundError: asking for LPIPS and silently not getting it
    would change what is trained or reported."""
    if path is None:
        return None, "LPIPS disabled: no --lpips-weights file given (LPIPS weights are never downloaded)"
    return LPIPS.from_file(path), f"LPIPS (VGG16) weights loaded from {path}"


def convert(vgg: Mapping[str, torch.Tensor], heads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision VGG16 state dict (features.N.weight/bias; classifier.* dropped) + lpips v0.1 heads
    (lin{l}.model.1.weight, (1, C_l, 1, 1)) -> one state dict under LPIPS's keys."""
    expected = {k: v.shape for k, v in LPIPS().state_dict().items()}
    trunk = {k: v for k, v in vgg.items() if not k.startswith("classifier.")}
    check_state_dict(trunk, {k: s for k, s in expected.items() if k.startswith("features.")}, "VGG16 weights")
    head_names = {f"lin{i}.model.1.weight": f"heads.{i}.weight" for i in range(len(TAP_CHANNELS))}
    check_state_dict(heads, {src: expected[dst] for src, dst in head_names.items()}, "LPIPS heads")
    converted = trunk | {dst: heads[src] for src, dst in head_names.items()}
    return {k: v.detach().float().contiguous() for k, v in converted.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dcae.lpips", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="merge torchvision VGG16 and lpips v0.1 head weights into one file")
    conv.add_argument("--vgg", required=True, help="torchvision vgg16-397923af.pth")
    conv.add_argument("--heads", required=True, help="lpips package weights/v0.1/vgg.pth")
    conv.add_argument("--out", required=True, help="output .safetensors")
    args = parser.parse_args(argv)
    if Path(args.out).suffix != ".safetensors":
        parser.error(f"--out must end in .safetensors, got {args.out}")
    state = convert(read_state_dict(args.vgg, "VGG16"), read_state_dict(args.heads, "LPIPS heads"))
    save_file(state, args.out)
    print(f"wrote {args.out}: {len(state)} tensors")


if __name__ == "__main__":
    main()
