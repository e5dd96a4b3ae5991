"""The ``dcae`` command line. The autoencoder: ``reconstruct`` one image, ``evaluate`` a model on a dataset,
``train-ae``. Latent diffusion: ``encode-latents``, ``train-diffusion``, ``sample``, ``fid-ref``, ``evaluate-gen``.

Every user error (an argument, a file, a folder, a config value) is one line on stderr and exit code 2.
"""
import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import (IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, BuiltinImages, ImageFolder, batches, image_grid, load_image,
                   save_image)
from .diffusion import SAMPLERS, check_sample_args
from .fid import FIDInception, load_inception
from .figures import labelled_grid
from .generation_metrics import (IS_SPLITS, evaluate_samples, folder_images, load_reference, reference_statistics,
                                 save_reference)
from .latents import encode_latents, finish_latents, read_meta
from .lpips import load_lpips
from .metrics import ReconstructionMetrics, evaluate_reconstructions
from .models import DCAE, PRESETS
from .pipeline import generate, load_autoencoder, load_diffusion_model
from .train import distributed
from .train.autoencoder import AutoencoderOptions, AutoencoderTask
from .train.diffusion import DiffusionOptions, DiffusionTask
from .train.options import add_arguments, check_device, from_args
from .train.trainer import Trainer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RECONSTRUCT_DIR = Path("out") / "reconstruct"


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``prog: error: ...``) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def device_name(text: str) -> str:
    """cpu, cuda or cuda:N, refused when this machine has no such device."""
    try:
        check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def output_path(path: Path, suffixes) -> Path:
    """``path`` as an output file: its suffix among ``suffixes``, not a folder, not under a file; missing parent
    folders are created when it is written."""
    if path.is_dir():
        raise CLIError(f"{path} is a folder: give a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"{path}: {parent} is a file, not a folder")
            break
    if path.suffix.lower() not in suffixes:
        raise CLIError(f"{path}: unsupported output type {path.suffix or '(none)'!r}; use one of "
                       f"{', '.join(sorted(suffixes))}")
    return path


def load_model(name_or_path: str, device: str, dtype: torch.dtype) -> DCAE:
    if Path(name_or_path).exists():
        try:
            model = DCAE.from_pretrained(name_or_path)
        except (ValueError, OSError) as e:
            raise CLIError(f"cannot load {name_or_path}: {_one_line(e)}") from e
    elif name_or_path in PRESETS:
        print(f"warning: {name_or_path} is a preset name, not a checkpoint: its weights are random and the "
              "reconstruction is meaningless (pass a local checkpoint folder or file)", file=sys.stderr)
        model = DCAE.from_config(name_or_path)
    else:
        raise CLIError(f"--model {name_or_path!r} is neither a local checkpoint path nor a preset "
                       f"({', '.join(sorted(PRESETS))})")
    return model.to(device=device, dtype=dtype).eval()


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _weights(loader, path):
    """(network or None, status line) from dcae.lpips.load_lpips / dcae.fid.load_inception; bad files -> CLIError."""
    try:
        return loader(path)
    except (ValueError, OSError) as e:
        raise CLIError(_one_line(e)) from e


def _device(args) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _check_tile(tile: int | None, model: DCAE) -> None:
    ratio = model.spatial_compression_ratio
    if tile is not None and tile % ratio:
        raise CLIError(f"--tile {tile} is not a multiple of the compression ratio {ratio}")


def reconstruct(args) -> None:
    path = Path(args.input)
    if not path.is_file():
        raise CLIError(f"input image not found: {path}")
    output = output_path(Path(args.output) if args.output else RECONSTRUCT_DIR / f"{path.stem}.png", IMAGE_SUFFIXES)
    try:
        image = load_image(path, args.max_pixels or None)
    except ValueError as e:
        raise CLIError(str(e)) from e
    device = _device(args)
    lpips, _ = _weights(load_lpips, args.lpips_weights)
    model = load_model(args.model, device, DTYPES[args.dtype])
    _check_tile(args.tile, model)
    r = model.spatial_compression_ratio
    h, w = image.shape[-2:]
    if h < r or w < r:
        raise CLIError(f"the image is {w}x{h} px, smaller than the model's compression ratio {r}")
    padded = F.pad(image, (0, -w % r, 0, -h % r), mode="replicate")
    with torch.inference_mode():
        x = padded.to(device=device, dtype=DTYPES[args.dtype])
        z = model.encode(x, tile_size=args.tile)
        y = model.decode(z, tile_size=args.tile)
    recon = y.float().cpu().clamp(-1, 1)[..., :h, :w]
    output.parent.mkdir(parents=True, exist_ok=True)
    save_image(recon, output)
    side = output.with_name(f"{output.stem}_side_by_side.png")
    save_image(image_grid([torch.cat([image, recon])]), side)
    print(f"latent: {tuple(z.shape)} ({z.dtype}), {r}x compression, image {w}x{h}")
    metrics = ReconstructionMetrics(lpips)
    metrics.update(image, recon)
    print("  ".join(f"{name.upper()} {value:.4f}" for name, value in metrics.compute().items()))
    print(f"wrote {output} and {side}")


def evaluate(args) -> None:
    """PSNR / SSIM (and LPIPS, rFID given local weights) of a model's reconstructions over a dataset."""
    output = output_path(Path(args.output), {".json"}) if args.output else None
    device = _device(args)
    lpips, lpips_status = _weights(load_lpips, args.lpips_weights)
    inception, fid_status = _weights(load_inception, args.fid_weights)
    try:
        images = (BuiltinImages(args.resolution, "heldout") if args.data == "builtin"
                  else ImageFolder(args.data, args.resolution, train=False, max_pixels=args.max_pixels or None))
    except (ValueError, OSError) as e:
        raise CLIError(_one_line(e)) from e
    model = load_model(args.model, device, DTYPES[args.dtype])
    _check_tile(args.tile, model)
    if args.resolution % model.spatial_compression_ratio:
        raise CLIError(f"--resolution {args.resolution} is not a multiple of the compression ratio "
                       f"{model.spatial_compression_ratio}")
    metrics = ReconstructionMetrics(None if lpips is None else lpips.to(device),
                                    None if inception is None else inception.to(device))
    count = len(images) if args.limit is None else min(args.limit, len(images))
    values, _ = evaluate_reconstructions(
        model, batches(images, args.batch_size, count), metrics, dtype=DTYPES[args.dtype], tile_size=args.tile,
        progress=dict(desc="evaluate", unit="batch", total=-(-count // args.batch_size)))
    result = {"model": args.model, "data": args.data, "resolution": args.resolution, "images": count, **values,
              "lpips_status": lpips_status, "rfid_status": fid_status}
    print(f"{count} images at {args.resolution} px: " + "  ".join(
        f"{k.upper()} {result[k]:.4f}" for k in ("psnr", "ssim", "lpips", "rfid") if k in result))
    print(lpips_status, fid_status, sep="\n")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=1))


def _train(task_class, options_class, args) -> int:
    """Build the task's trainer (a user error there is one line) and run it."""
    try:
        trainer = Trainer(task_class(from_args(options_class, args)))
    except (ValueError, OSError) as e:
        raise CLIError(_one_line(e)) from e
    try:
        return trainer.run()
    finally:
        distributed.shutdown(trainer.world)


def train_ae(args) -> int:
    return _train(AutoencoderTask, AutoencoderOptions, args)


def train_diffusion(args) -> int:
    return _train(DiffusionTask, DiffusionOptions, args)


def sample_command(args) -> None:
    """Class-conditional samples of a trained diffusion model, decoded by its DC-AE: PNGs and one grid PNG."""
    device = _device(args)
    folder = Path(args.run) / "model" if args.run else Path(args.model)
    try:
        pipe = load_diffusion_model(folder, device)
        sampler = args.sampler or pipe.sampling["sampler"]
        steps = args.steps if args.steps is not None else None if args.sampler else pipe.sampling["steps"]
        cfg = pipe.sampling["cfg"] if args.cfg is None else args.cfg
        sampling = dict(sampler=sampler, steps=check_sample_args(pipe.objective, sampler, steps, cfg), cfg=cfg)
        autoencoder = load_autoencoder(args.ae, pipe.latents, device)
    except (ValueError, OSError) as e:
        raise CLIError(_one_line(e)) from e
    classes = _sample_classes(args, len(pipe.class_names))
    dtype = DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    autocast = torch.autocast("cuda", dtype=dtype) if device.startswith("cuda") and dtype != torch.float32 else None
    images = generate(pipe.model, autoencoder, pipe.objective, classes, sampling["sampler"], sampling["steps"],
                      sampling["cfg"], args.seed, autocast=autocast, batch_size=args.batch_size, progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, c) in enumerate(zip(images, classes.tolist())):
        save_image(image, out / f"{i:06d}-class{c}.png")
    rows = [images[classes == c] for c in classes.unique().tolist()]
    width = max(len(r) for r in rows)
    rows = [torch.cat([r, torch.ones(width - len(r), *r.shape[1:])]) for r in rows]
    labels = [f"class {pipe.class_names[c]}" for c in classes.unique().tolist()]
    save_image(labelled_grid(rows, labels, f"{sampling['sampler']}, {sampling['steps']} steps, guidance "
                                           f"{sampling['cfg']}, seed {args.seed}"), out / "grid.png")
    print(f"wrote {len(images)} samples and grid.png to {out} ({sampling['sampler']}, {sampling['steps']} steps, "
          f"guidance {sampling['cfg']})")


def _sample_classes(args, num_classes: int) -> torch.Tensor:
    """The class of each sample: --classes (each --n times), or --n samples of classes drawn from --seed, or one
    per class."""
    if args.classes:
        bad = [c for c in args.classes if not 0 <= c < num_classes]
        if bad:
            raise CLIError(f"--classes {bad}: the model has classes 0..{num_classes - 1}")
        return torch.tensor(args.classes).repeat_interleave(args.n or 1)
    if args.n:
        return torch.randint(num_classes, (args.n,), generator=torch.Generator().manual_seed(args.seed))
    return torch.arange(num_classes)


def encode_latents_command(args) -> None:
    """Latents (x the scaling factor) of a class-folder dataset's centre crops, sharded; torchrun splits the shards."""
    world, device = distributed.init(args.device)
    try:
        model = load_model(args.model, "cpu", torch.float32)  # hashed as stored; encode_latents casts and moves it
        _check_tile(args.tile, model)
        if args.resolution % model.spatial_compression_ratio:
            raise CLIError(f"--resolution {args.resolution} is not a multiple of the compression ratio "
                           f"{model.spatial_compression_ratio}")
        dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
        try:
            result = encode_latents(model, args.data, args.out, args.resolution, flip=args.flip,
                                    batch_size=args.batch_size, tile_size=args.tile, dtype=dtype, device=device,
                                    shard_size=args.shard_size, rank=world.rank, world_size=world.size,
                                    progress=world.main)
            distributed.barrier(world)
            meta = (finish_latents(args.out) if world.distributed else read_meta(args.out)) if world.main else None
        except (ValueError, OSError) as e:
            raise CLIError(_one_line(e)) from e
    finally:
        distributed.shutdown(world)
    if meta is not None:
        print(f"{meta['count']} latents {tuple(meta['latent_shape'])} of {len(meta['class_names'])} classes in "
              f"{args.out}: {meta['num_shards']} shards, {result['encoded']} encoded now"
              f"{' by rank 0' if world.distributed else ''}, "
              f"{result['kept']} kept from before")
        if meta["skipped"]:
            print(f"{len(meta['skipped'])} images failed to decode and were skipped (listed in meta.json)")


def fid_ref(args) -> None:
    """FID reference statistics (pool3 mean and covariance) of a folder's ADM centre crops."""
    out = output_path(Path(args.out), {".npz"})
    try:
        paths = folder_images(args.data)
    except (ValueError, OSError) as e:
        raise CLIError(_one_line(e)) from e
    inception = _weights(FIDInception.from_file, args.fid_weights).to(_device(args))
    try:
        stats = reference_statistics(inception, paths, args.resolution, args.batch_size)
    except (ValueError, OSError) as e:
        raise CLIError(_one_line(e)) from e
    out.parent.mkdir(parents=True, exist_ok=True)
    save_reference(out, stats)
    print(f"reference statistics of {stats['count']} images at {args.resolution} px written to {out}")


def evaluate_gen(args) -> None:
    """FID against reference statistics and Inception Score of a folder of generated samples."""
    output = output_path(Path(args.output), {".json"}) if args.output else None
    try:
        paths, reference = folder_images(args.samples), load_reference(args.ref)
    except (ValueError, OSError) as e:
        raise CLIError(_one_line(e)) from e
    inception = _weights(partial(FIDInception.from_file, classifier=True), args.fid_weights).to(_device(args))
    try:
        values = evaluate_samples(inception, paths, reference, args.batch_size, args.splits)
    except (ValueError, OSError) as e:
        raise CLIError(_one_line(e)) from e
    result = {"samples": args.samples, "ref": args.ref, **values, "is_splits": args.splits}
    print(f"{values['count']} samples: FID {values['fid']:.4f}  IS {values['inception_score']:.4f} "
          f"(std {values['inception_score_std']:.4f} over {args.splits} splits)")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=1))


