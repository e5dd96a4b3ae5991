"""``dcae reconstruct`` on a real photo: outputs, printed metrics, padding, tiling, user errors."""
import json

import pytest
import torch
from PIL import Image
from skimage import data

from dcae import DCAE
from dcae.cli import main
from dcae.data import load_image

from .cli_errors import one_line_error


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    DCAE.from_config("tiny-f32c8").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    Image.fromarray(data.astronaut()[:200, :150]).save(path)  # 150x200: not a multiple of 32
    return path


@pytest.mark.parametrize("tile", [None, 64])
def test_reconstruct_real_photo(model_dir, photo, tmp_path, capsys, tile):
    out = tmp_path / "out" / "recon.png"
    argv = ["reconstruct", "--model", str(model_dir), "--input", str(photo), "--output", str(out)]
    assert main(argv + (["--tile", str(tile)] if tile else [])) == 0
    printed = capsys.readouterr().out
    assert "latent: (1, 8, 7, 5)" in printed and "PSNR" in printed and "SSIM" in printed
    assert load_image(out).shape == (1, 3, 200, 150)
    side = Image.open(out.with_name("recon_side_by_side.png"))
    assert side.size[1] == 200 and side.size[0] > 300
    if tile:  # tiled and untiled runs write the same reconstruction (tiling is exact)
        untiled = tmp_path / "untiled.png"
        assert main(["reconstruct", "--model", str(model_dir), "--input", str(photo), "--output",
                     str(untiled)]) == 0
        assert (load_image(untiled) - load_image(out)).abs().max() <= 1 / 127.5


def test_user_errors_exit_2(model_dir, photo, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    small = tmp_path / "small.png"
    Image.fromarray(data.astronaut()[:20, :40]).save(small)
    cases = [(["--input", str(tmp_path / "missing.png")], "not found"),
             (["--input", str(bad)], "cannot read"),
             (["--input", str(small)], "smaller than the model's compression ratio 32"),
             (["--input", str(photo), "--model", str(tmp_path)], "cannot load")]
    for extra, message in cases:
        argv = ["reconstruct", "--model", str(model_dir), "--input", str(photo), *extra]
        assert main(argv) == 2
        assert message in capsys.readouterr().err


def test_evaluate_with_local_lpips_and_inception(model_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    from dcae.fid import FIDInception
    from dcae.lpips import LPIPS

    torch.manual_seed(0)
    save_file(LPIPS().state_dict(), tmp_path / "lpips.safetensors")
    torch.save(FIDInception().state_dict(), tmp_path / "inception.pth")
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--model", str(model_dir), "--data", "builtin", "--resolution", "64", "--limit", "4",
            "--lpips-weights", str(tmp_path / "lpips.safetensors"), "--fid-weights", str(tmp_path / "inception.pth"),
            "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 4 and {"psnr", "ssim", "lpips", "rfid"} <= set(result)
    assert "PSNR" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(model_dir), "--data", "builtin", "--resolution", "64", "--limit", "2",
                 "--output", str(out)]) == 0
    assert "rFID disabled" in json.loads(out.read_text())["rfid_status"]
    assert main(["evaluate", "--model", str(model_dir), "--data", "builtin", "--resolution", "48"]) == 2
    assert "multiple of the compression ratio 32" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(model_dir), "--data", "builtin", "--fid-weights",
                 str(tmp_path / "nope.pth")]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err


@pytest.mark.parametrize("tile, message", [("0", "expected a positive integer"), ("-32", "expected a positive "
                                                                                        "integer"),
                                           ("33", "--tile 33 is not a multiple of the compression ratio 32")])
