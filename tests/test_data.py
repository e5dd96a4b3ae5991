"""dcae/data.py: image folders (scan, skips, crops, RNG, held-out split), the builtin photos, image helpers."""
import itertools
import socket
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
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


# ---------------------------------------------------------------------------------------------------------------
# Image modes: every mode Pillow opens from a file gives the right [-1, 1] image
# ---------------------------------------------------------------------------------------------------------------

RAMP = np.tile(np.arange(256, dtype=np.uint8), (4, 1))  # (4, 256): 0..255 along x
RAMP16 = np.tile(np.arange(256, dtype=np.uint16) * 257, (4, 1))  # 0..65535
PALETTE = np.stack([np.arange(256), 255 - np.arange(256), np.arange(256) // 2], axis=1).astype(np.uint8)


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows) -> bytes:
    """A PNG written chunk by chunk from its filtered-free rows (no image held in memory)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(b"\0" + row) for row in rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def composite(rgb, alpha):
    """Expected pixels of ``rgb`` (H, W, 3) with ``alpha`` (H, W) in 0..255 over white."""
    a = alpha[..., None] / 255
    return a * rgb + (1 - a) * 255


def grey(values):
    return np.repeat(np.asarray(values, np.float64)[..., None], 3, axis=2)


def srgb_of_lightness(lightness):
    """sRGB levels of the neutral CIE L* (0..100) values: Y from L*, then the sRGB transfer curve."""
    y = np.where(lightness > 8, ((lightness + 16) / 116) ** 3, lightness / 903.3)
    return 255 * np.where(y > 0.0031308, 1.055 * y ** (1 / 2.4) - 0.055, 12.92 * y)


def merged(mode, channels):
    """An image of ``mode`` from (H, W, C) uint8 channels."""
    bands = [Image.fromarray(np.ascontiguousarray(channels[..., c])) for c in range(channels.shape[-1])]
    return Image.merge(mode, bands)


def palette_image(mode="P"):
    image = Image.frombytes("P", RAMP.shape[::-1], RAMP.tobytes())
    image.putpalette(PALETTE.tobytes())
    if mode == "PA":
        image = image.convert("PA")
        image.putalpha(Image.fromarray(255 - RAMP))
    return image


def mode_cases():
    """(id, file name, mode Pillow must open it as, writer(path), expected (H, W, 3) levels 0..255)."""
    ramp_rgb = np.stack([RAMP, 255 - RAMP, RAMP // 2], axis=-1)
    cmyk = np.stack([RAMP, 255 - RAMP, np.zeros_like(RAMP), np.full_like(RAMP, 64)], axis=-1)
    ycbcr = np.stack([RAMP, np.full_like(RAMP, 100), np.full_like(RAMP, 170)], axis=-1)
    lab = np.stack([RAMP, np.full_like(RAMP, 128), np.full_like(RAMP, 128)], axis=-1)
    wide = np.tile(np.linspace(-1000, 200000, 256).round().astype(np.int32), (4, 1))
    floats = np.tile(np.linspace(-0.25, 1.25, 256, dtype=np.float32), (4, 1))
    floats[0, 7] = np.nan
    rgb16 = np.stack([RAMP16, 65535 - RAMP16, RAMP16 // 3], axis=-1)

    def save(image, **kwargs):
        return lambda path: image.save(path, **kwargs)

    return [
        ("1", "x.png", "1", save(Image.fromarray(RAMP >= 128)), grey(255.0 * (RAMP >= 128))),
        ("L", "x.png", "L", save(Image.fromarray(RAMP)), grey(RAMP)),
        ("LA", "x.png", "LA", save(merged("LA", np.stack([RAMP, 255 - RAMP], -1))),
         composite(grey(RAMP), 255 - RAMP)),
        ("P", "x.png", "P", save(palette_image()), PALETTE[RAMP].astype(np.float64)),
        ("P+tRNS", "x.png", "P", save(palette_image(), transparency=10),
         np.where((RAMP == 10)[..., None], 255.0, PALETTE[RAMP])),
        ("PA", "x.tif", "PA", save(palette_image("PA")), composite(PALETTE[RAMP], 255 - RAMP)),
        ("RGB", "x.png", "RGB", save(Image.fromarray(ramp_rgb)), ramp_rgb.astype(np.float64)),
        ("RGBA", "x.webp", "RGBA", save(merged("RGBA", np.dstack([ramp_rgb, RAMP])), lossless=True),
         composite(ramp_rgb, RAMP)),
        ("CMYK", "x.tif", "CMYK", save(merged("CMYK", cmyk)),
         (255.0 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255),
        ("YCbCr", "x.tif", "YCbCr", save(merged("YCbCr", ycbcr)),
         np.stack([RAMP + 1.402 * 42, RAMP - 0.344136 * -28 - 0.714136 * 42, RAMP + 1.772 * -28], -1).clip(0, 255)),
        ("LAB", "x.tif", "LAB", save(merged("LAB", lab)), grey(srgb_of_lightness(RAMP / 255 * 100))),
        ("I;16", "x.png", "I;16", save(Image.fromarray(RAMP16)), grey(RAMP16 / 257)),
        ("I;16+tRNS", "x.png", "I;16", save(Image.fromarray(RAMP16), transparency=0),
         grey(np.where(RAMP16 == 0, 255, RAMP16 / 257))),
        ("I;16B", "x.tif", "I;16B", save(Image.frombytes("I;16B", (256, 4), RAMP16.astype(">u2").tobytes())),
         grey(RAMP16 / 257)),
        ("I", "x.tif", "I", save(Image.fromarray(RAMP16.astype(np.int32))), grey(RAMP16 / 257)),
        ("I-wide", "x.tif", "I", save(Image.fromarray(wide)), grey((wide + 1000) / 201000 * 255)),
        ("F", "x.tif", "F", save(Image.fromarray(floats)), grey(np.nan_to_num(floats).clip(0, 1) * 255)),
        ("RGB-16bit", "x.png", "RGB",
         lambda path: path.write_bytes(png_bytes(256, 4, 16, 2, [row.astype(">u2").tobytes() for row in rgb16])),
         rgb16 / 257),
    ]


@pytest.mark.parametrize("case", mode_cases(), ids=lambda case: case[0])
def test_every_image_mode_loads_right(tmp_path, case):
    """Within one 8-bit level of the expected pixels; LAB within two (Pillow's littleCMS transform is itself
    that far from the exact CIE L* -> sRGB curve in the darks)."""
    case_id, name, mode, write, expected = case
    path = tmp_path / name
    write(path)
    with Image.open(path) as image:
        assert image.mode == mode
    loaded = data.load_image(path)[0].permute(1, 2, 0).double()
    np.testing.assert_allclose((loaded.numpy() + 1) * 127.5, expected, atol=(2 if case_id == "LAB" else 1) + 1e-6,
                               rtol=0)


def test_sixteen_bit_greyscale_trains_right(tmp_path):
    """The training path (a crop of a 16-bit greyscale PNG) maps the same way as load_image."""
    Image.fromarray(np.tile(RAMP16, (16, 1))[:, :R]).save(tmp_path / "grey16.png")  # 64 x 64, 0..16191
    dataset, _ = build(tmp_path, R, train=False)
    np.testing.assert_allclose((dataset[0][0].numpy() + 1) * 127.5, np.tile(RAMP16[:, :R], (16, 1)) / 257,
                               atol=1 + 1e-6, rtol=0)


def test_reads_crop_before_converting(folder, monkeypatch):
    """One decode per read, and only the crop is converted to RGB."""
    dataset, _ = build(folder, R)
    converted, decoders = [], []
    convert, getdecoder = Image.Image.convert, Image._getdecoder
    monkeypatch.setattr(Image.Image, "convert", lambda self, *a, **k: converted.append(self.size) or
                        convert(self, *a, **k))
    monkeypatch.setattr(Image, "_getdecoder", lambda *a, **k: decoders.append(a[0]) or getdecoder(*a, **k))
    index = [path.name for path in dataset.files].index("one.png")  # 96 x 80 RGB PNG
    dataset[index]
    assert converted == [(R, R)] and len(decoders) == 1


# ---------------------------------------------------------------------------------------------------------------
# Decompression bombs
# ---------------------------------------------------------------------------------------------------------------

BOMB_SIDE = 12000


def write_bomb(path):
    """A 12000 x 12000 black 1-bit PNG: about 18 KB on disk, 144 M pixels decoded."""
    path.write_bytes(png_bytes(BOMB_SIDE, BOMB_SIDE, 1, 0, itertools.repeat(bytes(BOMB_SIDE // 8), BOMB_SIDE)))


@pytest.fixture
def no_bomb_decode(monkeypatch):
    """Fails the test if any image of the bomb's size is decoded."""
    load = ImageFile.ImageFile.load

    def guarded_load(self):
        assert self.size != (BOMB_SIDE, BOMB_SIDE), "the bomb was decoded"
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", guarded_load)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, from load_image
def test_images_over_the_pixel_limit_are_skipped_by_name(tmp_path, no_bomb_decode):
    Image.fromarray(photo(R, R)).save(tmp_path / "fine.png")
    write_bomb(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    start = time.perf_counter()
    dataset, messages = build(tmp_path, R)
    assert dataset.files == [tmp_path / "fine.png"] and dataset[0].shape == (3, R, R)
    assert messages == [f"skipped 1 of 2 images under {tmp_path}: 0 smaller than {R} px, 0 unreadable, "
                        f"1 over max_pixels={data.MAX_IMAGE_PIXELS} pixels (bomb.png)"]
    assert time.perf_counter() - start < 5
    with pytest.raises(ValueError, match=r"bomb.png.*12000x12000 is 144000000 pixels.*max_pixels"):
        data.load_image(tmp_path / "bomb.png")
    with pytest.raises(ValueError, match=r"no usable images.*2 over max_pixels=100 pixels \(bomb.png, fine.png\)"):
        data.make_dataset(str(tmp_path), R, "train", max_pixels=100)
    dataset, messages = build(tmp_path, R, max_pixels=None)  # no limit: kept (the scan reads headers only)
    assert len(dataset) == 2 and messages == []
    with pytest.raises(ValueError, match="max_pixels"):
        data.ImageFolder(tmp_path, R, max_pixels=0)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_replaced_by_a_bomb_after_the_scan_is_skipped(tmp_path, no_bomb_decode):
    for name, seed in (("a.png", 1), ("b.png", 2)):
        Image.fromarray(photo(R, R, seed)).save(tmp_path / name)
    dataset, _ = build(tmp_path, R, train=False)
    expected_next = dataset[1]
    write_bomb(tmp_path / "a.png")
    with pytest.warns(UserWarning, match="a.png, unreadable at read time: 12000x12000 .* over the limit max_pixels"):
        assert torch.equal(dataset[0], expected_next)