def _shared_options(dtype: str | None = "fp32") -> dict[str, argparse.ArgumentParser]:
    """Option groups several subcommands take, declared once. ``dtype``: --dtype's default (None: bf16 on CUDA,
    fp32 on CPU)."""
    model = Parser(add_help=False)
    model.add_argument("--model", required=True, help="preset name or local checkpoint (folder, file or run folder)")
    model.add_argument("--tile", type=positive_int, help="tile size in pixels for tiled encode/decode (a multiple "
                                                         "of the compression ratio)")
    model.add_argument("--dtype", choices=sorted(DTYPES), default=dtype,
                       help=f"(default: {dtype or 'bf16 on CUDA, fp32 on CPU'})")
    device = Parser(add_help=False)
    device.add_argument("--device", type=device_name, help="cuda, cuda:N or cpu (default: cuda when available)")
    lpips = Parser(add_help=False)
    lpips.add_argument("--lpips-weights", help="local LPIPS file (python -m dcae.lpips convert): also report LPIPS")
    inception = Parser(add_help=False)
    inception.add_argument("--fid-weights", required=True, help="local pytorch-fid Inception file "
                                                                "(pt_inception-2015-12-05-6726825d.pth)")
    images = Parser(add_help=False)
    images.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help=f"refuse images with more pixels (width x height) than this; 0: no limit "
                             f"(default: {MAX_IMAGE_PIXELS})")
    return {"model": model, "device": device, "lpips": lpips, "images": images, "inception": inception}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dcae", description="DC-AE on Triton kernels")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    shared = _shared_options()
    rec = sub.add_parser("reconstruct", help="encode and decode an image; print PSNR/SSIM",
                         parents=[shared["model"], shared["device"], shared["lpips"], shared["images"]])
    rec.add_argument("--input", required=True, help="image file (png/jpg/webp)")
    rec.add_argument("--output", help=f"reconstruction image, .png/.jpg/.webp (default: "
                                      f"{RECONSTRUCT_DIR}/<input name>.png)")
    rec.set_defaults(func=reconstruct)
    ev = sub.add_parser("evaluate", help="PSNR/SSIM (+ LPIPS, rFID with local weights) over a dataset",
                        parents=[shared["model"], shared["device"], shared["lpips"], shared["images"]])
    ev.add_argument("--data", required=True, help="image folder (center crops), or 'builtin' (its held-out crops)")
    ev.add_argument("--resolution", type=positive_int, default=256,
                    help="crop size, a multiple of the compression ratio (default: 256)")
    ev.add_argument("--batch-size", type=positive_int, default=8, help="(default: 8)")
    ev.add_argument("--limit", type=positive_int, help="evaluate the first N images only")
    ev.add_argument("--fid-weights", help="local pytorch-fid Inception file (pt_inception-2015-12-05-6726825d.pth)")
    ev.add_argument("--output", help="also write the results to this json file")
    ev.set_defaults(func=evaluate)
    train = sub.add_parser("train-ae", help="train a DC-AE: phase 1, 2 or 3 (torchrun: python -m dcae train-ae)")
    add_arguments(train, AutoencoderOptions)
    train.set_defaults(func=train_ae)
    lat = sub.add_parser("encode-latents", help="latents of a class-folder dataset for diffusion, sharded "
                                                "(torchrun: python -m dcae encode-latents)",
                         parents=[_shared_options(dtype=None)["model"], shared["device"]])
    lat.add_argument("--data", required=True, help="image folder: class sub-folders (ImageNet layout) or one flat "
                                                   "class")
    lat.add_argument("--resolution", type=positive_int, required=True,
                     help="ADM centre-crop size, a multiple of the compression ratio")
    lat.add_argument("--out", required=True, help="latent folder (shards + meta.json); a re-run resumes it")
    lat.add_argument("--flip", action="store_true", help="also store each image mirrored left-right")
    lat.add_argument("--batch-size", type=positive_int, default=32, help="(default: 32)")
    lat.add_argument("--shard-size", type=positive_int, default=1024, help="latents per shard (default: 1024)")
    lat.set_defaults(func=encode_latents_command)
    ref = sub.add_parser("fid-ref", help="FID reference statistics (npz: mu, sigma) of an image folder",
                         parents=[shared["device"], shared["inception"]])
    ref.add_argument("--data", required=True, help="image folder (all images under it)")
    ref.add_argument("--resolution", type=positive_int, required=True, help="ADM centre-crop size")
    ref.add_argument("--out", required=True, help="statistics file, .npz")
    ref.add_argument("--batch-size", type=positive_int, default=50, help="(default: 50)")
    ref.set_defaults(func=fid_ref)
    gen = sub.add_parser("evaluate-gen", help="FID and Inception Score of generated samples (the Inception file "
                                              "with its classifier)", parents=[shared["device"], shared["inception"]])
    gen.add_argument("--samples", required=True, help="folder of sample images (png/jpg/webp, searched recursively)")
    gen.add_argument("--ref", required=True, help="reference statistics npz with mu, sigma (fid-ref's, or ADM's)")
    gen.add_argument("--batch-size", type=positive_int, default=50, help="(default: 50)")
    gen.add_argument("--splits", type=positive_int, default=IS_SPLITS,
                     help=f"Inception Score splits (default: {IS_SPLITS})")
    gen.add_argument("--output", help="also write the results to this json file")
    gen.set_defaults(func=evaluate_gen)
    diff = sub.add_parser("train-diffusion", help="train a class-conditional DiT / U-ViT on a latent folder "
                                                  "(torchrun: python -m dcae train-diffusion)")
    add_arguments(diff, DiffusionOptions)
    diff.set_defaults(func=train_diffusion)
    smp = sub.add_parser("sample", help="class-conditional samples of a trained diffusion model, decoded to PNGs",
                         parents=[shared["device"]])
    where = smp.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="a train-diffusion run folder (its model/)")
    where.add_argument("--model", help="a trained diffusion model folder (save_pretrained + diffusion.json)")
    smp.add_argument("--ae", required=True, help="the DC-AE that encoded the model's latents (folder or file)")
    smp.add_argument("--out", required=True, help="folder for the PNGs and grid.png")
    smp.add_argument("--classes", type=int, nargs="+", help="class ids to sample (each --n times)")
    smp.add_argument("--n", type=positive_int, help="samples per listed class, or (without --classes) samples of "
                                                   "random classes (default: one per class)")
    smp.add_argument("--sampler", choices=SAMPLERS, help="(default: the model's recipe)")
    smp.add_argument("--steps", type=int, help="sampling steps (default: the sampler's)")
    smp.add_argument("--cfg", type=float, help="guidance scale, >= 0; 1 = unguided (default: the recipe's)")
    smp.add_argument("--seed", type=int, default=0, help="(default: 0)")
    smp.add_argument("--batch-size", type=positive_int, default=64, help="(default: 64)")
    smp.add_argument("--dtype", choices=sorted(DTYPES), help="(default: bf16 on CUDA, fp32 on CPU)")
    smp.set_defaults(func=sample_command)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except CLIError as e:
        print(f"dcae {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
