import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from dcae.train import checkpoint as ckpt
from dcae.train.checkpoint import (CheckpointError, capture_rng_state, find_latest, list_checkpoints,
                                   load_checkpoint, optimizer_state_from_flat, optimizer_state_to_flat,
                                   restore_rng_state, save_checkpoint)
from dcae.train.schedule import build_scheduler


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.5, 0.9), weight_decay=0.1)
    return model, opt, build_scheduler(opt, "cosine", warmup_steps=2, total_steps=6)


def _train(model, opt, sched, steps):
    for _ in range(steps):
        x = torch.randn(8, 5)  # drawn from the global RNG: a resumed run must draw the same batches
        loss = (model(x) - x[:, :3]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _save(directory, step, model, opt, sched, **kwargs):
    opt_tensors, opt_meta = optimizer_state_to_flat(opt.state_dict())
    state = {"optimizer": opt_meta, "scheduler": sched.state_dict(), "rng": capture_rng_state()}
    return save_checkpoint(directory, step, {"model": model.state_dict(), "optimizer": opt_tensors}, state,
                           **kwargs)


def test_adamw_resume_is_bit_exact(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, 6)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = _setup()
    _train(model, opt, sched, 3)
    _save(tmp_path, 3, model, opt, sched)
    torch.manual_seed(123)  # the restored RNG state must win over whatever happened meanwhile

    model, opt, sched = _setup()
    loaded = load_checkpoint(find_latest(tmp_path))
    assert loaded.step == 3
    model.load_state_dict(loaded.tensors["model"])
    opt.load_state_dict(optimizer_state_from_flat(loaded.tensors["optimizer"], loaded.state["optimizer"]))
    sched.load_state_dict(loaded.state["scheduler"])
    restore_rng_state(loaded.state["rng"])
    _train(model, opt, sched, 3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, straight[k]), k


def test_optimizer_flat_round_trip_keeps_non_tensor_state():
    sd = {"state": {0: {"step": 4, "momentum_buffer": torch.ones(2)}, 1: {"step": 5}},
          "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    tensors, meta = optimizer_state_to_flat(sd)
    assert set(tensors) == {"0.momentum_buffer"}
    back = optimizer_state_from_flat(tensors, json.loads(json.dumps(meta)))
    assert back["state"][0]["step"] == 4 and back["state"][1] == {"step": 5}
    assert torch.equal(back["state"][0]["momentum_buffer"], torch.ones(2))
    assert back["param_groups"] == sd["param_groups"]


def test_rng_round_trip_through_json():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = json.loads(json.dumps(capture_rng_state()))
    expected = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.standard_normal(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_layout_and_latest_pointer(tmp_path):
    path = save_checkpoint(tmp_path, 7, {"model": {"w": torch.arange(6.0).reshape(2, 3).t()}}, {"note": "x"})
    assert path == tmp_path / "ckpt-00000007"
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "state.json"]
    assert (tmp_path / "latest").read_text().strip() == "ckpt-00000007"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000007", "latest"]
    manifest = json.loads((path / "state.json").read_text())
    assert manifest["step"] == 7 and manifest["state"] == {"note": "x"}
    assert set(manifest["files"]["model.safetensors"]) == {"sha256", "bytes"}
    assert torch.equal(load_checkpoint(path).tensors["model"]["w"], torch.arange(6.0).reshape(2, 3).t())


def test_crash_during_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(3)}}, {})

    def crash(*args):
        raise OSError("simulated crash")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, {"model": {"w": torch.zeros(3)}}, {})
    monkeypatch.undo()
    assert find_latest(tmp_path) == tmp_path / "ckpt-00000001"
    assert list_checkpoints(tmp_path) == [tmp_path / "ckpt-00000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001", "latest"]
    assert torch.equal(load_checkpoint(find_latest(tmp_path)).tensors["model"]["w"], torch.ones(3))


