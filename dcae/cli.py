"""The ``dcae`` command line: ``dcae reconstruct ...`` (and the trainer's subcommands)."""
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


def reconstruct(args) -> None:
    from .data import image_grid, load_image, save_image
    from .metrics import psnr, ssim

    path = Path(args.input)
    if not path.is_file():
        raise CLIError(f"input image not found: {path}")
    try:
        image = load_image(path)
    except ValueError as e:
        raise CLIError(str(e)) from e
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    print(f"PSNR {psnr(image, recon).item():.2f} dB  SSIM {ssim(image, recon).item():.4f}")
    print(f"wrote {output} and {side}")


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
    rec.set_defaults(run=reconstruct)
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
