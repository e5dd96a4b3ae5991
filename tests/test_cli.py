"""``dcae reconstruct`` on a real photo: outputs, printed metrics, padding, tiling, user errors."""
import json

import pytest
import torch
from PIL import Image
from skimage import data

from dcae import DCAE
from dcae.cli import main
from dcae.data import load_image


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


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 4 images: a rank-deficient 2048-d covariance
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
