"""torchrun with 2 processes (gloo, CPU) trains like one process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest

# tiny-sana normalises with RMSNorm only: BatchNorm statistics would differ per process (SyncBatchNorm
# replaces BatchNorm under DDP on CUDA only).
ARGS = ["--phase", "1", "--preset", "tiny-sana-f32c8", "--steps", "3", "--batch-size", "4", "--resolution", "32",
        "--samples-per-epoch", "16", "--log-every", "1", "--image-every", "100", "--no-progress"]


def losses(out):
    return [json.loads(line)["rec"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "DCAE_KERNELS_BACKEND": "reference", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "dcae", "train-ae", *ARGS, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "dcae.train", *ARGS, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-4)
    assert len(list((tmp_path / "two" / "checkpoints").glob("ckpt-*"))) == 1  # rank 0 alone writes
