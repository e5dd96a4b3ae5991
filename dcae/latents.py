"""Latents of a class-labelled image folder for latent diffusion: encoded once, stored in shards, read back
memory-mapped (`LatentDataset`).

Classes: every immediate sub-folder of the data folder (hidden ones aside) is a class, ids 0..K-1 in sorted
name order, its images found recursively (ImageNet's layout); a folder holding its images directly, with no
class sub-folders, is one class named after it. Items: the readable image files ordered by (class, path), each
once, or twice in a row with ``flip`` (as read, then mirrored left-right). Each image is `dcae.data.load_image`'s
8-bit RGB reading, centre-cropped as ADM does (`adm_center_crop`).

A latent folder (LATDIR):
- ``shard-00000.safetensors``, ...: ``latents`` (n, C, h, w) float32, the autoencoder's latents multiplied by its
  scaling factor, and ``labels`` (n,) int64. Shard k holds the planned items [k S, (k + 1) S) (S: the shard size)
  less any file that failed to decode; its metadata (str -> str) holds the run's fingerprint, the shard
  index, the planned item count and those files (a JSON list of paths relative to the data folder).
- ``meta.json``: the run's identity (format version, autoencoder config and weight hash, scaling factor, latent
  shape, resolution, flip, encode dtype, shard size, class names, file count and list hash), its fingerprint
  (sha256 of the identity), the shard and item counts; once every shard is written, ``complete`` with the
  stored ``count``, ``shard_counts`` and the ``skipped`` files.

Runs: rank r of a world of size W encodes the shards k with k % W == r; each shard is written atomically
(temporary file + rename), so a crash leaves whole shards only, and a re-run with the same arguments keeps the
verified shards and encodes the others. A folder written with another identity is refused. Rank 0 writes
meta.json at the start and completes it (`finish_latents`) once every shard is there.
"""
import bisect
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from .data import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, UNREADABLE, image_files, load_image
from .files import atomic_write, atomic_write_json
from .metrics import to_uint8

FORMAT = "dcae-latents"
VERSION = 1
META = "meta.json"
LOAD_WORKERS = min(8, os.cpu_count() or 1)
# The fields of meta.json that must agree for a re-run to add to an existing folder.
IDENTITY = ("format", "version", "autoencoder", "scaling_factor", "latent_shape", "resolution", "flip", "dtype",
            "shard_size", "class_names", "files", "files_sha256")


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop (guided-diffusion ``center_crop_arr``): halve with a BOX filter while the short side is
    at least 2 * size, resize with BICUBIC so that the short side is size (the long side rounded), then cut the
    central size x size square (offsets rounded down)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_center_crop(path, resolution: int) -> torch.Tensor:
    """Image file -> (3, R, R) uint8: `adm_center_crop` of the file's 8-bit RGB pixels as `load_image` reads
    them (EXIF rotation applied, transparency on white). ValueError naming an unreadable file."""
    pixels = to_uint8(load_image(path))[0]  # load_image's p / 127.5 - 1 back to p, exactly
    crop = adm_center_crop(Image.fromarray(pixels.permute(1, 2, 0).numpy()), resolution)
    return torch.from_numpy(np.array(crop)).permute(2, 0, 1)


def prefetched(items: Sequence, load: Callable, batch_size: int) -> Iterator[tuple[Sequence, list]]:
    """(batch of items, [load(item) for item in it]) for consecutive batches; the next batch loads in a thread
    pool while the caller works on the current one. An error of ``load`` is raised when its batch is reached."""
    with ThreadPoolExecutor(LOAD_WORKERS) as pool:
        pending = None
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            submitted = batch, [pool.submit(load, item) for item in batch]
            if pending is not None:
                yield pending[0], [future.result() for future in pending[1]]
            pending = submitted
        if pending is not None:
            yield pending[0], [future.result() for future in pending[1]]


