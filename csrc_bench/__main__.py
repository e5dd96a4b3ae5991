"""``python -m csrc_bench <command> [options]``: one front for the benchmarks; each command's module parses its
own options (``python -m csrc_bench <command> --help``)."""
import argparse
import importlib
import sys

# command (and the csrc_bench module that runs it) -> one line of help
COMMANDS = {
    "report": "kernel benchmarks (pytest-benchmark over csrc_bench/test_bench_*.py) and their report",
    "model": "DC-AE end to end, encode / decode / tiled decode: ours vs diffusers' AutoencoderDC",
    "train": "a DC-AE training step (the trainer's own Trainer.train_step): ours vs diffusers, and phase 2's memory",
    "diffusion": "DiT / U-ViT on DC-AE vs SD-VAE latents: ours vs diffusers' DiT",
}


def parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<10} {text}" for name, text in COMMANDS.items())
    front = argparse.ArgumentParser(
        prog="python -m csrc_bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Benchmarks of dcae_kernels and the DC-AE models on a CUDA GPU.\n\ncommands:\n{commands}",
        epilog="Without a CUDA GPU nothing is measured: model, train and diffusion take --smoke, a tiny CPU run\n"
               "that checks the benchmark code paths (not performance figures); `make bench` runs those there.")
    front.add_argument("command", choices=COMMANDS, metavar="command",
                       help="one of the commands above; `python -m csrc_bench <command> --help` gives its options")
    front.add_argument("options", nargs=argparse.REMAINDER, help="the command's options")
    return front


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return importlib.import_module(f".{args.command}", __package__).main(args.options)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
