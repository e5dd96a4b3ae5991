"""Images for training and evaluating the autoencoder: square crops as float tensors (3, R, R) in [-1, 1].

`make_dataset` picks the source: "builtin" (the colour photographs shipped inside scikit-image and
scikit-learn, readable offline) or a directory of png/jpg/jpeg/webp files.

Randomness: training crops and flips are drawn from torch's global RNG inside `__getitem__`. So
`torch.manual_seed(s)` reproduces them in the main process, and a `DataLoader` reproduces them in its
workers: it seeds each worker's torch RNG with a base seed drawn from torch's RNG (or from its `generator`)
plus the worker id. A `torch.Generator` held by the dataset would instead be copied unchanged into every
worker, which would then all draw the same crops.

Pixel values: every image mode Pillow opens becomes 8-bit RGB, then [-1, 1]. Transparency (alpha, or a
palette's / tRNS transparent colour) is composited onto white; greyscale is repeated on the three channels;
"1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV" convert as Pillow converts them to RGB (16-bit-per-channel RGB is
read by Pillow as 8-bit RGB). The modes that hold more than 8 bits per pixel map to [0, 1] by a fixed white point:
- "I;16", "I;16B", "I;16L", "I;16N" (16-bit greyscale): 0..65535.
- "I" (32-bit signed int, e.g. from a signed 16-bit or a 32-bit TIFF): read as 16-bit, 0..65535, when every
  value of the file lies in that range; otherwise the file's own range (min..max) is stretched to 0..1, as
  there is no standard white point for 32-bit data.
- "F" (32-bit float): 0..1; values outside are clamped, NaN reads as 0.

Decompression bombs: a file of more than ``max_pixels`` pixels (width x height, known from its header; default
MAX_IMAGE_PIXELS) is skipped by the folder scan with a warning naming it, and refused by `load_image`: a small
file can hold a huge image, which every read would decode in full. Pillow's own hard limit
(2 * ``PIL.Image.MAX_IMAGE_PIXELS``, about 179 M pixels) applies on top: larger files are unreadable.
A read decodes the file once, applies the EXIF rotation, crops, and only then converts the crop to RGB.
"""
import hashlib
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageOps
from torch.utils.data import Dataset

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
SAVE_FORMATS = {".png": dict(format="PNG"), ".jpg": dict(format="JPEG", quality=95),
                ".jpeg": dict(format="JPEG", quality=95), ".webp": dict(format="WEBP", lossless=True)}
SPLITS = ("train", "heldout")
# Fraction of a directory's images held out for evaluation when no separate validation directory is given.
HELDOUT_FRACTION = 0.05
BUILTIN_HELDOUT = ("chelsea", "flower")
BUILTIN_SAMPLES_PER_EPOCH = 1024
# The fixed (non-random) crops of each builtin photo: (top, left) as fractions of the free range (H - R, W - R).
BUILTIN_FIXED_CROPS = ((0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75))
# What PIL raises for a file that is not a readable image (UnidentifiedImageError and truncation are OSErrors).
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# Default limit on an image's width x height (64 Mi pixels, e.g. 8192 x 8192; a 12000 x 12000 PNG of 140 KB is
# over it). None disables it (Pillow's own hard limit remains).
MAX_IMAGE_PIXELS = 8192 * 8192
SIXTEEN_BIT_WHITE = 65535


