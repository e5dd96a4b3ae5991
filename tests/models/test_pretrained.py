"""Loading and saving: our folders, diffusers folders, the authors' checkpoints (files, wrapped training
checkpoints, hub folders), dtype, atomic writes and every refusal."""
import ast
import contextlib
import functools
import json
import math
import pathlib
import random
import signal

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
    return key_map(DCAE, tiny.config, "authors").to_theirs(tiny.state_dict())


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



def test_save_pretrained_takes_the_format(tmp_path, tiny):
    tiny.save_pretrained(tmp_path, format="diffusers")  # as the README documents it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "AutoencoderDC"
    assert_same_weights(DCAE.from_pretrained(tmp_path), tiny)


def _function_level_imports(path: pathlib.Path, functions=None) -> list[str]:
    """``module.function: import`` for each import statement inside a function of the module at ``path``
    (only the named functions, when given)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (functions is None or node.name in functions):
            found += [f"{path.stem}.{node.name}: {ast.unparse(inner)}" for inner in ast.walk(node)
                      if isinstance(inner, (ast.Import, ast.ImportFrom))]
    return found


def test_loading_imports_at_top_level_without_a_circle():
    """autoencoder -> pretrained -> convert -> (config, weights): no module imports the model back, and none
    imports inside a function to dodge a circle."""
    models = pathlib.Path(pretrained.__file__).parent
    for name in ("pretrained", "convert"):
        imported = {ast.unparse(node) for node in ast.walk(ast.parse((models / f"{name}.py").read_text()))
                    if isinstance(node, (ast.Import, ast.ImportFrom))}
        assert not [line for line in imported if "autoencoder" in line], name
    found = [line for name in ("pretrained", "convert", "config")
             for line in _function_level_imports(models / f"{name}.py")]
    found += _function_level_imports(models.parent / "weights.py")
    found += _function_level_imports(models / "autoencoder.py", {"from_pretrained", "save_pretrained"})
    assert found == []


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises TimeoutError in this (main) thread after ``seconds``: a test of a hang fails instead of hanging."""
    def fire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("make", [
    lambda: (lambda d: d.__setitem__("state_dict", d) or d)({}),
    lambda: functools.reduce(lambda inner, _: {"model": inner}, range(50), {"epoch": 1}),
], ids=["self-referential", "50 levels"])
def test_nested_checkpoints_are_refused_quickly(tmp_path, make):
    path = tmp_path / "loop.pt"
    torch.save(make(), path)
    with time_limit(10), pytest.raises(ValueError, match=f"loop.pt: no state dict of tensors within "
                                                         f"{pretrained.MAX_WRAPPER_DEPTH} levels of wrappers"):
        DCAE.from_pretrained(path, preset="tiny-f32c8")


def _ours(folder, tiny):
    tiny.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("change, match", [
    (lambda meta: {k: v for k, v in meta.items() if k != "_format_version"}, "_format_version must be"),
    (lambda meta: {**meta, "_format_version": "1"}, "_format_version must be"),
    (lambda meta: {**meta, "latent_channels": 0}, "config.json: latent_channels: "),
    (lambda meta: {**meta, "encoder_widths": [16, 32, 64, 64, 64, 10**12]}, "config.json: encoder_widths: "),
    (lambda meta: {**meta, "encoder_widths": {"a": 1}}, "config.json: encoder_widths: "),
    (lambda meta: {**meta, "encoder_qkv_multiscales": [1, 2, 3, 4, 5, 6]}, "config.json: encoder_qkv_multiscales"),
    (lambda meta: {**meta, "scaling_factor": "x"}, "config.json: scaling_factor: "),
    (lambda meta: {**meta, "scaling_factor": math.nan}, "config.json: scaling_factor: "),
    (lambda meta: {k: v for k, v in meta.items() if k != "latent_channels"}, "missing DCAEConfig fields"),
    (lambda meta: [meta], "must hold a JSON object"),
    (lambda meta: "{not json", "not valid JSON"),
    (lambda meta: b"\xff\xfe\x00", "not valid JSON"),
], ids=["no version", "version str", "latent 0", "width 1e12", "widths object", "multiscales ints",
        "scale x", "scale nan", "missing field", "list", "bad json", "not utf-8"])
def test_junk_in_our_config_is_a_value_error(tmp_path, tiny, change, match):
    meta = change(_ours(tmp_path, tiny))
    config = tmp_path / "config.json"
    if isinstance(meta, bytes):
        config.write_bytes(meta)
    else:
        config.write_text(meta if isinstance(meta, str) else json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        DCAE.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, match", [
    ({"latent_channels": 0}, "diffusers config latent_channels"),
    ({"encoder_block_out_channels": 5}, "diffusers config encoder_block_out_channels"),
    ({"encoder_qkv_multiscales": [1, 2, 3, 4, 5, 6]}, "diffusers config encoder_qkv_multiscales"),
    ({"scaling_factor": "x"}, "diffusers config scaling_factor"),
])
def test_junk_in_a_diffusers_config_is_a_value_error(tmp_path, tiny, change, match):
    pretrained.save(tiny, tmp_path, format="diffusers")
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(ValueError, match=f"config.json: {match}"):
        DCAE.from_pretrained(tmp_path)


