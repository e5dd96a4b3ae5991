"""torchrun with 2 processes (gloo, CPU) trains like one process with the same global batch, and resumes."""
import json
import os
import subprocess
import sys

import pytest

# tiny-sana normalises with RMSNorm only: BatchNorm statistics would differ per process (SyncBatchNorm
# replaces BatchNorm under DDP on CUDA only).
ARGS = ["--phase", "1", "--preset", "tiny-sana-f32c8", "--batch-size", "4", "--resolution", "32",
        "--samples-per-epoch", "16", "--log-every", "1", "--image-every", "100", "--no-progress"]
ENV = {**os.environ, "DCAE_KERNELS_BACKEND": "reference", "OMP_NUM_THREADS": "1"}


def losses(out):
    return [json.loads(line)["rec"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def train(*command, steps, out, resume=False):
    done = subprocess.run([sys.executable, *command, *ARGS, "--steps", str(steps), "--out", str(out),
                           *(["--resume"] if resume else [])], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_match_one_and_resume(tmp_path):
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dcae", "train-ae"]
    train("-m", "dcae", "train-ae", steps=5, out=tmp_path / "one")
    train(*torchrun, steps=3, out=tmp_path / "two")
    assert len(list((tmp_path / "two" / "checkpoints").glob("ckpt-*"))) == 1  # rank 0 alone writes
    train(*torchrun, steps=5, out=tmp_path / "two", resume=True)  # every rank loads the step-3 checkpoint
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    assert two == pytest.approx(one, rel=1e-4)
