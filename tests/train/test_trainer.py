"""The DC-AE trainer: what each phase freezes, exact resume, Ctrl-C, corrupted checkpoints, run records."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from dcae import DCAE
from dcae.cli import main
from dcae.train.autoencoder import AutoencoderOptions, AutoencoderTask
from dcae.train.checkpoint import find_latest
from dcae.train.trainer import INTERRUPTED, Trainer

from .runs import assert_same_checkpoints, ctrl_c_after, metrics_rows

PRESET = "tiny-f32c8"
FAST = dict(batch_size=2, resolution=64, samples_per_epoch=16, log_every=1, image_every=100, save_every=100,
            progress=False)


def trainer_for(out, **kw) -> Trainer:
    return Trainer(AutoencoderTask(AutoencoderOptions(out=out, **{**FAST, **kw})))


def run(out, **kw) -> Trainer:
    trainer = trainer_for(out, **kw)
    assert trainer.run() == 0
    return trainer


def tensors_in(model, parts) -> set[str]:
    """State-dict names of the parameters and buffers inside the named parts of the model."""
    ids = {id(t) for m in model.parts(parts).values() for t in [*m.parameters(), *m.buffers()]}
    return {name for name, t in [*model.named_parameters(), *model.named_buffers()] if id(t) in ids}


def final_weights(out):
    return load_file(find_latest(out / "checkpoints") / "model.safetensors")


@pytest.fixture(scope="module")
def phase1(tmp_path_factory):
    out = tmp_path_factory.mktemp("phase1")
    run(out, phase=1, preset=PRESET, steps=2)
    return out


def test_phase1_records_and_exports(phase1):
    record = json.loads((phase1 / "run.json").read_text())
    assert record["trainable_modules"] == {"(whole model)": record["trainable_parameters"]}
    assert record["frozen_parameters"] == 0 and record["lpips_enabled"] is False
    assert "LPIPS disabled" in record["lpips"]
    evals = json.loads((phase1 / "eval.json").read_text())
    assert set(evals) == {"before", "after_phase_1"}
    steps = [json.loads(line)["step"] for line in (phase1 / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (phase1 / "loss.png").stat().st_size and (phase1 / "samples" / "step-00000002.png").stat().st_size
    model = DCAE.from_pretrained(phase1 / "model")
    assert model.scaling_factor != 1.0  # estimated at the end of phase 1 and stored in the config
    torch.testing.assert_close(model.state_dict(), final_weights(phase1), rtol=0, atol=0)


@pytest.mark.parametrize("phase, checkpointing", [(2, False), (2, True), (3, False)])
def test_frozen_parameters_stay_bit_identical(phase1, tmp_path, phase, checkpointing):
    trainer = run(tmp_path, phase=phase, init=phase1, steps=2, grad_checkpointing=checkpointing)
    before, after = load_file(phase1 / "model" / "model.safetensors"), final_weights(tmp_path)
    in_parts = tensors_in(trainer.model, list(trainer.trainable))
    trained = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained == {name for name, _ in trainer.model.named_parameters() if name in in_parts}
    for name, value in before.items():
        if name in trained:
            assert not torch.equal(value, after[name]), f"{name} should have trained"
        elif name not in in_parts:
            assert torch.equal(value, after[name]), f"frozen {name} changed"
    n_trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert n_trained == json.loads((tmp_path / "run.json").read_text())["trainable_parameters"]
    assert sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"]) == n_trained
    assert all(p.grad is None for p in trainer.model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("phase", [1, 3])
def test_resume_continues_exactly(tmp_path, monkeypatch, phase1, phase):
    start = dict(preset=PRESET) if phase == 1 else dict(init=phase1)
    opts = dict(phase=phase, steps=6, ema_decay=0.9, schedule="cosine", warmup_steps=2, **start)
    straight = final_weights(run(tmp_path / "straight", **opts).out)

    with ctrl_c_after(monkeypatch, 3):
        assert trainer_for(tmp_path / "split", **opts).run() == INTERRUPTED
    assert find_latest(tmp_path / "split" / "checkpoints").name == "ckpt-00000003"
    resumed = final_weights(run(tmp_path / "split", resume=True, **opts).out)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    groups = ["ema"] + (["discriminator"] if phase == 3 else [])
    assert_same_checkpoints(tmp_path / "straight", tmp_path / "split", groups)


def test_corrupted_checkpoint_is_refused(phase1, tmp_path, capsys):
    out = tmp_path / "run"
    run(out, phase=2, init=phase1, steps=1)
    weights = find_latest(out / "checkpoints") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    args = ["train-ae", "--phase", "2", "--init", str(phase1), "--out", str(out), "--resume", "--steps", "2",
            "--batch-size", "2", "--resolution", "64", "--no-progress"]
    assert main(args) == 2
    assert "corrupted" in capsys.readouterr().err
    weights.write_bytes(bytes(data[: len(data) // 3]))
    assert main(args) == 2
    assert "truncated" in capsys.readouterr().err


def test_refuses_to_overwrite_and_to_resume_nothing(phase1, tmp_path, capsys):
    common = ["--phase", "1", "--preset", PRESET, "--steps", "1", "--batch-size", "2", "--resolution", "64"]
    assert main(["train-ae", *common, "--out", str(phase1)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train-ae", *common, "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train-ae", *common[:-1], "48", "--out", str(tmp_path / "new")]) == 2
    assert "multiple of the compression ratio 32" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "DCAE_KERNELS_BACKEND": "reference"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcae", "train-ae", "--phase", "1", "--preset", PRESET, "--out", str(out),
         "--steps", "100000", "--batch-size", "2", "--resolution", "64", "--log-every", "1", "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == INTERRUPTED, output
    latest = find_latest(out / "checkpoints")
    step = json.loads((latest / "state.json").read_text())["step"]
    assert step >= 1 and f"interrupted at step {step}" in output


@pytest.mark.gpu
def test_phases_on_cuda_with_triton_ops(tmp_path, monkeypatch):
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "triton")  # bf16 autocast through the Triton ops
    first = run(tmp_path / "p1", phase=1, preset=PRESET, steps=3, device="cuda")
    assert first.device.type == "cuda"
    third = run(tmp_path / "p3", phase=3, init=tmp_path / "p1", steps=2, device="cuda")
    evals = json.loads((tmp_path / "p3" / "eval.json").read_text())
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in evals.values())
    assert third.step == 2


def records(out):
    """metrics.jsonl without the timing column, and eval.json."""
    return metrics_rows(out), json.loads((out / "eval.json").read_text())


def test_resumed_records_equal_a_straight_runs(tmp_path, monkeypatch):
    """A crash after step 3 (last checkpoint at step 2): the resumed run cuts metrics.jsonl back to step 2, and
    eval.json keeps its "before" entry written at the start."""
    opts = dict(phase=1, preset=PRESET, steps=5, save_every=2)
    run(tmp_path / "straight", **opts)
    step = Trainer.train_step

    def crash_in_step_four(self, batches):
        if self.step == 3:
            raise RuntimeError("simulated crash")
        return step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", crash_in_step_four)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer_for(tmp_path / "split", **opts).run()
    assert [row["step"] for row in records(tmp_path / "split")[0]] == [1, 2, 3]
    assert set(records(tmp_path / "split")[1]) == {"before"}
    monkeypatch.setattr(Trainer, "train_step", step)
    run(tmp_path / "split", resume=True, **opts)
    assert records(tmp_path / "split") == records(tmp_path / "straight")


def test_one_writer_per_run_folder(tmp_path, capsys):
    first = trainer_for(tmp_path / "run", phase=1, preset=PRESET, steps=1)
    with pytest.raises(ValueError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
        trainer_for(tmp_path / "run", phase=1, preset=PRESET, steps=1, resume=True)
    args = ["train-ae", "--phase", "1", "--preset", PRESET, "--out", str(tmp_path / "run"), "--steps", "1",
            "--batch-size", "2", "--resolution", "64", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err and len(err.strip().splitlines()) == 1
    assert first.run() == 0  # the lock is released when run() returns
    assert main([*args, "--resume", "--steps", "2"]) == 0


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    """kill -9 leaves the lock file; the kernel released its lock, so the next run takes it."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dcae.train.runfolder import RunFolder; "
                               f"RunFolder({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ValueError, match=f"pid {holder.pid}"):
        trainer_for(out, phase=1, preset=PRESET, steps=1)
    holder.kill()
    holder.wait()
    assert (out / ".lock").read_text().strip() == str(holder.pid)
    assert run(out, phase=1, preset=PRESET, steps=1).step == 1
