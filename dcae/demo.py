"""`make demo`: the whole paper at a size a 2-core CPU trains in minutes, in two halves.

1. DC-AE's three training phases on the builtin photos: a tiny DC-AE (f32, 8 latent channels: a 64 px crop
   becomes an 8 x 2 x 2 latent, 96x fewer values) trains phase 1 at 64 px, phase 2 (middle layers only) at 128 px
   and phase 3 (decoder head + PatchGAN) at 64 px. Held-out PSNR/SSIM at 64 px is printed before training and
   after each phase.
2. Latent diffusion on scikit-learn's handwritten digits (1,797 images, 10 classes) upscaled to 32 px: a small
   DC-AE (f8, 4 latent channels) trained on them, their latents, a tiny class-conditional DiT trained on the
   latents (rectified flow), then 10 samples per class with and without classifier-free guidance. It prints the
   class accuracy of the samples according to a classifier trained on the real digits (chance: 10%).

``out/demo/`` gets every run folder, the labelled pictures (reconstructions, samples) and the loss curves as PNG.
On a GPU the same code runs the Triton ops.
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from .data import batches, make_dataset, save_image
from .digits import DigitClassifier, write_digits
from .figures import labelled_grid
from .latents import encode_latents
from .metrics import evaluate_reconstructions
from .models import DCAE
from .pipeline import generate, load_autoencoder, load_diffusion_model
from .train.autoencoder import AutoencoderOptions, AutoencoderTask
from .train.diffusion import DiffusionOptions, DiffusionTask
from .train.trainer import Trainer

PRESET = "tiny-f32c8"
EVAL_RESOLUTION = 64
# (phase, resolution, steps, batch size)
SCHEDULE = ((1, 64, 600, 8), (2, 128, 60, 4), (3, 64, 100, 8))
# The diffusion half: digits at DIGITS_RESOLUTION px through DIGITS_AE (4 x 4 x 4 latents), DIGITS_MODEL on them.
DIGITS_RESOLUTION = 32
DIGITS_AE, DIGITS_AE_STEPS, DIGITS_AE_BATCH = "tiny-f8c4", 150, 16
DIGITS_MODEL, DIGITS_STEPS, DIGITS_BATCH = "dit-tiny", 500, 32  # rectified flow (Sana's objective)
SAMPLES_PER_CLASS = 10
GUIDANCE = 3.0


def heldout_images() -> torch.Tensor:
    """The builtin held-out crops at EVAL_RESOLUTION, (N, 3, R, R), the photos interleaved so that any first few
    show each of them."""
    heldout = make_dataset("builtin", EVAL_RESOLUTION, "heldout")
    images = next(batches(heldout, len(heldout)))
    photos = [heldout.crops[i][0] for i in range(len(images))]
    order = sorted(range(len(images)), key=lambda i: (photos[:i].count(photos[i]), photos[i]))
    return images[order]


def autoencoder_half(out: Path, scale: float, device: str) -> dict:
    """DC-AE's three phases on the builtin photos; returns the held-out metrics table (name -> metrics)."""
    images = heldout_images()
    torch.manual_seed(0)
    model = DCAE.from_config(PRESET).to(device).eval()
    latent = tuple(model.encode(images[:1].to(device)).shape[1:])
    where = f"{len(images)} held-out crops of {EVAL_RESOLUTION} px, latent {'x'.join(map(str, latent))}"
    rows, labels, table = [images], ["held-out"], []

    def record(name: str, model: DCAE, note: str = "") -> None:
        metrics, recon = evaluate_reconstructions(model.eval(), images.split(8), keep=len(images))
        rows.append(recon)
        labels.append(name)
        table.append((name, metrics))
        print(f"{name}{note}, {where}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}")

    record("untrained", model)
    init, start = None, time.time()
    for phase, resolution, steps, batch in SCHEDULE:
        run = out / f"phase{phase}"
        opts = AutoencoderOptions(phase=phase, out=run, preset=PRESET if init is None else None, init=init,
                                  steps=max(1, round(steps * scale)), batch_size=batch, resolution=resolution,
                                  image_every=50, save_every=100, log_every=5, samples_per_epoch=512)
        Trainer(AutoencoderTask(opts)).run()
        init = run
        record(f"after phase {phase}", DCAE.from_pretrained(run / "model").to(device),
               f" ({time.time() - start:.0f} s of training so far)")
    save_image(labelled_grid(rows, labels, f"DC-AE {PRESET}: {where}"), out / "reconstructions.png")
    rise = table[-1][1]["psnr"] - table[0][1]["psnr"]
    print("\n".join(f"{name:>16}: PSNR {m['psnr']:6.2f} dB  SSIM {m['ssim']:.4f}" for name, m in table))
    print(f"PSNR rise over the untrained model ({where}): {rise:+.2f} dB")
    return dict(table)


