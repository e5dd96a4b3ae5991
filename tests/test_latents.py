"""Latent extraction: ADM centre crops, labels from class folders, scaled latents in shards + meta.json, resume,
the rank split, refusal of another setup, LatentDataset, and `dcae encode-latents`."""
import dataclasses
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dcae.cli import main
from dcae.latents import (LatentDataset, adm_center_crop, encode_latents, find_classes, finish_latents,
                          load_center_crop, weights_sha256)
from dcae.models import DCAE, get_config

from .threads import one_thread  # noqa: F401 (autouse: the tiny model's small convolutions on one thread)

SCALE = 0.5
RUN = dict(resolution=32, flip=True, batch_size=4, shard_size=4, device="cpu", progress=False)


def make_model(seed: int) -> DCAE:
    torch.manual_seed(seed)
    return DCAE.from_config(dataclasses.replace(get_config("tiny-f32c8"), scaling_factor=SCALE)).eval()


def save_photo(path, seed: int, size=(70, 52)) -> None:
    """A smooth colour field plus noise, different per seed, so that crops, flips and classes differ."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0, 255, 3) + rng.uniform(0, 128, 3)
    pixels = np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def model():
    return make_model(0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Classes created out of order; one image in a nested folder; a hidden folder that is not a class."""
    root = tmp_path_factory.mktemp("imagenet")
    for c, name in enumerate(["zebra", "ant", "moth"]):
        for i in range(3):
            save_photo(root / name / ("deep" if i == 2 else "") / f"{i}.png", 10 * c + i)
    save_photo(root / ".cache" / "x.png", 99)
    return root


@pytest.fixture(scope="module")
def encoded(model, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "lat"
    result = encode_latents(model, data_dir, out, **RUN)
    assert result == {"shards": 5, "encoded": 5, "kept": 0, "complete": True}
    return out


def items(folder) -> list:
    ds = LatentDataset(folder)
    return [ds[i] for i in range(len(ds))]


def test_adm_center_crop_halves_with_box_then_bicubic_then_centre():
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (52, 70, 3), dtype=np.uint8))
    # short side 52 < 2 * 32: no halving; 70 * 32 / 52 = 43.08 -> 43; centre offset (43 - 32) // 2 = 5
    expected = small.resize((43, 32), Image.Resampling.BICUBIC).crop((5, 0, 37, 32))
    assert np.array_equal(np.array(adm_center_crop(small, 32)), np.array(expected))
    large = Image.fromarray(rng.integers(0, 256, (130, 201, 3), dtype=np.uint8))
    # 130 >= 64: BOX to 100x65; 65 >= 64: BOX to 50x32; then the bicubic resize keeps 50x32; offset 9
    halved = large.resize((100, 65), Image.Resampling.BOX).resize((50, 32), Image.Resampling.BOX)
    expected = halved.resize((50, 32), Image.Resampling.BICUBIC).crop((9, 0, 41, 32))
    assert np.array_equal(np.array(adm_center_crop(large, 32)), np.array(expected))


def test_load_center_crop_reads_the_files_8_bit_pixels(tmp_path):
    save_photo(tmp_path / "a.png", 1)
    crop = load_center_crop(tmp_path / "a.png", 32)
    expected = adm_center_crop(Image.open(tmp_path / "a.png").convert("RGB"), 32)
    assert crop.dtype == torch.uint8 and crop.shape == (3, 32, 32)
    assert torch.equal(crop, torch.from_numpy(np.array(expected)).permute(2, 0, 1))


def test_latents_are_scaled_encodings_of_crops_and_flips_with_class_labels(model, data_dir, encoded):
    classes, files = find_classes(data_dir)
    assert classes == ["ant", "moth", "zebra"]
    ds = LatentDataset(encoded)
    assert len(ds) == 18 and ds.latent_shape == (8, 1, 1) and ds.num_classes == 3 and ds.class_names == classes
    assert ds.scaling_factor == SCALE
    crops = torch.stack([load_center_crop(path, 32) for path, _ in files])
    x = torch.stack([crops, crops.flip(-1)], dim=1).flatten(0, 1).float() / 127.5 - 1  # image, its mirror, ...
    with torch.no_grad():
        expected = model.encode(x) * SCALE
    got = items(encoded)
    assert [label for _, label in got] == [label for _, label in files for _ in range(2)] == [0] * 6 + [1] * 6 + [2] * 6
    latents = torch.stack([z for z, _ in got])
    assert latents.dtype == torch.float32
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(latents[0], latents[1])  # the flip is a different image


