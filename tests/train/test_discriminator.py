import pytest
import torch

from dcae.train.discriminator import NLayerDiscriminator


@pytest.mark.parametrize("size, out", [(64, 6), (256, 30)])
def test_output_shape(size, out):
    disc = NLayerDiscriminator()
    logits = disc(torch.rand(2, 3, size, size) * 2 - 1)
    assert logits.shape == (2, 1, out, out)


def test_parameter_count_matches_taming():
    # conv 3->64 (+bias) 3,136; conv 64->128 131,072 + BN 256; conv 128->256 524,288 + BN 512;
    # conv 256->512 (stride 1) 2,097,152 + BN 1,024; conv 512->1 (+bias) 8,193.
    disc = NLayerDiscriminator(3, 64, 3)
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633


def test_layout_and_init_follow_taming():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    convs = [disc.main[i] for i in (0, 2, 5, 8, 11)]
    norms = [disc.main[i] for i in (3, 6, 9)]
    assert all(isinstance(m, torch.nn.Conv2d) for m in convs)
    assert all(isinstance(m, torch.nn.BatchNorm2d) for m in norms)
    assert [c.bias is None for c in convs] == [False, True, True, True, False]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    big = disc.main[8].weight
    assert abs(big.mean().item()) < 1e-3 and abs(big.std().item() - 0.02) < 1e-3
    for norm in norms:
        assert torch.all(norm.bias == 0)
        assert abs(norm.weight.mean().item() - 1) < 0.01 and 0 < norm.weight.std().item() < 0.05


def test_channel_multiplier_capped_at_8():
    disc = NLayerDiscriminator(3, ndf=8, n_layers=5)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 64, 64, 1]
    assert disc(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 6, 6)
