"""LPIPS-VGG: weight files (round trip, conversion from the torchvision and lpips files, refusals), the
distance against a hand-wired computation, and what a training loss needs."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dcae.lpips import LPIPS, convert, load_lpips, main

CONVS = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]  # torchvision VGG16 conv indices per stage
WIDTHS = [64, 128, 256, 512, 512]


@pytest.fixture(scope="module")
def net() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS()


def images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def source_state_dicts() -> tuple[dict, dict]:
    """Random tensors with the names and shapes of torchvision's vgg16-397923af.pth and lpips' v0.1/vgg.pth."""
    g = torch.Generator().manual_seed(2)
    vgg, c_in = {}, 3
    for stage, width in zip(CONVS, WIDTHS):
        for i in stage:
            vgg[f"features.{i}.weight"] = torch.randn(width, c_in, 3, 3, generator=g) * (2 / (9 * c_in)) ** 0.5
            vgg[f"features.{i}.bias"] = torch.randn(width, generator=g) * 0.1
            c_in = width
    for i in (0, 3, 6):  # the classifier (really (4096, 25088) ...): only its names matter, it is dropped
        vgg[f"classifier.{i}.weight"], vgg[f"classifier.{i}.bias"] = torch.randn(4, 8), torch.randn(4)
    heads = {f"lin{i}.model.1.weight": torch.rand(1, w, 1, 1, generator=g) for i, w in enumerate(WIDTHS)}
    return vgg, heads


def hand_wired_lpips(vgg: dict, heads: dict, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 computed straight from the two source state dicts."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    xs, total = [(a - shift) / scale, (b - shift) / scale], 0
    for stage, convs in enumerate(CONVS):
        for j in range(2):
            if stage > 0:
                xs[j] = F.max_pool2d(xs[j], 2)
            for i in convs:
                xs[j] = F.relu(F.conv2d(xs[j], vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
        na, nb = (x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10) for x in xs)
        total = total + ((na - nb).square() * heads[f"lin{stage}.model.1.weight"]).sum(dim=1).mean(dim=(1, 2))
    return total


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weight_file_round_trip(net, tmp_path, suffix):
    path = tmp_path / f"lpips{suffix}"
    if suffix == ".safetensors":
        save_file(net.state_dict(), path)
    else:
        torch.save(net.state_dict(), path)
    loaded = LPIPS.from_file(path)
    a, b = images(seed=1), images(seed=2)
    assert torch.equal(loaded(a, b), net(a, b))


def test_converted_files_give_the_hand_wired_distance(tmp_path):
    vgg, heads = source_state_dicts()
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    torch.save(heads, tmp_path / "vgg.pth")
    out = tmp_path / "lpips_vgg.safetensors"
    main(["convert", "--vgg", str(tmp_path / "vgg16-397923af.pth"), "--heads", str(tmp_path / "vgg.pth"),
          "--out", str(out)])
    net = LPIPS.from_file(out)
    a, b = images(seed=3), images(seed=4)
    expected = hand_wired_lpips(vgg, heads, a, b)
    assert (expected > 0.01).all()
    torch.testing.assert_close(net(a, b), expected, rtol=1e-5, atol=1e-6)


def test_identical_inputs_are_at_distance_zero(net):
    x = images(3)
    torch.testing.assert_close(net(x, x), torch.zeros(3), rtol=0, atol=1e-7)


def test_frozen_but_differentiable_in_the_inputs(net):
    a = images(seed=5).requires_grad_()
    net(a, images(seed=6)).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    assert not net.training
    assert all(not p.requires_grad and p.grad is None for p in net.parameters())


def test_missing_file_says_nothing_is_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs local weights.*nothing is downloaded"):
        LPIPS.from_file(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_lpips(tmp_path / "absent.pth")


def test_wrong_keys_and_shapes_are_listed(net, tmp_path):
    state = dict(net.state_dict())
    del state["heads.2.weight"]
    state["heads.9.weight"] = torch.zeros(1, 64, 1, 1)
    state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError) as info:
        LPIPS.from_file(tmp_path / "bad.safetensors")
    message = str(info.value)
    assert "missing (1):\n    heads.2.weight" in message and "unexpected (1):\n    heads.9.weight" in message
    assert "features.0.weight: (64, 3, 5, 5), expected (64, 3, 3, 3)" in message


def test_converter_refuses_bad_source_files():
    vgg, heads = source_state_dicts()
    with pytest.raises(ValueError, match=r"LPIPS heads does not fit: 1 missing(.|\n)*missing \(1\):\n    lin3.model.1.weight"):
        convert(vgg, {k: v for k, v in heads.items() if k != "lin3.model.1.weight"})
    with pytest.raises(ValueError, match=r"unexpected \(1\):\n    lin5.model.1.weight"):
        convert(vgg, heads | {"lin5.model.1.weight": torch.zeros(1, 8, 1, 1)})
    with pytest.raises(ValueError, match=r"VGG16 weights does not fit(.|\n)*features.28.bias: \(3,\), expected \(512,\)"):
        convert(vgg | {"features.28.bias": torch.zeros(3)}, heads)


def test_converter_writes_safetensors_only(tmp_path):
    with pytest.raises(SystemExit):
        main(["convert", "--vgg", "a.pth", "--heads", "b.pth", "--out", str(tmp_path / "out.pth")])


def test_load_lpips(net, tmp_path):
    module, message = load_lpips(None)
    assert module is None and message.startswith("LPIPS disabled:")
    save_file(net.state_dict(), tmp_path / "lpips.safetensors")
    module, message = load_lpips(tmp_path / "lpips.safetensors")
    assert isinstance(module, LPIPS) and "lpips.safetensors" in message
