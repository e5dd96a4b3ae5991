"""rFID: the Frechet distance against closed forms, the feature moments, and the FID Inception read from a
file with pytorch-fid's key names."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from dcae.fid import FeatureMoments, FIDInception, ReconstructionFID, frechet_distance, load_inception

# torchvision's documented inception_v3 parameter count (27,161,264) less its aux classifier
# (98,560 + 2,459,136 + 769,000) and its 1000-way fc (2,049,000): the layers up to pool3.
INCEPTION_POOL3_PARAMS = 21_785_568


def random_gaussian(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    m = rng.normal(size=(d, 2 * d))
    return rng.normal(size=d), m @ m.T / (2 * d)


def psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_matches_the_symmetric_formula():
    rng = np.random.default_rng(0)
    (mu1, s1), (mu2, s2) = random_gaussian(rng, 16), random_gaussian(rng, 16)
    r = psd_sqrt(s1)  # tr (s1 s2)^(1/2) = tr (s1^(1/2) s2 s1^(1/2))^(1/2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(psd_sqrt(r @ s2 @ r))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_frechet_distance_in_one_dimension():
    assert frechet_distance(1.0, 4.0, 3.0, 9.0) == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2)


def test_frechet_distance_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"must be \(D,\) and \(D, D\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_moments_over_batches():
    rows = torch.randn(11, 5, generator=torch.Generator().manual_seed(0)) + 3
    moments = FeatureMoments()
    for part in rows.split(4):
        moments.update(part)
    mean, cov = moments.mean_cov()
    np.testing.assert_allclose(mean, rows.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(rows.double().numpy(), rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureMoments().mean_cov()


def test_reconstruction_fid_compares_real_and_reconstructed_features():
    features = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    g = torch.Generator().manual_seed(1)
    real, recon = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1, torch.rand(6, 3, 8, 8, generator=g) - 0.8
    rfid = ReconstructionFID(features)
    rfid.update(real[:3], recon[:3])
    rfid.update(real[3:], recon[3:])
    f_real, f_recon = features(real).double().numpy(), features(recon).double().numpy()
    expected = frechet_distance(f_recon.mean(0), np.cov(f_recon, rowvar=False),
                                f_real.mean(0), np.cov(f_real, rowvar=False))
    assert rfid.compute() == pytest.approx(expected, rel=1e-9)
    assert expected > 0.1


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random FID Inception as pytorch-fid's file holds it: torchvision key names, a 1008-way fc, no
    num_batches_tracked. Weights are scaled so that features do not vanish through the 94 layers."""
    torch.manual_seed(seed)
    state = {}
    for key, value in FIDInception().state_dict().items():
        if key.endswith("conv.weight"):
            value = nn.init.kaiming_normal_(torch.empty_like(value), nonlinearity="relu")
        elif key.endswith(("bn.weight", "running_var")):
            value = torch.rand_like(value) + 0.5
        elif key.endswith(("bn.bias", "running_mean")):
            value = torch.randn_like(value) * 0.1
        if not key.endswith("num_batches_tracked"):
            state[key] = value
    return state | {"fc.weight": torch.randn(1008, 2048) / 2048**0.5, "fc.bias": torch.randn(1008)}


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    state = random_inception_state()
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path, state


def test_inception_reads_pytorch_fid_keys_and_gives_pool3_features(inception_file):
    path, state = inception_file
    net = FIDInception.from_file(path)
    assert sum(p.numel() for p in net.parameters()) == INCEPTION_POOL3_PARAMS and net.fc is None
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    net.train()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        features = net(torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    assert features.shape == (1, 2048) and torch.isfinite(features).all() and features.std() > 1e-3


def test_inception_refuses_wrong_files(inception_file, tmp_path):
    _, state = inception_file
    bad = {k: v for k, v in state.items() if k != "Mixed_6e.branch_pool.bn.running_var"}
    bad["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 3, 5, 5)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing \(1\):\n    Mixed_6e.branch_pool.bn.running_var\n  "
                                         r"mis-shaped \(1\):\n    Conv2d_1a_3x3.conv.weight: \(32, 3, 5, 5\)"):
        FIDInception.from_file(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="FID Inception needs local weights.*nothing is downloaded"):
        FIDInception.from_file(tmp_path / "absent.pth")
    module, message = load_inception(None)
    assert module is None and message.startswith("rFID disabled:")


def test_inception_classifier_gives_unbiased_logits_on_request(inception_file, tmp_path):
    path, state = inception_file
    net = FIDInception.from_file(path, classifier=True)
    assert not net.fc.weight.requires_grad and torch.equal(net.fc.bias, state["fc.bias"])
    features = torch.rand(3, 2048, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(net.logits(features), features @ state["fc.weight"].T)  # no bias, as the IS code
    with pytest.raises(ValueError, match="no classifier"):
        FIDInception().logits(features)
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "pool3_only.pth")
    with pytest.raises(ValueError, match=r"missing \(2\):\n    fc.weight\n    fc.bias"):
        FIDInception.from_file(tmp_path / "pool3_only.pth", classifier=True)
