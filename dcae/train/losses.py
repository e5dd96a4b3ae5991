"""Autoencoder losses: L1 + LPIPS reconstruction, and the phase-3 PatchGAN terms with taming's adaptive weight."""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))). Logits of any shape -> ()."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator loss against a hinge discriminator: -mean(fake). Logits of any shape -> ()."""
    return -logits_fake.mean()


def adaptive_gan_weight(nll_loss: Tensor, g_loss: Tensor, last_layer_weight: Tensor,
                        max_weight: float = 1e4) -> Tensor:
    """Taming's balance of the GAN term: ||d nll / d w|| / (||d g_loss / d w|| + 1e-4), clamped to [0, max_weight].

    nll_loss, g_loss: () scalars that both depend on `last_layer_weight` (the decoder's last conv weight).
    Returns a detached () tensor. Both graphs are kept (retain_graph) for the backward that follows.
    """
    if not last_layer_weight.requires_grad:
        raise ValueError("adaptive_gan_weight: last_layer_weight has requires_grad=False (frozen); the adaptive "
                         "weight needs the gradients of both losses with respect to a trainable last layer")
    nll_grad, = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class ReconstructionLoss(nn.Module):
    """l1_weight * mean|x_rec - x| + lpips_weight * mean(lpips(x_rec, x)).

    lpips: a callable (x_rec, x) -> (B,) perceptual distances (any shape that averages to the batch mean),
    or None for L1 alone. forward(x_rec, x), both (B, 3, H, W) in [-1, 1] -> (total (), parts) where
    parts holds floats for logging: "l1", "lpips" (when used) and "rec" (= total).
    """

    def __init__(self, lpips: Callable[[Tensor, Tensor], Tensor] | None = None,
                 l1_weight: float = 1.0, lpips_weight: float = 1.0):
        super().__init__()
        self.lpips = lpips
        self.l1_weight = l1_weight
        self.lpips_weight = lpips_weight

    def forward(self, x_rec: Tensor, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        if x_rec.shape != x.shape:
            raise ValueError(f"x_rec {tuple(x_rec.shape)} and x {tuple(x.shape)} must have the same shape")
        l1 = (x_rec - x).abs().mean()
        total = self.l1_weight * l1
        parts = {"l1": l1.item()}
        if self.lpips is not None:
            lpips = self.lpips(x_rec, x).mean()
            total = total + self.lpips_weight * lpips
            parts["lpips"] = lpips.item()
        parts["rec"] = total.item()
        return total, parts


class GANLoss(nn.Module):
    """Phase-3 adversarial terms around a discriminator D (taming's VQLPIPSWithDiscriminator without a codebook).

    generator:      rec + disc_weight * adaptive_gan_weight(rec, g, last_layer) * g,  g = -mean(D(x_rec));
                    from step `disc_start` on, plain rec before it (D is not run).
    discriminator:  hinge_d_loss(D(x), D(x_rec.detach())); run it only while `active(step)`.
    The generator term also sends gradients into D's parameters: zero D's gradients before its own backward.
    """

    def __init__(self, discriminator: nn.Module, disc_start: int = 0, disc_weight: float = 1.0,
                 max_weight: float = 1e4):
        super().__init__()
        self.discriminator = discriminator
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.max_weight = max_weight

    def active(self, step: int) -> bool:
        """Whether the GAN terms are on at this optimizer step."""
        return step >= self.disc_start

    def generator_loss(self, rec_loss: Tensor, x_rec: Tensor, last_layer_weight: Tensor,
                       step: int) -> tuple[Tensor, dict[str, float]]:
        """rec_loss: (), x_rec: (B, 3, H, W) with its graph -> (total (), parts: "g_loss", "d_weight", "total")."""
        if not self.active(step):
            return rec_loss, {"g_loss": 0.0, "d_weight": 0.0, "total": rec_loss.item()}
        g_loss = hinge_g_loss(self.discriminator(x_rec))
        d_weight = self.disc_weight * adaptive_gan_weight(rec_loss, g_loss, last_layer_weight, self.max_weight)
        total = rec_loss + d_weight * g_loss
        return total, {"g_loss": g_loss.item(), "d_weight": d_weight.item(), "total": total.item()}

    def discriminator_loss(self, x: Tensor, x_rec: Tensor) -> tuple[Tensor, dict[str, float]]:
        """x, x_rec: (B, 3, H, W) -> (hinge loss (), parts: "d_loss", "logits_real", "logits_fake")."""
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_rec.detach())
        d_loss = hinge_d_loss(logits_real, logits_fake)
        return d_loss, {"d_loss": d_loss.item(), "logits_real": logits_real.mean().item(),
                        "logits_fake": logits_fake.mean().item()}