def test_meta_and_shards(model, encoded):
    meta = json.loads((encoded / "meta.json").read_text())
    assert meta["autoencoder"] == {"config": json.loads(model.config.to_json()),
                                   "weights_sha256": weights_sha256(model)}
    assert {k: meta[k] for k in ("scaling_factor", "latent_shape", "resolution", "flip", "dtype", "shard_size",
                                 "class_names", "files", "count", "shard_counts", "complete", "skipped")} == {
        "scaling_factor": SCALE, "latent_shape": [8, 1, 1], "resolution": 32, "flip": True, "dtype": "float32",
        "shard_size": 4, "class_names": ["ant", "moth", "zebra"], "files": 9, "count": 18,
        "shard_counts": [4, 4, 4, 4, 2], "complete": True, "skipped": []}
    assert sorted(p.name for p in encoded.iterdir()) == ["meta.json"] + [f"shard-0000{k}.safetensors" for k in range(5)]
    shard = load_file(encoded / "shard-00004.safetensors")
    assert shard["latents"].shape == (2, 8, 1, 1) and shard["latents"].dtype == torch.float32
    assert shard["labels"].dtype == torch.int64 and shard["labels"].tolist() == [2, 2]
    assert weights_sha256(make_model(0)) == weights_sha256(model) != weights_sha256(make_model(1))


def test_resume_encodes_only_missing_or_broken_shards(model, data_dir, encoded, tmp_path):
    out = tmp_path / "lat"
    shutil.copytree(encoded, out)
    (out / "shard-00002.safetensors").unlink()
    (out / "shard-00004.safetensors").unlink()
    (out / ".shard-00004.safetensors.0123abcd.tmp").write_bytes(b"half a shard")  # a crash while writing
    broken = out / "shard-00001.safetensors"
    broken.write_bytes(broken.read_bytes()[:-8])  # truncated
    kept = {k: os.stat(out / f"shard-0000{k}.safetensors") for k in (0, 3)}
    with pytest.warns(UserWarning, match="shard-00001.safetensors is unreadable"):
        result = encode_latents(model, data_dir, out, **RUN)
    assert result == {"shards": 5, "encoded": 3, "kept": 2, "complete": True}
    for k, before in kept.items():
        after = os.stat(out / f"shard-0000{k}.safetensors")
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not list(out.glob(".*.tmp"))
    for (z, label), (z0, label0) in zip(items(out), items(encoded), strict=True):
        assert label == label0 and torch.equal(z, z0)


def test_two_ranks_write_what_one_does(model, data_dir, encoded, tmp_path, monkeypatch):
    out = tmp_path / "lat"
    assert encode_latents(model, data_dir, out, rank=0, world_size=2, **RUN) == {
        "shards": 5, "encoded": 3, "kept": 0, "complete": False}
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-0000{k}.safetensors" for k in (0, 2, 4)]
    with pytest.raises(ValueError, match="is not complete"):
        LatentDataset(out)
    with pytest.raises(ValueError, match="lacks 2 of 5 shards"):
        finish_latents(out)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert encode_latents(model, data_dir, out, **RUN)["encoded"] == 2
    assert finish_latents(out)["count"] == 18
    for (z, label), (z0, label0) in zip(items(out), items(encoded), strict=True):
        assert label == label0 and torch.equal(z, z0)