def test_junk_weight_files_are_value_errors_naming_the_file(tmp_path, tiny, authors_sd):
    safetensors.torch.save_file(authors_sd, tmp_path / "whole.safetensors")
    torch.save(authors_sd, tmp_path / "whole.pt")
    for suffix in (".safetensors", ".pt"):
        content = (tmp_path / f"whole{suffix}").read_bytes()
        for kind, junk in (("truncated", content[: len(content) // 2]), ("empty", b""),
                           ("garbage", bytes(range(256)) * 4)):
            path = tmp_path / f"{kind}{suffix}"
            path.write_bytes(junk)
            with pytest.raises(ValueError, match=f"{kind}{suffix} is not a readable"):
                DCAE.from_pretrained(path, preset="tiny-f32c8")
    ours = tmp_path / "ours"
    _ours(ours, tiny)
    (ours / "model.safetensors").write_bytes((ours / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        DCAE.from_pretrained(ours)
    torch.save({k: v.int() for k, v in authors_sd.items()}, tmp_path / "ints.pt")
    with pytest.raises(ValueError, match="not dense CPU tensors of the expected kind"):
        DCAE.from_pretrained(tmp_path / "ints.pt", preset="tiny-f32c8")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"model_name": 5}))
    with pytest.raises(ValueError, match="model_name must be a preset name"):
        DCAE.from_pretrained(tmp_path / "hub")


def _sharded(folder: pathlib.Path, tiny, shard_name: str) -> pathlib.Path:
    """A diffusers folder of ``tiny`` whose index names one shard, ``shard_name``; returns the weights file."""
    pretrained.save(tiny, folder, format="diffusers")
    weights = folder / pretrained.DIFFUSERS_WEIGHTS[0]
    keys = safetensors.torch.load_file(weights).keys()
    (folder / pretrained.DIFFUSERS_INDEX).write_text(json.dumps({"weight_map": {k: shard_name for k in keys}}))
    return weights


def test_sharded_index_reads_only_inside_its_folder(tmp_path, tiny):
    folder = tmp_path / "model"
    weights = _sharded(folder, tiny, "shard-1.safetensors")
    weights.rename(folder / "shard-1.safetensors")
    assert_same_weights(DCAE.from_pretrained(folder), tiny)
    outside = tmp_path / "outside.safetensors"
    (folder / "shard-1.safetensors").rename(outside)  # a valid shard, but outside the folder
    for name in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors", "..", ""):
        index = json.loads((folder / pretrained.DIFFUSERS_INDEX).read_text())
        index["weight_map"] = {k: name for k in index["weight_map"]}
        (folder / pretrained.DIFFUSERS_INDEX).write_text(json.dumps(index))
        with pytest.raises(ValueError, match="is not a file name inside"):
            DCAE.from_pretrained(folder)
    index["weight_map"] = {k: "missing.safetensors" for k in index["weight_map"]}
    (folder / pretrained.DIFFUSERS_INDEX).write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        DCAE.from_pretrained(folder)
    (folder / pretrained.DIFFUSERS_INDEX).write_text(json.dumps({"weight_map": {"a": 5}}))
    with pytest.raises(ValueError, match="no weight_map"):
        DCAE.from_pretrained(folder)


def test_corrupted_files_raise_only_value_errors(tmp_path, tiny, authors_sd):
    """Random truncations and byte flips of each kind of file: a ValueError (or a load, when only tensor data
    changed), never another exception."""
    rng = random.Random(0)
    torch.save({"state_dict": authors_sd}, tmp_path / "ckpt.pt")
    safetensors.torch.save_file(authors_sd, tmp_path / "ckpt.safetensors")
    tiny.save_pretrained(tmp_path / "ours")
    tiny.save_pretrained(tmp_path / "diffusers", format="diffusers")
    for file, target in (("ckpt.pt", "ckpt.pt"), ("ckpt.safetensors", "ckpt.safetensors"),
                         ("ours/config.json", "ours"), ("diffusers/config.json", "diffusers")):
        original = (tmp_path / file).read_bytes()
        for _ in range(8):
            junk = bytearray(original[: rng.randrange(len(original))] if rng.random() < 0.3 else original)
            for _ in range(rng.randrange(1, 6)):
                junk[rng.randrange(min(len(junk), 4000))] = rng.randrange(256)
            (tmp_path / file).write_bytes(junk)
            try:
                DCAE.from_pretrained(tmp_path / target, preset="tiny-f32c8" if "ckpt" in target else None)
            except ValueError:
                pass
