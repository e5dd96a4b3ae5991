"""A deterministic float64 stand-in for a class-conditional DiT / U-ViT, with the model interface the samplers use."""
import torch


class ToyModel:
    """``out = (0.5 + 0.3 sin(t / 300)) W x + 0.2 cos(t / 500) E[y]`` (W (C_out, C) and E (classes + 1, C_out) fixed
    random, a smooth function of t); with ``learn_sigma`` the second C channels go through tanh into [-1, 1].
    ``forward_with_cfg`` batches [cond; uncond] (null class = ``num_classes``) and guides every channel, as the
    real models do. ``calls`` records which entry point ran."""

    def __init__(self, channels: int = 3, learn_sigma: bool = False, num_classes: int = 4, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        out_channels = channels * (2 if learn_sigma else 1)
        self.weight = torch.randn(out_channels, channels, generator=gen, dtype=torch.float64) / channels ** 0.5
        self.embed = torch.randn(num_classes + 1, out_channels, generator=gen, dtype=torch.float64)
        self.channels, self.learn_sigma, self.num_classes = channels, learn_sigma, num_classes
        self.calls: list[str] = []

    def raw(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64).view(-1, 1, 1, 1)
        out = (0.5 + 0.3 * torch.sin(t / 300)) * torch.einsum("oc,bchw->bohw", self.weight, x)
        out = out + 0.2 * torch.cos(t / 500) * self.embed[y].view(*y.shape, -1, 1, 1)
        if self.learn_sigma:
            out = torch.cat([out[:, :self.channels], torch.tanh(out[:, self.channels:])], dim=1)
        return out

    def forward(self, x, t, y):
        self.calls.append("forward")
        return self.raw(x, t, y)

    def forward_with_cfg(self, x, t, y, scale):
        self.calls.append("forward_with_cfg")
        cond, uncond = self.raw(torch.cat([x, x]), torch.cat([t, t]),
                                torch.cat([y, torch.full_like(y, self.num_classes)])).chunk(2)
        return uncond + scale * (cond - uncond)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float):
    """max |actual - expected| <= tol * max |expected| (and both finite)."""
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    err = (actual - expected).abs().max().item() / expected.abs().max().item()
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"
