"""The ``dcae`` command line: ``reconstruct`` one image, ``evaluate`` a model on a dataset, ``train-ae``."""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def load_model(name_or_path: str, device: str, dtype: torch.dtype):
    from .models import DCAE, PRESETS
    if Path(name_or_path).exists():
        try:
            model = DCAE.from_pretrained(name_or_path)
        except (ValueError, OSError) as e:
            raise CLIError(f"cannot load {name_or_path}: {e}") from e
    elif name_or_path in PRESETS:
        print(f"warning: {name_or_path} is a preset name, not a checkpoint: its weights are random and the "
              "reconstruction is meaningless (pass a local checkpoint folder or file)", file=sys.stderr)
        model = DCAE.from_config(name_or_path)
    else:
        raise CLIError(f"--model {name_or_path!r} is neither a local checkpoint path nor a preset "
                       f"({', '.join(sorted(PRESETS))})")
    return model.to(device=device, dtype=dtype).eval()


def _weights(loader, path):
    """(network or None, status line) from dcae.lpips.load_lpips / dcae.fid.load_inception; bad files -> CLIError."""
    try:
        return loader(path)
    except (ValueError, OSError) as e:
        raise CLIError(str(e)) from e


def reconstruct(args) -> None:
    from .data import image_grid, load_image, save_image
    from .lpips import load_lpips
    from .metrics import ReconstructionMetrics

    path = Path(args.input)
    if not path.is_file():
        raise CLIError(f"input image not found: {path}")
    try:
        image = load_image(path)
    except ValueError as e:
        raise CLIError(str(e)) from e
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lpips, _ = _weights(load_lpips, args.lpips_weights)
    model = load_model(args.model, device, DTYPES[args.dtype])
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
    output = Path(args.output) if args.output else path.with_name(f"{path.stem}_recon.png")
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
    import json

    from tqdm import tqdm

    from .data import BuiltinImages, ImageFolder, batches
    from .fid import load_inception
    from .lpips import load_lpips
    from .metrics import ReconstructionMetrics

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lpips, lpips_status = _weights(load_lpips, args.lpips_weights)
    inception, fid_status = _weights(load_inception, args.fid_weights)
    try:
        images = (BuiltinImages(args.resolution, "heldout") if args.data == "builtin"
                  else ImageFolder(args.data, args.resolution, train=False))
    except (ValueError, OSError) as e:
        raise CLIError(str(e)) from e
    model = load_model(args.model, device, DTYPES[args.dtype])
    if args.resolution % model.spatial_compression_ratio:
        raise CLIError(f"--resolution {args.resolution} is not a multiple of the compression ratio "
                       f"{model.spatial_compression_ratio}")
    metrics = ReconstructionMetrics(None if lpips is None else lpips.to(device),
                                    None if inception is None else inception.to(device))
    count = len(images) if args.limit is None else min(args.limit, len(images))
    for x in tqdm(batches(images, args.batch_size, count), desc="evaluate", unit="batch",
                  total=-(-count // args.batch_size)):
        with torch.inference_mode():
            recon = model.decode(model.encode(x.to(device, DTYPES[args.dtype]), tile_size=args.tile),
                                 tile_size=args.tile)
        metrics.update(x.to(device), recon.float().clamp(-1, 1))
    result = {"model": args.model, "data": args.data, "resolution": args.resolution, "images": count,
              **metrics.compute(), "lpips_status": lpips_status, "rfid_status": fid_status}
    print(f"{count} images at {args.resolution} px: " + "  ".join(
        f"{k.upper()} {result[k]:.4f}" for k in ("psnr", "ssim", "lpips", "rfid") if k in result))
    print(lpips_status, fid_status, sep="\n")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))


def train_ae(args) -> int:
    from .train import distributed
    from .train.autoencoder import Trainer
    from .train.options import options_from_args
    try:
        trainer = Trainer(options_from_args(args))
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    try:
        return trainer.run()
    finally:
        distributed.shutdown(trainer.world)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcae", description="DC-AE on Triton kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("reconstruct", help="encode and decode an image; print PSNR/SSIM")
    rec.add_argument("--model", required=True, help="preset name or local checkpoint (folder or file)")
    rec.add_argument("--input", required=True, help="image file (png/jpg/webp)")
    rec.add_argument("--output", help="reconstruction PNG (default: <input>_recon.png)")
    rec.add_argument("--tile", type=int, help="tile size in pixels for tiled encode/decode")
    rec.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    rec.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    rec.add_argument("--lpips-weights", help="local LPIPS file (python -m dcae.lpips convert): also print LPIPS")
    rec.set_defaults(run=reconstruct)
    ev = sub.add_parser("evaluate", help="PSNR/SSIM (+ LPIPS, rFID with local weights) over a dataset")
    ev.add_argument("--model", required=True, help="preset name or local checkpoint (folder or file)")
    ev.add_argument("--data", required=True, help="image folder (center crops), or 'builtin' (its held-out crops)")
    ev.add_argument("--resolution", type=int, default=256, help="crop size, a multiple of the compression ratio")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--limit", type=int, help="evaluate the first N images only")
    ev.add_argument("--tile", type=int, help="tile size in pixels for tiled encode/decode")
    ev.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ev.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    ev.add_argument("--lpips-weights", help="local LPIPS file (python -m dcae.lpips convert)")
    ev.add_argument("--fid-weights", help="local pytorch-fid Inception file (pt_inception-2015-12-05-6726825d.pth)")
    ev.add_argument("--output", help="also write the results to this json file")
    ev.set_defaults(run=evaluate)
    from .train.options import add_arguments
    train = sub.add_parser("train-ae", help="train a DC-AE: phase 1, 2 or 3 (also: torchrun -m dcae.train)")
    add_arguments(train)
    train.set_defaults(run=train_ae)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except CLIError as e:
        print(f"dcae {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