def load_image(path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Image file -> (1, 3, H, W) float32 in [-1, 1] (see the module docstring for each image mode).
    ValueError naming the file when it is not a readable image or has more than ``max_pixels`` pixels."""
    path = Path(path)
    _check_max_pixels(max_pixels)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        pixels = _read_rgb(path, max_pixels)
    except UNREADABLE as err:
        raise ValueError(f"cannot read {path} as an image: {err}") from err
    return _to_unit_range(pixels)[None]


def save_image(image: torch.Tensor, path) -> None:
    """(3, H, W) or (1, 3, H, W) in [-1, 1] (clamped) -> an 8-bit RGB image file at path, in the format its suffix
    names (.png, .jpg/.jpeg at quality 95, .webp lossless); parent folders created. Another suffix: ValueError."""
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"save_image expects an image of shape (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
    pixels = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAVE_FORMATS:
        raise ValueError(f"{path}: cannot write {suffix or 'a file without a suffix'!r} images; use one of "
                         f"{', '.join(SAVE_FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).save(path, **SAVE_FORMATS[suffix])


def image_grid(rows: list[torch.Tensor], padding: int = 2) -> torch.Tensor:
    """rows: equal-shape (B, 3, H, W) tensors -> (3, R*H + (R-1)*p, B*W + (B-1)*p): row r holds rows[r] side by side,
    with white (1.0) gaps of `padding` pixels between images."""
    if not rows or any(row.dim() != 4 or row.shape != rows[0].shape for row in rows):
        raise ValueError(f"image_grid expects equal-shape (B, 3, H, W) rows, got {[tuple(row.shape) for row in rows]}")
    tiles = F.pad(torch.stack(rows), (0, padding, 0, padding), value=1.0)
    grid = rearrange(tiles, "r b c h w -> c (r h) (b w)")
    return grid[:, : grid.shape[1] - padding, : grid.shape[2] - padding]


def batches(dataset: Dataset, batch_size: int, count: int | None = None):
    """The first ``count`` items (default all) of a dataset of (3, R, R) tensors, stacked: (B, 3, R, R) each."""
    count = len(dataset) if count is None else min(count, len(dataset))
    for start in range(0, count, batch_size):
        yield torch.stack([dataset[i] for i in range(start, min(start + batch_size, count))])


def image_files(root) -> list[Path]:
    """Every file under root (nested folders included) with an image suffix, any case; sorted."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image directory {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory of images")
    return sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