def test_refuses_another_setup(model, data_dir, encoded, tmp_path):
    cases = [(make_model(1), {}, r"another autoencoder \(weights differ\)"),
             (model, {"resolution": 64}, "resolution 32 there, 64 here"),
             (model, {"flip": False, "dtype": torch.bfloat16}, 'flip true there, false here; dtype "float32" there')]
    for other, change, message in cases:
        with pytest.raises(ValueError, match=message):
            encode_latents(other, data_dir, encoded, **(RUN | change))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and not a latent folder"):
        encode_latents(model, data_dir, tmp_path, **RUN)


def test_flat_folder_and_a_file_that_fails_to_decode(model, tmp_path):
    data = tmp_path / "flat"
    for i in range(3):
        save_photo(data / f"{i}.png", i, size=(40, 33))
    save_photo(data / "bad.png", 7)
    (data / "bad.png").write_bytes((data / "bad.png").read_bytes()[:200])  # the header reads, the pixels do not
    with pytest.warns(UserWarning, match="skipping .*bad.png, unreadable now"):
        encode_latents(model, data, tmp_path / "lat", **(RUN | {"flip": False, "shard_size": 3}))
    ds = LatentDataset(tmp_path / "lat")
    assert ds.class_names == ["flat"] and ds.meta["skipped"] == ["bad.png"] and ds.meta["shard_counts"] == [3, 0]
    assert [ds[i][1] for i in range(len(ds))] == [0, 0, 0]


def test_data_folder_errors(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_classes(tmp_path / "absent")
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        find_classes(tmp_path / "empty")
    (tmp_path / "junk" / "a.png").parent.mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="none of the 1 image files .* is a readable image"):
        encode_latents(model, tmp_path / "junk", tmp_path / "lat", **RUN)
    save_photo(tmp_path / "mixed" / "loose.png", 0)
    save_photo(tmp_path / "mixed" / "cls" / "a.png", 1)
    with pytest.raises(ValueError, match="holds 1 images directly and 1 in class sub-folders"):
        find_classes(tmp_path / "mixed")


def test_latent_dataset_opens_shards_lazily_and_pickles(encoded):
    ds = LatentDataset(encoded)
    first = ds[17]
    assert list(ds._shards) == [4]
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._shards == {} and torch.equal(copy[17][0], first[0]) and copy[17][1] == first[1] == 2
    with pytest.raises(IndexError):
        ds[18]


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    return path


def test_cli_encode_latents(model_dir, data_dir, encoded, tmp_path, capsys):
    out = tmp_path / "lat"
    argv = ["encode-latents", "--model", str(model_dir), "--data", str(data_dir), "--resolution", "32", "--out",
            str(out), "--flip", "--batch-size", "3", "--shard-size", "3", "--tile", "32", "--device", "cpu"]
    assert main(argv) == 0
    assert "18 latents (8, 1, 1) of 3 classes" in capsys.readouterr().out  # shards of 3: a pair straddles
    for (z, label), (z0, label0) in zip(items(out), items(encoded), strict=True):
        assert label == label0 and torch.allclose(z, z0, rtol=1e-5, atol=1e-6)


def test_cli_encode_latents_errors_are_one_line(model_dir, data_dir, encoded, tmp_path, capsys):
    torch.manual_seed(5)
    other = tmp_path / "other_model"
    DCAE.from_config(dataclasses.replace(get_config("tiny-f32c8"), scaling_factor=SCALE)).save_pretrained(other)
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_bytes(b"not an image")
    (tmp_path / "file").write_text("x")
    base = {"--model": model_dir, "--data": data_dir, "--resolution": 32, "--out": tmp_path / "lat"}
    cases = [({"--data": tmp_path / "absent"}, "does not exist"),
             ({"--data": tmp_path / "empty"}, "no image files"),
             ({"--data": tmp_path / "junk"}, "is a readable image"),
             ({"--out": encoded, "--model": other}, "another autoencoder (weights differ)"),
             ({"--resolution": 48}, "--resolution 48 is not a multiple of the compression ratio 32"),
             ({"--out": tmp_path / "file"}, "is a file")]
    for change, message in cases:
        args = base | change
        assert main(["encode-latents", "--flip", *(str(v) for kv in args.items() for v in kv)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dcae encode-latents: error: ") and message in err and err.count("\n") == 1, err
