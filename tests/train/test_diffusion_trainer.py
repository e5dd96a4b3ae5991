"""`dcae train-diffusion` and `dcae sample` on a tiny latent folder: exact resume (weights and records), sample
grids, the exported model, and the bad inputs that must be one line with exit code 2."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dcae import DCAE
from dcae.cli import main
from dcae.latents import encode_latents
from dcae.train.diffusion import DiffusionOptions, DiffusionTask
from dcae.train.trainer import INTERRUPTED, Trainer

from ..cli_errors import one_line_error
from .runs import assert_same_checkpoints, ctrl_c_after, metrics_rows

FAST = dict(batch_size=4, log_every=1, image_every=100, save_every=100, progress=False, sample_steps=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(autoencoder folder, latent folder, image folder): 3 classes x 4 images of 32 px, tiny-f8c4 latents."""
    root = tmp_path_factory.mktemp("diffusion")
    rng = np.random.default_rng(0)
    for label in range(3):
        for i in range(4):
            path = root / "images" / f"class{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = (rng.random((32, 32, 3)) * 80 + 80 * label).astype(np.uint8)
            Image.fromarray(pixels).save(path)
    torch.manual_seed(0)
    DCAE.from_config("tiny-f8c4").save_pretrained(root / "ae")
    with torch.no_grad():
        encode_latents(DCAE.from_pretrained(root / "ae"), root / "images", root / "latents", 32, progress=False)
    return root / "ae", root / "latents", root / "images"


def trainer_for(out, data, **kw) -> Trainer:
    ae, latents, _ = data
    return Trainer(DiffusionTask(DiffusionOptions(model="dit-tiny", latents=latents, ae=ae, out=out, **{**FAST, **kw})))


@pytest.mark.parametrize("objective", ["eps", "flow"])
def test_resume_continues_exactly(tmp_path, monkeypatch, data, objective):
    opts = dict(steps=4, objective=objective, warmup_steps=1)
    assert trainer_for(tmp_path / "straight", data, **opts).run() == 0
    with ctrl_c_after(monkeypatch, 2):
        assert trainer_for(tmp_path / "split", data, **opts).run() == INTERRUPTED
    assert trainer_for(tmp_path / "split", data, resume=True, **opts).run() == 0
    assert_same_checkpoints(tmp_path / "straight", tmp_path / "split", ("model", "ema", "optimizer"))
    assert metrics_rows(tmp_path / "straight") == metrics_rows(tmp_path / "split")
    assert [row["step"] for row in metrics_rows(tmp_path / "split")] == [1, 2, 3, 4]


def test_run_exports_a_model_that_samples(tmp_path, data, capsys):
    ae, latents, _ = data
    out = tmp_path / "run"
    assert trainer_for(out, data, steps=2, learn_sigma=True).run() == 0
    record = json.loads((out / "run.json").read_text())
    assert record["objective"] == {"kind": "eps", "learn_sigma": True, "schedule": "linear", "time_offset": 0}
    assert record["latents"]["classes"] == 3 and record["model_config"]["in_channels"] == 4
    assert (out / "samples" / "step-00000002.png").is_file() and (out / "loss.png").is_file()
    info = json.loads((out / "model" / "diffusion.json").read_text())
    assert info["sampling"] == {"sampler": "ddpm", "steps": 3, "cfg": 1.3}
    args = ["sample", "--run", str(out), "--ae", str(ae), "--classes", "0", "2", "--n", "2", "--steps", "4",
            "--seed", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    names = sorted(p.name for p in (tmp_path / "a").glob("*-class*.png"))
    assert names == ["000000-class0.png", "000001-class0.png", "000002-class2.png", "000003-class2.png"]
    for name in [*names, "grid.png"]:  # deterministic with --seed
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert "wrote 4 samples" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert trainer_for(out, data, steps=1).run() == 0
    return out


@pytest.mark.parametrize("extra, message", [
    (["--cfg", "-1"], "cfg_scale must be a finite number >= 0"),
    (["--sampler", "euler"], "invalid choice: 'euler'"),
    (["--sampler", "flow-euler"], "does not fit a 'eps' model"),
    (["--steps", "0"], "steps must be an int in [1, 1000]"),
    (["--steps", "1001"], "steps must be an int in [1, 1000]"),
    (["--classes", "3"], "--classes [3]: the model has classes 0..2"),
])
def test_sample_bad_input_is_one_line(tmp_path, capsys, data, trained, extra, message):
    one_line_error(capsys, ["sample", "--run", str(trained), "--ae", str(data[0]), "--out", str(tmp_path), *extra],
                   message)


def test_sample_refuses_another_autoencoder(tmp_path, capsys, trained):
    torch.manual_seed(1)
    DCAE.from_config("tiny-f8c4").save_pretrained(tmp_path / "other")
    one_line_error(capsys, ["sample", "--run", str(trained), "--ae", str(tmp_path / "other"), "--out",
                            str(tmp_path / "s")], "is not the autoencoder that encoded these latents")


def test_train_bad_input_is_one_line(tmp_path, capsys, data):
    ae, latents, _ = data
    base = ["train-diffusion", "--latents", str(latents), "--out", str(tmp_path / "run"), "--steps", "1"]
    one_line_error(capsys, [*base, "--model", "dit-nope"], "unknown DiT preset 'dit-nope'")
    one_line_error(capsys, [*base, "--model", "resnet"], "give a DiT or U-ViT preset")
    one_line_error(capsys, [*base, "--model", "dit-tiny", "--cfg", "-1"], "--cfg must be >= 0")
    one_line_error(capsys, [*base, "--model", "dit-tiny", "--objective", "flow", "--learn-sigma"],
                   "--learn-sigma applies to the eps objective only")
    one_line_error(capsys, [*base, "--model", "dit-tiny", "--sampler", "flow-euler"], "does not fit a 'eps' model")
    one_line_error(capsys, [*base, "--model", "dit-tiny", "--latents", str(tmp_path / "missing")], "missing")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"_class_name": "DiT", "latent_size": [4, 4], "in_channels": 8, "hidden_size": 32,
                                  "depth": 1, "num_heads": 2, "num_classes": 3}))
    one_line_error(capsys, [*base, "--model", str(config)], "the model takes latents of shape (8, 4, 4)")
    config.write_text(json.dumps({"_class_name": "DiT", "latent_size": [4, 4], "in_channels": 4, "hidden_size": 32,
                                  "depth": 1, "num_heads": 2, "num_classes": 5}))
    one_line_error(capsys, [*base, "--model", str(config)], "the model has 5 classes")
    torch.manual_seed(2)
    DCAE.from_config("tiny-f8c4").save_pretrained(tmp_path / "other")
    one_line_error(capsys, [*base, "--model", "dit-tiny", "--ae", str(tmp_path / "other")],
                   "is not the autoencoder that encoded these latents")