def test_bad_tile_is_one_line(model_dir, photo, tmp_path, capsys, tile, message):
    one_line_error(capsys, ["reconstruct", "--model", str(model_dir), "--input", str(photo), "--output",
                            str(tmp_path / "r.png"), "--tile", tile], message)


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["--batch-size", "-1"], "--batch-size: expected a positive integer"),
    (["--limit", "0"], "--limit: expected a positive integer"),
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--output", "{file}/under.json"], "is a file, not a folder"),
    (["--output", "{dir}"], "is a folder: give a file name"),
    (["--output", "{dir}/x.txt"], "unsupported output type"),
])
def test_evaluate_argument_errors_are_one_line(model_dir, tmp_path, capsys, extra, message):
    file = tmp_path / "file"
    file.write_text("x")
    extra = [e.format(file=file, dir=tmp_path) for e in extra]
    one_line_error(capsys, ["evaluate", "--model", str(model_dir), "--data", "builtin", "--resolution", "64",
                            *extra], message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(model_dir, photo, capsys):
    one_line_error(capsys, ["reconstruct", "--model", str(model_dir), "--input", str(photo), "--device", "cuda"],
                   "this machine has 0 CUDA device(s)")
    one_line_error(capsys, ["train-ae", "--phase", "1", "--preset", "tiny-f32c8", "--out", "x", "--device", "cuda"],
                   "this machine has 0 CUDA device(s)")


def test_output_in_a_missing_folder_is_created_and_suffix_sets_the_format(model_dir, photo, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "recon.jpg"
    assert main(["reconstruct", "--model", str(model_dir), "--input", str(photo), "--output", str(out)]) == 0
    assert Image.open(out).format == "JPEG"
    one_line_error(capsys, ["reconstruct", "--model", str(model_dir), "--input", str(photo), "--output",
                            str(tmp_path / "recon.bmp")], "unsupported output type '.bmp'")


def test_reconstruct_default_output_is_not_beside_the_input(model_dir, photo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["reconstruct", "--model", str(model_dir), "--input", str(photo)]) == 0
    assert (tmp_path / "out" / "reconstruct" / "astronaut.png").is_file()
    assert sorted(p.name for p in photo.parent.iterdir()) == ["astronaut.png"]


@pytest.mark.parametrize("break_it, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]), "cannot load"),
    (lambda d: _edit_config(d, latent_channels=0), "latent_channels"),
    (lambda d: _edit_config(d, encoder_widths={"a": 1}), "encoder_widths"),
    (lambda d: _edit_config(d, _format_version=None), "_format_version"),
    (lambda d: _edit_config(d, encoder_qkv_multiscales=[1, 2, 3, 4, 5, 6]), "encoder_qkv_multiscales"),
    (lambda d: _edit_config(d, scaling_factor="x"), "scaling_factor"),
])
def test_broken_checkpoints_are_one_line(model_dir, photo, tmp_path, capsys, break_it, message):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    break_it(broken)
    one_line_error(capsys, ["reconstruct", "--model", str(broken), "--input", str(photo)], message)


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_a_trainer_run_folder_is_a_model(tmp_path, photo):
    """The one loader rule: a train-ae run folder loads (its model/), for reconstruct as for --init."""
    run = tmp_path / "run"
    torch.manual_seed(0)
    DCAE.from_config("tiny-f32c8").save_pretrained(run / "model")
    (run / "checkpoints").mkdir()
    assert main(["reconstruct", "--model", str(run), "--input", str(photo), "--output", str(tmp_path / "r.png")]) == 0


def test_train_ae_option_errors_are_one_line(tmp_path, capsys):
    base = ["train-ae", "--phase", "1", "--preset", "tiny-f32c8", "--out", str(tmp_path / "run")]
    one_line_error(capsys, [*base, "--resolution", "0"], "--resolution must be a positive integer, got 0")
    one_line_error(capsys, [*base, "--steps", "0"], "--steps must be an integer >= 1")
    one_line_error(capsys, [*base, "--lr", "-1"], "--lr must be > 0")
    one_line_error(capsys, [*base, "--phase", "4"], "invalid choice: 4")


def test_help_shows_defaults():
    import argparse
    import io

    from dcae.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train-ae"]
    text = io.StringIO()
    sub.print_help(text)
    text = " ".join(text.getvalue().split())
    for expected in ("optimizer steps to train (default: 1000)", "AdamW learning rate (default: phase 1: 6.4e-05",
                     "global batch per optimizer step", "(default: 8)"):
        assert expected in text, expected
