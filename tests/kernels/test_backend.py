"""Backend choice: DCAE_KERNELS_BACKEND=auto|triton|reference, and per-tensor dispatch."""
import importlib
from types import SimpleNamespace

import pytest
import torch

import dcae_kernels as dk
from dcae_kernels import linear_attention, norm, shortcut

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


def test_fp64_on_a_gpu_runs_the_reference():
    """run_triton: the one rule every op asks, use_triton except for fp64 on a GPU."""
    assert be.run_triton(SimpleNamespace(is_cuda=True, dtype=torch.float32))
    assert not be.run_triton(SimpleNamespace(is_cuda=True, dtype=torch.float64))
    assert be.run_triton(torch.zeros(1, dtype=torch.float64)) == be.use_triton(torch.zeros(1))


def test_every_op_asks_run_triton(monkeypatch):
    """With backend.use_triton (behind run_triton) saying no, no op launches a kernel, and each gives the
    reference's result."""
    monkeypatch.setattr(be, "use_triton", lambda x: False)
    for module in (shortcut, linear_attention, norm):
        monkeypatch.setattr(module, "wrap_triton", lambda kernel: pytest.fail("a kernel was launched"))
    x, qkv, q, w = torch.randn(1, 4, 4, 4), torch.randn(1, 24, 2, 3), torch.randn(1, 5, 2, 4), torch.ones(4)
    state, tokens_state = dk.reference.relu_linear_attention_state(qkv, 4), torch.zeros(1, 2, 5, 4)
    calls = {"space_to_channel_avg": (x, 8), "channel_to_space_dup": (x, 2), "rms_norm_2d": (x, w, w),
             "relu_linear_attention": (qkv, 4), "relu_linear_attention_state": (qkv, 4),
             "relu_linear_attention_apply": (qkv, state, 4), "relu_linear_attention_tokens": (q, q, q),
             "relu_linear_attention_tokens_state": (q, q), "relu_linear_attention_tokens_apply": (q, tokens_state)}
    for name, args in calls.items():
        torch.testing.assert_close(getattr(dk, name)(*args), getattr(dk.reference, name)(*args))