def test_crash_before_pointer_update_keeps_previous_latest(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(3)}}, {})
    real_replace, calls = os.replace, []

    def crash_on_pointer(src, dst):
        calls.append(dst)
        if str(dst).endswith("latest"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_pointer)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, {"model": {"w": torch.zeros(3)}}, {})
    monkeypatch.undo()
    assert find_latest(tmp_path) == tmp_path / "ckpt-00000001"
    save_checkpoint(tmp_path, 3, {"model": {"w": torch.zeros(3)}}, {})  # clears the leftover pointer temp
    assert not list(tmp_path.glob(".tmp-*"))


def test_stale_temp_folder_is_never_reported(tmp_path):
    save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(3)}}, {})
    partial = tmp_path / ".tmp-ckpt-00000002-abc"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "latest").unlink()
    assert find_latest(tmp_path) == tmp_path / "ckpt-00000001"
    (tmp_path / "ckpt-00000003").mkdir()  # no state.json: not complete
    assert find_latest(tmp_path) == tmp_path / "ckpt-00000001"
    save_checkpoint(tmp_path, 2, {"model": {"w": torch.ones(3)}}, {})
    assert not partial.exists()


def test_resave_same_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 5, {"model": {"w": torch.ones(3)}}, {})
    save_checkpoint(tmp_path, 5, {"model": {"w": torch.zeros(3)}}, {})
    assert torch.equal(load_checkpoint(find_latest(tmp_path)).tensors["model"]["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000005", "latest"]


def _one(tmp_path):
    return save_checkpoint(tmp_path, 1, {"model": {"w": torch.randn(64, 64)}}, {"a": 1})


def test_truncated_file_is_reported(tmp_path):
    path = _one(tmp_path)
    file = path / "model.safetensors"
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: {size - 100} bytes, expected {size}"):
        load_checkpoint(path)


def test_flipped_byte_is_reported(tmp_path):
    path = _one(tmp_path)
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 [0-9a-f]{64}, expected [0-9a-f]{64}"):
        load_checkpoint(path)


def test_missing_file_and_bad_json_are_reported(tmp_path):
    path = _one(tmp_path)
    assert issubclass(CheckpointError, ValueError)
    (path / "state.json").write_text('{"format": 1, "step": ')
    with pytest.raises(CheckpointError, match=r"state\.json: unreadable"):
        load_checkpoint(path)
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"state\.json: missing"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path, 2, {"model": {"w": torch.ones(1)}}, {})
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(path)


def test_keep_last_prunes_older_checkpoints(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 100, {"model": {"w": torch.full((2,), float(step))}}, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000400", "ckpt-00000500"]
    assert find_latest(tmp_path).name == "ckpt-00000500"
    # resumed from an older step: the new checkpoint is kept even though newer-numbered ones exist
    save_checkpoint(tmp_path, 250, {"model": {"w": torch.zeros(2)}}, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000250", "ckpt-00000500"]
    assert find_latest(tmp_path).name == "ckpt-00000250"
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, {}, {}, keep_last=0)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, {}, {})


def test_find_latest_on_missing_directory(tmp_path):
    assert find_latest(tmp_path / "nope") is None
    assert list_checkpoints(tmp_path) == []


@pytest.mark.parametrize("pointer", ["../elsewhere/ckpt-00000001", "/tmp/ckpt-00000001", "ckpt-00000001/../..",
                                     "sub/ckpt-00000001"])
def test_latest_pointer_leaving_the_folder_is_refused(tmp_path, pointer):
    """`latest` may only name a ckpt-* folder of its own directory; a path anywhere else is refused, not read."""
    outside = tmp_path / "elsewhere"
    save_checkpoint(outside, 1, {"model": {"w": torch.ones(3)}}, {})
    folder = tmp_path / "run"
    save_checkpoint(folder, 1, {"model": {"w": torch.zeros(3)}}, {})
    (folder / "latest").write_text(pointer + "\n")
    with pytest.raises(CheckpointError, match="not a checkpoint of this folder"):
        find_latest(folder)