def diffusion_half(out: Path, scale: float, device: str) -> dict:
    """Digits -> a DC-AE trained on them -> latents -> a class-conditional DiT -> guided samples; returns the
    samples' class accuracy with and without guidance and the classifier's on real digits."""
    digits = write_digits(out / "digits", DIGITS_RESOLUTION)
    Trainer(AutoencoderTask(AutoencoderOptions(
        phase=1, out=out / "digits-ae", preset=DIGITS_AE, data=str(digits), resolution=DIGITS_RESOLUTION,
        steps=max(1, round(DIGITS_AE_STEPS * scale)), batch_size=DIGITS_AE_BATCH, lr=1e-3, image_every=50,
        save_every=10**9,
        log_every=10))).run()
    autoencoder = DCAE.from_pretrained(out / "digits-ae")
    encode_latents(autoencoder, digits, out / "digits-latents", DIGITS_RESOLUTION, batch_size=256,
                   device=torch.device(device), progress=False)
    run = out / "digits-dit"
    Trainer(DiffusionTask(DiffusionOptions(
        model=DIGITS_MODEL, objective="flow", latents=out / "digits-latents", ae=out / "digits-ae", out=run,
        steps=max(1, round(DIGITS_STEPS * scale)), batch_size=DIGITS_BATCH, lr=2e-3, warmup_steps=50, cfg=GUIDANCE,
        image_every=max(1, round(DIGITS_STEPS * scale)), save_every=10**9, log_every=10))).run()
    pipe = load_diffusion_model(run / "model", device)
    autoencoder = load_autoencoder(out / "digits-ae", pipe.latents, device)
    classes = torch.arange(10).repeat_interleave(SAMPLES_PER_CLASS)
    sampling = dict(sampler=pipe.sampling["sampler"], steps=pipe.sampling["steps"])
    classifier, accuracy, rows = DigitClassifier(), {}, []
    for cfg in (GUIDANCE, 1.0):
        images = generate(pipe.model, autoencoder, pipe.objective, classes, cfg=cfg, seed=0, **sampling)
        accuracy[f"guidance {cfg:g}" if cfg != 1 else "no guidance"] = classifier.accuracy(images, classes)
        rows.append(images)
    title = (f"{DIGITS_MODEL} on {DIGITS_AE} latents: {sampling['sampler']}, {sampling['steps']} steps; left: "
             f"guidance {GUIDANCE:g}, right: none (same noise)")
    grid = [torch.cat([g, u]) for g, u in zip(rows[0].split(SAMPLES_PER_CLASS), rows[1].split(SAMPLES_PER_CLASS))]
    save_image(labelled_grid(grid, [f"digit {c}" for c in range(10)], title), out / "digits-samples.png")
    print(f"class accuracy of {len(classes)} generated digits ({SAMPLES_PER_CLASS} per class), read by a classifier "
          f"of the real digits ({classifier.real_accuracy:.1%} on held-out real ones; chance 10%): " +
          ", ".join(f"{name} {value:.0%}" for name, value in accuracy.items()))
    return {"accuracy": accuracy, "classifier_real_accuracy": classifier.real_accuracy}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m dcae.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every training run's steps")
    parser.add_argument("--diffusion-scale", type=float, help="multiply the diffusion half's steps (default: --scale)")
    args = parser.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.time()
    summary = {"autoencoder": autoencoder_half(args.out, args.scale, device)}
    summary["diffusion"] = diffusion_half(args.out, args.scale if args.diffusion_scale is None
                                          else args.diffusion_scale, device)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}/reconstructions.png (rows: held-out crops, untrained, after phases 1-3), "
          f"{args.out}/digits-samples.png (rows: digits; guided, then unguided), {args.out}/*/loss.png, "
          f"{args.out}/*/samples/ ({time.time() - start:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
