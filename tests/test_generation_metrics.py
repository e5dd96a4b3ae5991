"""Generation metrics: the Inception Score against a direct computation, reference npz files (ours and ADM's
keys), and `dcae fid-ref` + `dcae evaluate-gen` end to end with a random Inception (FID of a set against
itself, IS of identical images), and their one-line errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dcae import generation_metrics
from dcae.cli import main
from dcae.data import load_image
from dcae.fid import FIDInception
from dcae.generation_metrics import InceptionStatistics, inception_score, load_reference, save_reference
from dcae.latents import load_center_crop

from .cli_errors import exit_code
from .test_fid import random_inception_state
from .threads import one_thread  # noqa: F401 (autouse: Inception on one thread)


def numpy_inception_score(logits: np.ndarray, splits: int) -> tuple[float, float]:
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    scores = []
    for part in np.array_split(p, splits):  # equal consecutive parts when splits divides N
        kl = (part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_a_direct_computation():
    logits = np.random.default_rng(0).normal(0, 3, (24, 7))
    for splits in (1, 4):
        assert inception_score(torch.tensor(logits, dtype=torch.float32), splits) == pytest.approx(
            numpy_inception_score(logits.astype(np.float32).astype(np.float64), splits), rel=1e-9)
    score, spread = inception_score(np.repeat(logits[:1], 6, axis=0), splits=2)
    assert score == pytest.approx(1.0, abs=1e-12) and spread == pytest.approx(0.0, abs=1e-12)
    one_hot = np.eye(7)[np.arange(14) % 7] * 100  # confident and evenly spread over 7 classes: IS -> 7
    assert inception_score(one_hot, splits=2)[0] == pytest.approx(7.0, rel=1e-6)
    with pytest.raises(ValueError, match="N >= splits"):
        inception_score(logits[:3], splits=4)


def test_reference_npz_round_trip_and_adm_keys(tmp_path):
    rng = np.random.default_rng(1)
    m = rng.normal(size=(2048, 8))
    stats = {"mu": rng.normal(size=2048), "sigma": m @ m.T, "count": 8, "resolution": 32}
    save_reference(tmp_path / "ref.npz", stats)
    with np.load(tmp_path / "ref.npz") as npz:
        assert sorted(npz.files) == ["count", "mu", "resolution", "sigma"] and npz["count"] == 8
    mu, sigma = load_reference(tmp_path / "ref.npz")
    assert np.array_equal(mu, stats["mu"]) and np.array_equal(sigma, stats["sigma"])
    # ADM's reference batches: images in arr_0, float32 statistics, spatial ones beside them
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=stats["mu"].astype(np.float32),
             sigma=stats["sigma"].astype(np.float32), mu_s=np.zeros(7), sigma_s=np.eye(7))
    mu, sigma = load_reference(tmp_path / "adm.npz")
    assert mu.dtype == np.float64 and np.allclose(sigma, stats["sigma"], rtol=1e-6)
    np.savez(tmp_path / "no_sigma.npz", mu=stats["mu"])
    np.savez(tmp_path / "small.npz", mu=np.zeros(4), sigma=np.eye(4))
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "text.npz").write_text("not an archive")
    for name, message in [("no_sigma.npz", "it has no sigma"), ("small.npz", "must be"),
                          ("array.npy", "single array"), ("text.npz", "not a reference statistics npz")]:
        with pytest.raises(ValueError, match=message):
            load_reference(tmp_path / name)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state(), path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """4 photos of different sizes in class folders, and their 32 px ADM centre crops saved as PNG samples."""
    root = tmp_path_factory.mktemp("gen")
    rng = np.random.default_rng(2)
    for i, size in enumerate([(40, 33), (33, 45), (64, 64), (50, 36)]):
        pixels = np.clip(rng.uniform(0, 255, 3) + rng.normal(0, 60, (size[1], size[0], 3)), 0, 255)
        path = root / "data" / f"class{i % 2}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)
        crop = load_center_crop(path, 32).permute(1, 2, 0).numpy()
        (root / "samples" / "nested").mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(root / "samples" / ("nested" if i else "") / f"{i}.png")
    return root


def test_fid_ref_then_evaluate_gen_on_the_same_images(weights, folders, tmp_path, capsys, monkeypatch):
    """The samples are the reference's crops saved as PNG: evaluate-gen hands frechet_distance the reference's own
    moments, and the FID of 2048-d covariances of rank 3 is 0 (up to the square roots of round-off eigenvalues)."""
    calls = []
    distance = generation_metrics.frechet_distance
    monkeypatch.setattr(generation_metrics, "frechet_distance",
                        lambda *moments: calls.append(moments) or distance(*moments))
    ref, out = tmp_path / "ref.npz", tmp_path / "res" / "gen.json"
    assert main(["fid-ref", "--data", str(folders / "data"), "--resolution", "32", "--fid-weights", str(weights),
                 "--out", str(ref), "--device", "cpu"]) == 0
    with np.load(ref) as npz:
        assert npz["count"] == 4 and npz["resolution"] == 32 and npz["sigma"].shape == (2048, 2048)
        mu, sigma = npz["mu"], npz["sigma"]
    assert main(["evaluate-gen", "--samples", str(folders / "samples"), "--ref", str(ref), "--fid-weights",
                 str(weights), "--splits", "2", "--batch-size", "3", "--device", "cpu", "--output", str(out)]) == 0
    assert "4 samples: FID " in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["count"] == 4 and result["is_splits"] == 2 and abs(result["fid"]) < 1e-5 * np.trace(sigma)
    assert 1.0 < result["inception_score"] <= 2.0  # at most the number of images in a split
    (mu_samples, sigma_samples, mu_ref, sigma_ref), = calls
    assert np.array_equal(mu_ref, mu) and np.array_equal(sigma_ref, sigma) and np.abs(sigma).max() > 1e-3
    np.testing.assert_allclose(mu_samples, mu, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma_samples, sigma, rtol=1e-10, atol=1e-12)


def test_inception_score_of_identical_images_is_one(weights, folders):
    stats = InceptionStatistics(FIDInception.from_file(weights, classifier=True))
    for _ in range(2):
        stats.update(load_image(folders / "samples" / "0.png"))
    logits = torch.cat(stats.logits)
    assert logits.shape == (2, 1008) and logits.std() > 1e-3
    assert inception_score(logits, splits=1)[0] == pytest.approx(1.0, abs=1e-9)


def test_cli_errors_are_one_line(weights, folders, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.npz").write_text("not an archive")
    ref = tmp_path / "ref.npz"
    save_reference(ref, {"mu": np.zeros(2048), "sigma": np.eye(2048), "count": 2, "resolution": 32})
    samples = ["evaluate-gen", "--samples", str(folders / "samples"), "--ref", str(ref)]
    data = ["fid-ref", "--data", str(folders / "data"), "--resolution", "32", "--out", str(tmp_path / "r.npz")]
    cases = [(samples, "the following arguments are required: --fid-weights"),
             (samples + ["--fid-weights", str(tmp_path / "absent.pth")], "nothing is downloaded"),
             (data + ["--fid-weights", str(tmp_path)], "nothing is downloaded"),
             (["evaluate-gen", "--samples", str(tmp_path / "empty"), "--ref", str(ref), "--fid-weights", str(weights)],
              "no image files"),
             (["fid-ref", "--data", str(tmp_path / "absent"), "--resolution", "32", "--out", str(ref),
               "--fid-weights", str(weights)], "does not exist"),
             (["evaluate-gen", "--samples", str(folders / "samples"), "--ref", str(tmp_path / "bad.npz"),
               "--fid-weights", str(weights)], "is not a reference statistics npz"),
             (data[:-2] + ["--out", str(tmp_path / "r.txt"), "--fid-weights", str(weights)], "unsupported output type")]
    for argv, message in cases:
        assert exit_code(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith(f"dcae {argv[0]}: error: "), err