def find_classes(root) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image file, class id)] ordered by class then path) of an ImageNet-layout or flat folder
    (see the module docstring). FileNotFoundError / NotADirectoryError for a missing folder, ValueError when it
    holds no image files or mixes loose images with class sub-folders."""
    root = Path(root)
    files = image_files(root)
    loose = [path for path in files if path.parent == root]
    classes = sorted(path.name for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    nested = [path for path in files if path.parent != root and path.relative_to(root).parts[0] in classes]
    if not loose and not nested:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    if loose and nested:
        raise ValueError(f"{root} holds {len(loose)} images directly and {len(nested)} in class sub-folders: put "
                         "every image in a class sub-folder (ImageNet layout), or use a folder without sub-folders")
    if loose:
        return [root.resolve().name], [(path, 0) for path in loose]
    ids = {name: i for i, name in enumerate(classes)}
    labelled = sorted(((path, ids[path.relative_to(root).parts[0]]) for path in nested), key=lambda f: (f[1], f[0]))
    empty = sorted(set(classes) - {classes[label] for _, label in labelled})
    if empty:
        warnings.warn(f"{len(empty)} class folders under {root} hold no images (they keep their ids): "
                      f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}")
    return classes, labelled


def readable_files(root, files: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
    """The files whose header Pillow reads, with at most MAX_IMAGE_PIXELS pixels; one warning naming the others;
    ValueError when none is left."""
    with warnings.catch_warnings(), ThreadPoolExecutor(LOAD_WORKERS) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        ok = list(pool.map(_header_ok, [path for path, _ in files]))
    kept = [file for file, good in zip(files, ok) if good]
    if not kept:
        raise ValueError(f"none of the {len(files)} image files under {root} is a readable image")
    if len(kept) < len(files):
        bad = [path.relative_to(root).as_posix() for (path, _), good in zip(files, ok) if not good]
        warnings.warn(f"skipping {len(bad)} unreadable or too large (over {MAX_IMAGE_PIXELS} pixels) images under "
                      f"{root}: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}")
    return kept


def _header_ok(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            return image.width * image.height <= MAX_IMAGE_PIXELS
    except UNREADABLE:
        return False


def weights_sha256(model: nn.Module) -> str:
    """sha256 of a model's state dict: for each key in sorted order, the key, dtype and shape, then the bytes."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{key} {value.dtype} {tuple(value.shape)}\n".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def encode_latents(model, data, out, resolution: int, *, flip: bool = False, batch_size: int = 32,
                   tile_size: int | None = None, dtype: torch.dtype = torch.float32, device=None,
                   shard_size: int = 1024, rank: int | None = None, world_size: int | None = None,
                   progress: bool = True) -> dict:
    """Encode the images of the folder ``data`` into the latent folder ``out`` (see the module docstring).

    model: a DC-AE (`dcae.models.DCAE`); its weights are hashed as given, then it is moved to ``device``
    (default: cuda when available) and cast to ``dtype`` in place for the encode (``tile_size``: tiled, in
    pixels). rank / world_size: this process's share (default: the RANK / WORLD_SIZE environment variables).
    With one process the folder is completed here; with several, once every rank has returned, rank 0 calls
    `finish_latents`. Returns {"shards", "encoded", "kept"} (shard counts: in all, encoded now by this rank,
    found complete) and "complete" (whether meta.json is complete).
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    _check_run(model, resolution, batch_size, shard_size, rank, world_size)
    data, out = Path(data), Path(out)
    classes, files = find_classes(data)
    files = readable_files(data, files)
    meta = _identity(model, data, classes, files, resolution, flip, dtype, shard_size)
    _prepare(out, meta, write=rank == 0)
    copies = 2 if flip else 1
    mine = range(rank, meta["num_shards"], world_size)
    todo = [shard for shard in mine if _complete_shard(out, meta, shard) is None]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device=device, dtype=dtype).eval()
    bar = tqdm(total=sum(len(_planned(meta, shard)) for shard in todo), desc=f"encode-latents (rank {rank})",
               unit="img", disable=not progress)

    def load(index: int) -> torch.Tensor | None:
        path = files[index][0]
        try:
            return load_center_crop(path, resolution)
        except (ValueError, OSError) as err:
            warnings.warn(f"skipping {path}, unreadable now: {err}")
            return None

    for shard in todo:
        planned = _planned(meta, shard)
        latents, labels, skipped = [], [], []
        # each file is read once for its copies in this shard (a shard may start or end between two copies)
        shard_files = range(planned.start // copies, (planned.stop - 1) // copies + 1)
        for indices, crops in prefetched(shard_files, load, max(1, batch_size // copies)):
            batch, skipped_before = [], len(skipped)
            for index, crop in zip(indices, crops):
                for copy in (c for c in range(copies) if index * copies + c in planned):
                    if crop is None:
                        skipped.append(files[index][0].relative_to(data).as_posix())
                    else:
                        batch.append((crop.flip(-1) if copy else crop, files[index][1]))
            if batch:
                x = torch.stack([crop for crop, _ in batch]).to(device).float() / 127.5 - 1
                with torch.inference_mode():
                    z = model.encode(x.to(dtype), tile_size=tile_size)
                latents.append(z.float().cpu() * meta["scaling_factor"])
                labels += [label for _, label in batch]
            bar.update(len(batch) + len(skipped) - skipped_before)
        _write_shard(out, meta, shard, latents, labels, skipped)
    bar.close()
    complete = world_size == 1
    if complete:
        finish_latents(out)
    return {"shards": meta["num_shards"], "encoded": len(todo), "kept": len(mine) - len(todo), "complete": complete}


def finish_latents(out) -> dict:
    """Check that every shard of the latent folder ``out`` is there and complete meta.json with the counts
    (rank 0, after every rank's `encode_latents`). Returns the completed meta. ValueError naming missing shards."""
    out = Path(out)
    meta = read_meta(out)
    shards = [_complete_shard(out, meta, shard) for shard in range(meta["num_shards"])]
    missing = [shard_name(shard) for shard, skipped in enumerate(shards) if skipped is None]
    if missing:
        raise ValueError(f"{out} lacks {len(missing)} of {meta['num_shards']} shards ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}): run the encode again, with every rank")
    counts = [len(_planned(meta, shard)) - len(skipped) for shard, skipped in enumerate(shards)]
    skipped = list(dict.fromkeys(path for paths in shards for path in paths))  # a file once, not per copy
    if sum(counts) == 0:
        raise ValueError(f"none of the {meta['files']} images could be decoded ({out})")
    meta |= {"complete": True, "count": sum(counts), "shard_counts": counts, "skipped": skipped}
    atomic_write_json(out / META, meta)
    return meta


def read_meta(out) -> dict:
    """meta.json of a latent folder; ValueError when it is absent, unreadable, or of another format version."""
    path = Path(out) / META
    if not path.is_file():
        raise ValueError(f"{out} is not a latent folder: it has no {META}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} version {VERSION} description")
    return meta


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


class LatentDataset(Dataset):
    """A complete latent folder: item i -> (latent (C, h, w) float32, already multiplied by the scaling
    factor; class id int). Shards are memory-mapped (safetensors ``safe_open``), each opened on first use in
    each process (DataLoader workers open their own)."""

    def __init__(self, root):
        self.root = Path(root)
        self.meta = read_meta(self.root)
        if not self.meta.get("complete"):
            raise ValueError(f"{self.root} is not complete: run the encode again with the same arguments")
        self._ends = np.cumsum(self.meta["shard_counts"]).tolist()
        self._shards: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.meta["count"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latents")
        shard = bisect.bisect_right(self._ends, index)
        offset = index - (self._ends[shard - 1] if shard else 0)
        _, latents, labels = self._open(shard)
        return latents[offset], int(labels[offset])

    def _open(self, shard: int) -> tuple:
        """(the open file, its latents as a lazy slice, its labels)"""
        if shard not in self._shards:
            handle = safe_open(self.root / shard_name(shard), framework="pt")
            self._shards[shard] = handle, handle.get_slice("latents"), handle.get_tensor("labels")
        return self._shards[shard]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": {}}  # open handles stay in their process

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["latent_shape"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]

    @property
    def scaling_factor(self) -> float:
        return self.meta["scaling_factor"]


def _check_run(model, resolution, batch_size, shard_size, rank, world_size) -> None:
    for name, value in (("resolution", resolution), ("batch_size", batch_size), ("shard_size", shard_size),
                        ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if resolution % model.spatial_compression_ratio:
        raise ValueError(f"resolution {resolution} is not a multiple of the compression ratio "
                         f"{model.spatial_compression_ratio}")


def _identity(model, data: Path, classes, files, resolution, flip, dtype, shard_size) -> dict:
    """meta.json's fields before the encode: the identity, its fingerprint, the planned counts."""
    listing = "".join(f"{label}\t{path.relative_to(data).as_posix()}\n" for path, label in files)
    r = model.spatial_compression_ratio
    identity = json.loads(json.dumps({
        "format": FORMAT, "version": VERSION,
        "autoencoder": {"config": model.config.to_dict(), "weights_sha256": weights_sha256(model)},
        "scaling_factor": model.scaling_factor,
        "latent_shape": [model.config.latent_channels, resolution // r, resolution // r],
        "resolution": resolution, "flip": flip, "dtype": str(dtype).removeprefix("torch."),
        "shard_size": shard_size, "class_names": classes, "files": len(files),
        "files_sha256": hashlib.sha256(listing.encode()).hexdigest()}))
    items = len(files) * (2 if flip else 1)
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return identity | {"fingerprint": fingerprint, "items": items, "num_shards": -(-items // shard_size),
                       "complete": False}


def _prepare(out: Path, meta: dict, write: bool) -> None:
    """Refuse an ``out`` that is a file, holds other files, or holds latents of another identity; create it, and
    write the starting meta.json when ``write``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a latent folder")
    if (out / META).exists():
        theirs = read_meta(out)
        differences = [_difference(key, meta[key], theirs.get(key)) for key in IDENTITY if meta[key] != theirs.get(key)]
        if differences:
            raise ValueError(f"{out} holds latents of another setup: {'; '.join(differences)}. Use another output "
                             "folder, or delete this one")
    elif out.is_dir():
        foreign = [p.name for p in out.iterdir() if not (p.name.startswith(("shard-", ".")) or p.name == META)]
        if foreign:
            raise ValueError(f"{out} is not empty and not a latent folder (it holds {', '.join(sorted(foreign)[:3])})")
    out.mkdir(parents=True, exist_ok=True)
    if write:
        atomic_write_json(out / META, meta)


def _difference(key: str, ours, theirs) -> str:
    if key == "autoencoder" and isinstance(theirs, dict):
        parts = [part for part in ("config", "weights_sha256") if ours[part] != theirs.get(part)]
        return f"another autoencoder ({' and '.join(part.split('_')[0] for part in parts)} differ)"
    if key == "class_names" and isinstance(theirs, list):
        return f"other classes ({len(theirs)} there, {len(ours)} here)"
    return f"{key} {_short(theirs)} there, {_short(ours)} here"


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _planned(meta: dict, shard: int) -> range:
    size = meta["shard_size"]
    return range(shard * size, min((shard + 1) * size, meta["items"]))


def _complete_shard(out: Path, meta: dict, shard: int) -> list[str] | None:
    """The files skipped in shard ``shard`` when it is complete and of this run; None when it is absent,
    unreadable or inconsistent (to be encoded); ValueError for a shard of another run."""
    path = out / shard_name(shard)
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        skipped = json.loads(metadata.get("skipped", "[]"))
    except (SafetensorError, OSError, ValueError) as err:
        warnings.warn(f"{path} is unreadable, it will be encoded again: {err}")
        return None
    if metadata.get("fingerprint") != meta["fingerprint"]:
        raise ValueError(f"{path} was written by another encode run than {out / META} describes: use another "
                         "output folder, or delete this one")
    count = len(_planned(meta, shard)) - len(skipped)
    if metadata.get("shard") != str(shard) or shapes != {"latents": (count, *meta["latent_shape"]),
                                                         "labels": (count,)}:
        warnings.warn(f"{path} does not hold what its metadata says, it will be encoded again")
        return None
    return skipped


def _write_shard(out: Path, meta: dict, shard: int, latents: list, labels: list, skipped: list[str]) -> None:
    path = out / shard_name(shard)
    for stale in out.glob(f".{path.name}.*.tmp"):  # left by a crash of this shard's writer
        stale.unlink(missing_ok=True)
    tensors = {"latents": torch.cat(latents) if latents else torch.zeros(0, *meta["latent_shape"]),
               "labels": torch.tensor(labels, dtype=torch.int64)}
    metadata = {"format": FORMAT, "fingerprint": meta["fingerprint"], "shard": str(shard),
                "planned": str(len(_planned(meta, shard))), "skipped": json.dumps(skipped)}
    content = save(tensors, metadata=metadata)  # bytes: a file written by Python gets the umask's permissions
    atomic_write(path, lambda tmp: tmp.write_bytes(content))
