"""Loading and saving: our folders, diffusers folders, the authors' checkpoints (files, wrapped training
checkpoints, hub folders), dtype, atomic writes and every refusal."""
import json
import pathlib

import pytest
import safetensors.torch
import torch

from dcae import DCAE
from dcae.models import pretrained
from dcae.models.convert import key_map


class Malicious:
    """Unpickling this creates a file: what a weights-only load must refuse."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def random_model(name: str, seed: int = 0) -> DCAE:
    """A model with random weights, norms and BatchNorm statistics."""
    torch.manual_seed(seed)
    model = DCAE.from_config(name)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point() and t.dim() == 1:
                t.normal_(1.0 if key.endswith(".weight") else 0.0, 0.2)
            elif key.endswith("num_batches_tracked"):
                t.fill_(7)
    return model.eval()


def assert_same_weights(a: DCAE, b: DCAE):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny():
    return random_model("tiny-f32c8")


@pytest.fixture(scope="module")
def authors_sd(tiny):
    """tiny's weights under the authors' efficientvit names."""
    return key_map(tiny.config, "authors").to_theirs(tiny.state_dict())


def test_save_load_round_trip_is_exact(tmp_path):
    model = random_model("tiny-sana-f32c8")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["_format"] == "dcae" and meta["_format_version"] == pretrained.FORMAT_VERSION
    loaded = DCAE.from_pretrained(tmp_path)
    assert loaded.config == model.config and not loaded.training
    assert_same_weights(loaded, model)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_dtype_is_kept_unless_asked(tmp_path, tiny):
    half = random_model("tiny-f32c8").half()
    half.save_pretrained(tmp_path)
    loaded = DCAE.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    loaded = DCAE.from_pretrained(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert loaded.state_dict()["decoder.up_blocks.1.1.norm.num_batches_tracked"].dtype == torch.int64


def test_save_is_atomic(tmp_path, tiny, monkeypatch):
    tiny.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(tensors, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        random_model("tiny-f32c8", seed=1).save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_diffusers_format_loads_in_diffusers(tmp_path, tiny):
    diffusers = pytest.importorskip("diffusers")
    pretrained.save(tiny, tmp_path, format="diffusers")
    theirs = diffusers.AutoencoderDC.from_pretrained(tmp_path).eval()
    assert theirs.config.scaling_factor == tiny.scaling_factor
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x).latent, tiny.encode(x), rtol=1e-5, atol=1e-5)
        z = tiny.encode(x)
        torch.testing.assert_close(theirs.decode(z).sample, tiny.decode(z), rtol=1e-5, atol=1e-5)
    assert_same_weights(DCAE.from_pretrained(tmp_path), tiny)  # and back
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / pretrained.DIFFUSERS_INDEX).is_file()
    assert_same_weights(DCAE.from_pretrained(tmp_path / "sharded"), tiny)


@pytest.mark.parametrize("preset", [None, "tiny-f32c8"])
def test_authors_safetensors_file(tmp_path, tiny, authors_sd, preset):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(authors_sd, path)
    assert_same_weights(DCAE.from_pretrained(path, preset=preset), tiny)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}},
    lambda sd: {"ema": {0.9998: sd}},
    lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: sd,
], ids=["state_dict", "ema", "model+module.", "plain"])
def test_authors_torch_checkpoints(tmp_path, tiny, authors_sd, wrap):
    path = tmp_path / "checkpoint.pt"
    torch.save(wrap(authors_sd), path)
    assert_same_weights(DCAE.from_pretrained(path), tiny)


def test_authors_hub_folder(tmp_path, tiny, authors_sd):
    (tmp_path / "config.json").write_text(json.dumps({"model_name": "tiny-f32c8"}))
    safetensors.torch.save_file(authors_sd, tmp_path / "model.safetensors")
    assert_same_weights(DCAE.from_pretrained(tmp_path), tiny)
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    torch.save(authors_sd, bin_only / "pytorch_model.bin")
    assert_same_weights(DCAE.from_pretrained(bin_only), tiny)


def test_checkpoint_without_batchnorm_counters_loads(tmp_path, tiny, authors_sd):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v for k, v in authors_sd.items() if "num_batches_tracked" not in k}, path)
    loaded = DCAE.from_pretrained(path, preset="tiny-f32c8")
    counters = {k: v for k, v in loaded.state_dict().items() if k.endswith("num_batches_tracked")}
    assert counters and all(v.item() == 0 for v in counters.values())


def test_bad_tensors_are_listed(tmp_path, authors_sd):
    sd = dict(authors_sd)
    sd.pop("decoder.project_in.main.conv.bias")
    sd["decoder.project_out.op_list.9.weight"] = torch.zeros(3)
    sd["encoder.stages.3.op_list.0.context_module.main.qkv.conv.weight"] = torch.zeros(192, 64, 3, 3)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(sd, path)
    with pytest.raises(ValueError) as info:
        DCAE.from_pretrained(path, preset="tiny-f32c8")
    msg = str(info.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in msg and "authors layout" in msg
    assert "decoder.project_in.main.conv.bias" in msg and "decoder.project_out.op_list.9.weight" in msg
    assert "qkv.conv.weight: (192, 64, 3, 3), expected (192, 64, 1, 1)" in msg
    with pytest.raises(ValueError, match="fit no preset"):
        DCAE.from_pretrained(path)


def test_bad_tensors_in_our_and_diffusers_folders(tmp_path, tiny):
    ours, theirs = tmp_path / "ours", tmp_path / "diffusers"
    tiny.save_pretrained(ours)
    sd = safetensors.torch.load_file(ours / "model.safetensors")
    sd.pop("encoder.conv_out.bias")
    safetensors.torch.save_file(sd, ours / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 missing(.|\n)*encoder.conv_out.bias"):
        DCAE.from_pretrained(ours)
    pretrained.save(tiny, theirs, format="diffusers")
    path = theirs / "diffusion_pytorch_model.safetensors"
    sd = safetensors.torch.load_file(path)
    sd["encoder.down_blocks.4.0.attn.to_k.weight"] = torch.zeros(64, 32)
    safetensors.torch.save_file(sd, path)
    with pytest.raises(ValueError, match=r"diffusers layout(.|\n)*to_k.weight: \(64, 32\), expected \(64, 64\)"):
        DCAE.from_pretrained(theirs)


def test_malicious_pickle_is_refused(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"state_dict": Malicious(marker)}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        DCAE.from_pretrained(path, preset="tiny-f32c8")
    assert not marker.exists()


def test_unknown_layouts_and_paths_are_refused(tmp_path, tiny):
    with pytest.raises(FileNotFoundError):
        DCAE.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown folder layout"):
        DCAE.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown weights file type"):
        DCAE.from_pretrained(tmp_path / "notes.txt")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="unknown folder layout"):
        DCAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="not an AutoencoderDC"):
        DCAE.from_pretrained(tmp_path)
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="no state dict"):
        DCAE.from_pretrained(tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="format must be"):
        pretrained.save(tiny, tmp_path / "out", format="onnx")


def test_our_folder_refuses_preset_and_newer_versions(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="do not pass preset"):
        DCAE.from_pretrained(tmp_path, preset="tiny-f32c8")
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "_format_version": 99}))
    with pytest.raises(ValueError, match="newer version"):
        DCAE.from_pretrained(tmp_path)