class ImageFolder(Dataset):
    """Square crops of the images under a folder: item i -> (3, R, R) float32 in [-1, 1].

    split: "all" files, or the "train" / "heldout" part of them (see `_heldout_mask`).
    train: random crop + random horizontal flip (torch's global RNG), else a center crop; by default
    random unless split is "heldout".
    Files smaller than R on a side, with more than `max_pixels` pixels (None: no limit) or unreadable are
    skipped when the dataset is built, with one warning (naming the too-large ones). A file that fails to read
    later (truncated, replaced or removed after the scan) is skipped at read time: the item comes from the next
    readable file, and the path is recorded in `failed_reads`, per process (each DataLoader worker keeps its own).
    """

    def __init__(self, root, resolution: int, split: str = "all", train: bool | None = None,
                 max_pixels: int | None = MAX_IMAGE_PIXELS):
        if split not in ("all", *SPLITS):
            raise ValueError(f"split must be 'all', 'train' or 'heldout', got {split!r}")
        self.root = Path(root)
        self.resolution = _check_resolution(resolution)
        self.max_pixels = _check_max_pixels(max_pixels)
        self.train = split != "heldout" if train is None else train
        usable = _usable_files(self.root, image_files(self.root), resolution, max_pixels)
        if split != "all":
            heldout = _heldout_mask([path.relative_to(self.root).as_posix() for path in usable])
            usable = [path for path, held in zip(usable, heldout) if held == (split == "heldout")]
            if not usable:
                raise ValueError(f"{self.root} has a single usable image at resolution {resolution}: it is held out "
                                 "for evaluation, leaving none to train on; give a separate validation directory")
        self.files = usable
        self.failed_reads: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} out of range for {len(self.files)} images")
        for step in range(len(self.files)):
            path = self.files[(index + step) % len(self.files)]
            if path in self.failed_reads:
                continue
            try:
                pixels = _read_rgb(path, self.max_pixels, self._crop_box)
            except UNREADABLE as err:
                self.failed_reads.add(path)
                warnings.warn(f"skipping {path}, unreadable at read time: {err}")
                continue
            if self.train and torch.rand(()) < 0.5:
                pixels = pixels.flip(-1)
            return _to_unit_range(pixels)
        raise RuntimeError(f"none of the {len(self.files)} images under {self.root} can be read any more")

    def _crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The (left, top, right, bottom) box of this read's crop of an (height, width) image: uniform when
        training (y, then x, from torch's RNG), else the center."""
        size = self.resolution
        if min(height, width) < size:
            raise ValueError(f"now smaller than {size} px")
        if self.train:
            y, x = int(torch.randint(height - size + 1, ())), int(torch.randint(width - size + 1, ()))
        else:
            y, x = _corner((height, width), size, 0.5, 0.5)
        return x, y, x + size, y + size


def builtin_images() -> dict[str, np.ndarray]:
    """The colour photographs shipped inside scikit-image and scikit-learn: name -> (H, W, 3) uint8.

    Only files in the packages' own distributions (no downloads). Grayscale ones (camera, moon, coins, ...)
    are left out rather than converted; `cat` is left out, being the same picture as `chelsea`.
    """
    from skimage import data
    from sklearn.datasets import load_sample_images

    motorcycle_left, motorcycle_right, _ = data.stereo_motorcycle()
    sklearn_photos = load_sample_images()
    return {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "motorcycle_left": motorcycle_left,
        "motorcycle_right": motorcycle_right,
        "hubble_deep_field": data.hubble_deep_field(),
        "immunohistochemistry": data.immunohistochemistry(),
        "retina": data.retina(),
        **{Path(name).stem: photo for name, photo in zip(sklearn_photos.filenames, sklearn_photos.images)},
    }


class BuiltinImages(Dataset):
    """Crops of the builtin photographs: item i -> (3, R, R) float32 in [-1, 1].

    split "heldout" uses the photos named in BUILTIN_HELDOUT, "train" the others. Photos whose shorter side is
    below R are first resized (bicubic, aspect kept) so that it equals R.
    train (by default: split == "train"): item i is a random crop + random flip of photo i mod n_photos, drawn
    from torch's global RNG, for a virtual epoch of `samples_per_epoch` items. Otherwise the items are the
    distinct BUILTIN_FIXED_CROPS of each photo, identical across runs.
    """

    def __init__(self, resolution: int, split: str = "train", train: bool | None = None,
                 samples_per_epoch: int = BUILTIN_SAMPLES_PER_EPOCH):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.resolution = _check_resolution(resolution)
        self.train = split == "train" if train is None else train
        self.samples_per_epoch = samples_per_epoch
        photos = builtin_images()
        self.names = [name for name in photos if (name in BUILTIN_HELDOUT) == (split == "heldout")]
        self.photos = [torch.tensor(_upscale(photos[name], resolution)).permute(2, 0, 1) for name in self.names]
        self.crops = list(dict.fromkeys((index, *_corner(photo.shape[1:], resolution, top, left))
                                        for index, photo in enumerate(self.photos)
                                        for top, left in BUILTIN_FIXED_CROPS))

    def __len__(self) -> int:
        return self.samples_per_epoch if self.train else len(self.crops)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if self.train:
            return _to_unit_range(_random_crop(self.photos[index % len(self.photos)], self.resolution))
        photo, y, x = self.crops[index]
        return _to_unit_range(self.photos[photo][:, y : y + self.resolution, x : x + self.resolution])


def make_dataset(data: str, resolution: int, split: str, val_data=None,
                 samples_per_epoch: int = BUILTIN_SAMPLES_PER_EPOCH,
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> Dataset:
    """The `split` ("train": random crops, "heldout": fixed crops) of `data` ("builtin" or a directory).

    For a directory, "heldout" is `val_data` when given (then all of `data` trains), else the fixed part of
    `data` that ImageFolder holds out. `samples_per_epoch` sizes the builtin training epoch; `max_pixels`
    skips directory images larger than that (width x height; None: no limit).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "heldout" and val_data is not None:
        return ImageFolder(val_data, resolution, split="all", train=False, max_pixels=max_pixels)
    if data == "builtin":
        return BuiltinImages(resolution, split, samples_per_epoch=samples_per_epoch)
    return ImageFolder(data, resolution, split="all" if val_data is not None else split, max_pixels=max_pixels)


def _check_resolution(resolution: int) -> int:
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    return resolution


def _check_max_pixels(max_pixels: int | None) -> int | None:
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    return max_pixels


def _read_rgb(path: Path, max_pixels: int | None,
              crop: Callable[[int, int], tuple[int, int, int, int]] | None = None) -> torch.Tensor:
    """Image file -> (3, H, W) uint8 (see the module docstring): refused over ``max_pixels`` before decoding,
    decoded once, EXIF rotation applied, cropped to ``crop(H, W)`` (a (left, top, right, bottom) box) if given,
    and only then converted to RGB."""
    with Image.open(path) as image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ValueError(f"{width}x{height} is {width * height} pixels, over the limit max_pixels={max_pixels}")
        ImageOps.exif_transpose(image, in_place=True)  # decodes the file
        grey_range = _grey_range(image)  # of the whole image, so that every crop maps the same way
        if crop is not None:
            image = image.crop(crop(image.height, image.width))
        return torch.from_numpy(_rgb8(image, grey_range)).permute(2, 0, 1)


def _grey_range(image: Image.Image) -> tuple[float, float] | None:
    """(black, white) values of a high-bit-depth greyscale image (modes I;16*, I, F), None for other modes."""
    if image.mode.startswith("I;16"):
        return 0.0, SIXTEEN_BIT_WHITE
    if image.mode == "F":
        return 0.0, 1.0
    if image.mode == "I":
        low, high = image.getextrema()
        return (0.0, SIXTEEN_BIT_WHITE) if 0 <= low and high <= SIXTEEN_BIT_WHITE or low == high else (low, high)
    return None


def _rgb8(image: Image.Image, grey_range: tuple[float, float] | None) -> np.ndarray:
    """A PIL image of any mode -> (H, W, 3) uint8 RGB, transparency composited onto white; high-bit-depth
    greyscale mapped from ``grey_range`` (black, white), clamped."""
    if grey_range is not None:
        values = np.asarray(image, dtype=np.float32)
        black, white = grey_range
        unit = np.clip(np.nan_to_num((values - black) / (white - black), nan=0.0), 0.0, 1.0)
        transparent = image.info.get("transparency")
        if isinstance(transparent, int):  # a 16-bit greyscale PNG's tRNS value
            unit[values == transparent] = 1.0
        return np.repeat(np.rint(unit * 255).astype(np.uint8)[..., None], 3, axis=2)
    if image.has_transparency_data:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return np.array(image.convert("RGB"))


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, or None when PIL cannot identify it."""
    try:
        with Image.open(path) as image:
            return image.size
    except UNREADABLE:
        return None


def _usable_files(root: Path, files: list[Path], resolution: int, max_pixels: int | None) -> list[Path]:
    """The files whose header reads and gives both sides >= resolution and at most max_pixels pixels; one
    warning if any are skipped, naming those over max_pixels."""
    with warnings.catch_warnings():  # Pillow warns of large images without naming them; they are named below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=8) as pool:
            sizes = list(pool.map(_image_size, files))
    unreadable = sum(size is None for size in sizes)
    small = sum(size is not None and min(size) < resolution for size in sizes)
    large = [path for path, size in zip(files, sizes) if size is not None and min(size) >= resolution
             and max_pixels is not None and size[0] * size[1] > max_pixels]
    usable = [path for path, size in zip(files, sizes) if size is not None and min(size) >= resolution
              and (max_pixels is None or size[0] * size[1] <= max_pixels)]
    counts = f"{small} smaller than {resolution} px, {unreadable} unreadable"
    if large:
        names = ", ".join(path.relative_to(root).as_posix() for path in large[:5])
        counts += f", {len(large)} over max_pixels={max_pixels} pixels ({names}{', ...' if len(large) > 5 else ''})"
    if not usable:
        raise ValueError(f"no usable images under {root} at resolution {resolution}: "
                         f"{len(files)} image files found, {counts}")
    if len(usable) < len(files):
        warnings.warn(f"skipped {len(files) - len(usable)} of {len(files)} images under {root}: {counts}")
    return usable


def _heldout_mask(names: list[str]) -> list[bool]:
    """Which of these relative paths are held out: those whose SHA-1, read as a fraction of its range, is below
    HELDOUT_FRACTION; just the lowest one when that picks none or all (small folders). The choice is per file,
    so it does not move when other files are added or skipped, or with the resolution: an image does not
    change sides between training phases."""
    keys = [int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64 for name in names]
    held = [key < HELDOUT_FRACTION for key in keys]
    if all(held) or not any(held):
        held = [key == min(keys) for key in keys]
    return held


def _upscale(photo: np.ndarray, resolution: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the same photo with its shorter side raised to resolution (bicubic) if below it."""
    height, width = photo.shape[:2]
    if min(height, width) >= resolution:
        return photo
    scale = resolution / min(height, width)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC))


def _corner(shape: tuple[int, int], size: int, top: float, left: float) -> tuple[int, int]:
    """(y, x) of the top-left pixel of a size x size crop of an (H, W) image, at fractions (top, left) of the
    free range (H - size, W - size)."""
    return round(top * (shape[0] - size)), round(left * (shape[1] - size))


def _random_crop(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) -> (C, size, size) at a uniform position, mirrored left-right with probability 1/2."""
    y = int(torch.randint(pixels.shape[1] - size + 1, ()))
    x = int(torch.randint(pixels.shape[2] - size + 1, ()))
    crop = pixels[:, y : y + size, x : x + size]
    return crop.flip(-1) if torch.rand(()) < 0.5 else crop


def _to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1]."""
    return pixels.float() / 127.5 - 1
