"""Backend choice: DCAE_KERNELS_BACKEND=auto|triton|reference, and per-tensor dispatch."""
import importlib

import pytest
import torch

import dcae_kernels as dk
from dcae_kernels import shortcut

be = importlib.import_module("dcae_kernels.backend")  # the package attribute `backend` is the function


def test_auto_picks_triton_where_it_runs():
    assert dk.backend() == "triton"  # CUDA present, or TRITON_INTERPRET=1 set by conftest


def test_reference_backend_runs_no_kernel(monkeypatch):
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "reference")
    monkeypatch.setattr(shortcut, "_launch", lambda *a, **k: pytest.fail("kernel launched"))
    assert dk.backend() == "reference"
    x = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(dk.space_to_channel_avg(x, 8), dk.reference.space_to_channel_avg(x, 8))


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="DCAE_KERNELS_BACKEND must be one of"):
        dk.backend()


def test_triton_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "triton")
    monkeypatch.setattr(be, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="Triton cannot run here"):
        dk.backend()
    with pytest.raises(RuntimeError, match="Triton cannot run here"):
        dk.space_to_channel_avg(torch.randn(1, 4, 4, 4), 8)


def test_auto_without_triton_uses_reference(monkeypatch):
    monkeypatch.setattr(be, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dk.backend() == "reference"
    monkeypatch.setattr(be, "HAS_TRITON", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dk.backend() == "reference"


def test_cpu_tensor_on_a_gpu_machine(monkeypatch):
    """auto: a CPU tensor without the interpreter runs the reference; an explicit triton request refuses it."""
    monkeypatch.setattr(be, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    x = torch.randn(1, 4, 4, 4)
    assert not be.use_triton(x)
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="input is on cpu"):
        be.use_triton(x)
