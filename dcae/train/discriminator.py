"""PatchGAN discriminator (pix2pix / taming-transformers) for phase 3, local refinement."""
from torch import Tensor, nn


class NLayerDiscriminator(nn.Module):
    """PatchGAN: `n_layers` stride-2 4x4 convs, one stride-1 4x4 conv, then a 1-channel 4x4 conv.

    x: (B, in_channels, H, W) in [-1, 1] -> logits (B, 1, H / 2**n_layers - 2, W / 2**n_layers - 2),
    one logit per overlapping patch (70x70 receptive field for n_layers=3; 256 -> 30x30, 64 -> 6x6).
    Channels: ndf * min(2**i, 8) after conv i. Convs followed by BatchNorm2d have no bias.
    The layers sit in `main` at taming's indices, so taming / LDM discriminator weights load as they are.
    Init as taming: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = ndf
        for i in range(1, n_layers + 1):
            out_channels = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> logits (B, 1, H', W')."""
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
