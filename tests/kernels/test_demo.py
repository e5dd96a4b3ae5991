"""``python -m dcae_kernels.demo``: the Triton kernels (the interpreter, here) against the reference, every op."""
import os
import subprocess
import sys

import dcae_kernels as dk
from dcae_kernels import demo

OPS = sorted(set(dk.__all__) - {"backend", "nn", "reference", "patch", "patch_report", "unpatch"})


def run_demo(*args):
    """Run the demo as a user would: a fresh process, TRITON_INTERPRET not set (it sets it itself on CPU)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DCAE_KERNELS_BACKEND")}
    return subprocess.run([sys.executable, "-m", "dcae_kernels.demo", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def test_every_public_op_has_a_case():
    assert sorted({case.op for case in demo.cases(4, 2, demo.DTYPES["fp32"])}) == OPS


def test_demo_runs_triton_against_the_reference():
    done = run_demo("--size", "4", "--channels", "4")
    assert done.returncode == 0, done.stdout + done.stderr
    header = done.stdout.splitlines()[0]
    assert "Triton kernels" in header and "against the plain-torch reference" in header
    if not demo.CUDA:
        assert "interpreter" in header and "triton (interpreter) ms" in done.stdout
    assert "reference ms" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.split()[:1] and line.split()[0] in OPS]
    assert {row.split()[0] for row in rows} == set(OPS)  # a case name starts with its op's name
    assert all(" yes " in row for row in rows), done.stdout
    assert f"all {len(OPS)} ops agree with the reference" in done.stdout


def test_demo_refuses_to_compare_the_reference_with_itself(monkeypatch, capsys):
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "reference")
    assert demo.main(["--size", "4", "--channels", "4"]) == 2
    assert "DCAE_KERNELS_BACKEND=reference" in capsys.readouterr().err
