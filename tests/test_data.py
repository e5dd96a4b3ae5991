"""dcae/data.py: image folders (scan, skips, crops, RNG, held-out split), the builtin photos, image helpers."""
import socket
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dcae import data

R = 64


def photo(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """9 files with image suffixes (7 usable at R = 64, one too small, one corrupt) and a text file."""
    root = tmp_path_factory.mktemp("images")
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    Image.fromarray(photo(80, 96, 1)).save(root / "a" / "one.png")
    Image.fromarray(photo(72, 72, 2)).save(root / "a" / "b" / "two.jpg")
    Image.fromarray(photo(64, 100, 3)).save(root / "c" / "three.webp")
    Image.fromarray(photo(90, 70, 4)).save(root / "c" / "FOUR.JPEG")
    transparent = np.concatenate([photo(70, 70, 5), np.zeros((70, 70, 1), np.uint8)], axis=-1)
    Image.fromarray(transparent, "RGBA").save(root / "rgba.png")
    Image.fromarray(photo(66, 80, 6)[..., 0], "L").save(root / "gray.png")
    Image.fromarray(photo(64, 64, 7)).quantize(16).save(root / "a" / "palette.png")
    Image.fromarray(photo(32, 200, 8)).save(root / "small.png")
    (root / "corrupt.png").write_bytes(np.random.default_rng(9).bytes(500))
    (root / "notes.txt").write_text("not an image")
    return root


def build(*args, **kwargs):
    """(dataset, the warnings its construction raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = data.ImageFolder(*args, **kwargs)
    return dataset, [str(w.message) for w in caught]


def test_folder_scan_counts_and_single_warning(folder):
    dataset, messages = build(folder, R)
    assert len(data.image_files(folder)) == 9
    assert len(dataset) == 7
    assert {path.name for path in dataset.files} == {"one.png", "two.jpg", "three.webp", "FOUR.JPEG", "rgba.png",
                                                      "gray.png", "palette.png"}
    assert dataset.files == sorted(dataset.files)
    assert messages == [f"skipped 2 of 9 images under {folder}: 1 smaller than {R} px, 1 unreadable"]


def test_folder_items_shape_range_colour(folder):
    for train in (True, False):
        dataset, _ = build(folder, R, train=train)
        for index, path in enumerate(dataset.files):
            item = dataset[index]
            assert item.shape == (3, R, R) and item.dtype == torch.float32
            assert -1 <= item.min() and item.max() <= 1
            if path.name == "gray.png":
                assert torch.equal(item[0], item[1]) and torch.equal(item[1], item[2])
            if path.name == "rgba.png":  # fully transparent -> composited onto white
                assert torch.all(item == 1)


def test_center_crop_is_the_middle(folder):
    dataset, _ = build(folder, R, train=False)
    index = [path.name for path in dataset.files].index("one.png")
    expected = torch.from_numpy(photo(80, 96, 1)[8:72, 16:80]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(dataset[index], expected)
    assert torch.equal(dataset[index], dataset[index])


def test_random_crops_follow_torch_seed(folder):
    dataset, _ = build(folder, R)

    def epoch(seed):
        torch.manual_seed(seed)
        return torch.stack([dataset[index] for index in range(len(dataset))])

    assert torch.equal(epoch(0), epoch(0))
    assert not torch.equal(epoch(0), epoch(1))


def test_dataloader_workers_reproduce_batches(folder):
    dataset, _ = build(folder, R)

    def batches():
        torch.manual_seed(0)
        return torch.cat(list(DataLoader(dataset, batch_size=3, shuffle=True, num_workers=2)))

    assert torch.equal(batches(), batches())


def test_flips_happen_sometimes(tmp_path):
    image = photo(R, R, 10)  # crop == whole image, so only the flip varies
    Image.fromarray(image).save(tmp_path / "only.png")
    dataset, _ = build(tmp_path, R)
    plain = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    torch.manual_seed(0)
    flipped = []
    for _ in range(32):
        item = dataset[0]
        assert torch.equal(item, plain) or torch.equal(item, plain.flip(-1))
        flipped.append(torch.equal(item, plain.flip(-1)))
    assert 0 < sum(flipped) < 32


def test_file_truncated_after_scan_is_skipped(tmp_path):
    for name, seed in (("a.png", 11), ("b.png", 12), ("c.png", 13)):
        Image.fromarray(photo(R, R, seed)).save(tmp_path / name)
    dataset, _ = build(tmp_path, R, train=False)
    expected_next = dataset[1]
    content = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(content[: len(content) // 2])
    with pytest.warns(UserWarning, match="a.png, unreadable at read time"):
        assert torch.equal(dataset[0], expected_next)
    assert dataset.failed_reads == {tmp_path / "a.png"}
    assert torch.equal(dataset[0], expected_next)  # known-bad file: skipped without another warning
    assert len(dataset.failed_reads) == 1


def test_heldout_split_is_disjoint_and_stable(tmp_path):
    for index in range(60):  # every 4th image too small at resolution 2R
        (tmp_path / f"{index % 3}").mkdir(exist_ok=True)
        size = R if index % 4 == 0 else 2 * R
        Image.fromarray(photo(size, size, index)).save(tmp_path / f"{index % 3}" / f"{index:03d}.png")
    train = data.make_dataset(str(tmp_path), R, "train")
    heldout = data.make_dataset(str(tmp_path), R, "heldout")
    assert train.train and not heldout.train
    assert set(train.files).isdisjoint(heldout.files)
    assert set(train.files) | set(heldout.files) == set(data.image_files(tmp_path))
    assert 1 <= len(heldout) < len(train)
    # at a resolution where some files are skipped, the others stay on their side
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_2r = data.make_dataset(str(tmp_path), 2 * R, "train")
        heldout_2r = data.make_dataset(str(tmp_path), 2 * R, "heldout")
    assert set(train_2r.files) < set(train.files) and set(heldout_2r.files) <= set(heldout.files)


def test_heldout_from_val_data(folder, tmp_path):
    Image.fromarray(photo(R, R, 20)).save(tmp_path / "val.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = data.make_dataset(str(folder), R, "train", val_data=str(tmp_path))
    heldout = data.make_dataset(str(folder), R, "heldout", val_data=str(tmp_path))
    assert len(train) == 7 and train.train
    assert heldout.files == [tmp_path / "val.png"] and not heldout.train


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        data.make_dataset(str(tmp_path / "missing"), R, "train")
    Image.fromarray(photo(16, 16)).save(tmp_path / "tiny.png")
    with pytest.raises(ValueError, match=f"no usable images under {tmp_path} at resolution {R}"):
        data.ImageFolder(tmp_path, R)
    Image.fromarray(photo(R, R)).save(tmp_path / "fine.png")
    with pytest.warns(UserWarning, match="skipped 1 of 2"), pytest.raises(ValueError, match="single usable image"):
        data.make_dataset(str(tmp_path), R, "train")
    with pytest.raises(ValueError, match="split"):
        data.make_dataset(str(tmp_path), R, "test")


def test_builtin_images_load_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    photos = data.builtin_images()
    assert list(photos) == ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right",
                            "hubble_deep_field", "immunohistochemistry", "retina", "china", "flower"]
    for image in photos.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert set(data.BUILTIN_HELDOUT) <= set(photos)


def test_builtin_dataset_splits():
    train = data.BuiltinImages(R, samples_per_epoch=20)
    heldout, again = data.make_dataset("builtin", R, "heldout"), data.BuiltinImages(R, "heldout")
    assert heldout.names == list(data.BUILTIN_HELDOUT) and set(train.names).isdisjoint(heldout.names)
    assert len(train) == 20 and len(heldout) == len(data.BUILTIN_HELDOUT) * len(data.BUILTIN_FIXED_CROPS)
    torch.manual_seed(0)
    items = torch.stack([train[index] for index in range(len(train))])
    assert items.shape == (20, 3, R, R) and items.dtype == torch.float32 and items.abs().max() <= 1
    torch.manual_seed(0)
    assert torch.equal(items, torch.stack([train[index] for index in range(len(train))]))
    fixed = torch.stack([heldout[index] for index in range(len(heldout))])
    assert torch.equal(fixed, torch.stack([again[index] for index in range(len(again))]))
    assert len({item.sum().item() for item in fixed}) == len(fixed)  # distinct crops
    with pytest.raises(IndexError):
        train[20]


def test_builtin_upscales_small_photos():
    heldout = data.BuiltinImages(512, "heldout")
    assert all(min(photo.shape[1:]) == 512 for photo in heldout.photos)  # chelsea 300x451, flower 427x640
    assert heldout[0].shape == (3, 512, 512)
    assert len(heldout) < len(data.BUILTIN_HELDOUT) * len(data.BUILTIN_FIXED_CROPS)  # coinciding crops merged


def test_save_load_round_trip(tmp_path):
    image = torch.rand(1, 3, 20, 30) * 2 - 1
    data.save_image(image, tmp_path / "out" / "image.png")
    loaded = data.load_image(tmp_path / "out" / "image.png")
    assert loaded.shape == (1, 3, 20, 30) and loaded.dtype == torch.float32
    assert (loaded - image).abs().max() <= 1 / 127.5
    data.save_image(loaded[0], tmp_path / "again.png")
    assert torch.equal(data.load_image(tmp_path / "again.png"), loaded)
    with pytest.raises(ValueError, match=r"\(2, 3, 20, 30\)"):
        data.save_image(torch.zeros(2, 3, 20, 30), tmp_path / "batch.png")


def test_load_image_applies_exif_rotation(tmp_path):
    image = Image.fromarray(photo(20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert data.load_image(tmp_path / "rotated.jpg").shape == (1, 3, 30, 20)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        data.load_image(tmp_path / "nothing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="cannot read .*bad.png as an image"):
        data.load_image(tmp_path / "bad.png")


def test_image_grid_layout():
    originals, reconstructions = -torch.ones(4, 3, 8, 10), torch.zeros(4, 3, 8, 10)
    grid = data.image_grid([originals, reconstructions], padding=2)
    assert grid.shape == (3, 2 * 8 + 2, 4 * 10 + 3 * 2)
    assert torch.all(grid[:, :8, :10] == -1) and torch.all(grid[:, 10:, 12:22] == 0)
    assert torch.all(grid[:, 8:10] == 1) and torch.all(grid[:, :, 10:12] == 1)
    assert data.image_grid([originals], padding=0).shape == (3, 8, 40)
    with pytest.raises(ValueError, match="equal-shape"):
        data.image_grid([originals, reconstructions[:2]])
