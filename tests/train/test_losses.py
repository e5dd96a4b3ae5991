import pytest
import torch
from torch import nn

from dcae.train.losses import (GANLoss, ReconstructionLoss, adaptive_gan_weight, hinge_d_loss,
                               hinge_g_loss)


def test_hinge_losses_on_hand_made_logits():
    real = torch.tensor([2.0, 0.5, -1.0, 1.0])   # relu(1 - real) = 0, 0.5, 2, 0 -> mean 0.625
    fake = torch.tensor([-2.0, 0.0, 1.0, -0.5])  # relu(1 + fake) = 0, 1, 2, 0.5 -> mean 0.875
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.625 + 0.875))
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 5.0), torch.full((2, 1, 3, 3), -5.0)).item() == 0.0
    assert hinge_g_loss(fake).item() == pytest.approx(0.375)


def _toy_generator():
    torch.manual_seed(0)
    body = nn.Conv2d(3, 4, 3, padding=1)
    last = nn.Conv2d(4, 3, 3, padding=1)
    disc = nn.Sequential(nn.Conv2d(3, 1, 3), nn.Flatten())
    x = torch.rand(2, 3, 8, 8)
    x_rec = last(torch.relu(body(x)))
    return x, x_rec, last.weight, disc


def test_adaptive_weight_matches_manual_autograd():
    x, x_rec, w, disc = _toy_generator()
    nll = (x_rec - x).abs().mean()
    g = -disc(x_rec).mean()
    nll_grad = torch.autograd.grad(nll, w, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, w, retain_graph=True)[0]
    expected = nll_grad.norm() / (g_grad.norm() + 1e-4)

    weight = adaptive_gan_weight(nll, g, w)
    torch.testing.assert_close(weight, expected)
    assert not weight.requires_grad
    assert adaptive_gan_weight(nll * 1e9, g * 1e-9, w, max_weight=10.0).item() == 10.0
    (nll + weight * g).backward()  # graphs were retained for the real backward


def test_adaptive_weight_rejects_frozen_last_layer():
    x, x_rec, w, disc = _toy_generator()
    with pytest.raises(ValueError, match="requires_grad=False"):
        adaptive_gan_weight((x_rec - x).abs().mean(), -disc(x_rec).mean(), w.detach())


def test_reconstruction_loss_l1_and_lpips():
    x, y = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    l1 = (x - y).abs().mean()
    total, parts = ReconstructionLoss()(x, y)
    torch.testing.assert_close(total, l1)
    assert parts.keys() == {"l1", "rec"}

    def squared(a, b):
        return ((a - b) ** 2).flatten(1).mean(1)

    total, parts = ReconstructionLoss(squared, l1_weight=2.0, lpips_weight=0.5)(x, y)
    torch.testing.assert_close(total, 2.0 * l1 + 0.5 * squared(x, y).mean())
    assert parts["rec"] == pytest.approx(total.item()) and isinstance(parts["lpips"], float)
    with pytest.raises(ValueError, match="same shape"):
        ReconstructionLoss()(x, y[:1])


def test_gan_loss_off_before_disc_start():
    x, x_rec, w, disc = _toy_generator()
    calls = []
    disc.register_forward_hook(lambda *_: calls.append(1))
    gan = GANLoss(disc, disc_start=10)
    rec = (x_rec - x).abs().mean()
    total, parts = gan.generator_loss(rec, x_rec, w, step=9)
    assert total is rec and parts["d_weight"] == 0.0 and not calls
    assert not gan.active(9) and gan.active(10)


def test_gan_loss_generator_and_discriminator_sides():
    x, x_rec, w, disc = _toy_generator()
    gan = GANLoss(disc, disc_start=10, disc_weight=0.5)
    rec = (x_rec - x).abs().mean()
    g = -disc(x_rec).mean()
    expected = rec + 0.5 * adaptive_gan_weight(rec, g, w) * g
    total, parts = gan.generator_loss(rec, x_rec, w, step=10)
    torch.testing.assert_close(total, expected)
    assert parts["total"] == pytest.approx(expected.item())

    d_loss, parts = gan.discriminator_loss(x, x_rec)
    torch.testing.assert_close(d_loss, hinge_d_loss(disc(x), disc(x_rec)))
    d_loss.backward()
    assert w.grad is None  # the reconstruction is detached on the discriminator side
    assert disc[0].weight.grad is not None
