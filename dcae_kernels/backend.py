"""Which implementation runs the ops: Triton kernels or the plain-torch reference.

``DCAE_KERNELS_BACKEND`` = ``auto`` (default) | ``triton`` | ``reference``.
``auto`` runs Triton where it can run (CUDA tensors, or any tensor when ``TRITON_INTERPRET=1`` was set
before import) and the reference elsewhere. ``triton`` refuses to run where Triton cannot, with an error.
"""
import importlib.util
import os

import torch

CHOICES = ("auto", "triton", "reference")

HAS_TRITON = importlib.util.find_spec("triton") is not None
# Triton decides interpreted vs compiled when a kernel is decorated, i.e. when this package is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def requested() -> str:
    """The backend asked for through DCAE_KERNELS_BACKEND (validated)."""
    choice = os.environ.get("DCAE_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"DCAE_KERNELS_BACKEND must be one of {CHOICES}, got {choice!r}")
    return choice


def triton_blocker() -> str | None:
    """Why Triton cannot run on this machine, or None when it can."""
    if not HAS_TRITON:
        return "the triton package is not installed"
    if not (torch.cuda.is_available() or INTERPRET):
        return "there is no CUDA device and TRITON_INTERPRET=1 was not set before dcae_kernels was imported"
    return None


def backend() -> str:
    """The active backend, "triton" or "reference"."""
    choice = requested()
    blocker = triton_blocker()
    if choice == "triton" and blocker:
        raise RuntimeError(f"DCAE_KERNELS_BACKEND=triton, but Triton cannot run here: {blocker}")
    if choice == "reference" or blocker:
        return "reference"
    return "triton"


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on tensor ``x`` runs the Triton kernel (True) or the reference (False)."""
    if backend() == "reference":
        return False
    if x.is_cuda or INTERPRET:
        return True
    if requested() == "triton":
        raise RuntimeError(
            f"DCAE_KERNELS_BACKEND=triton, but the input is on {x.device}: the Triton kernels need a CUDA "
            "tensor (or TRITON_INTERPRET=1 set before import)"
        )
    return False


def run_triton(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` runs its Triton kernels, the one rule for every op: as `use_triton`, except fp64 on
    a GPU, which runs the reference (cuBLAS and torch do fp64 well; fp64 linear-attention states of head_dim 128
    overflow shared memory). fp64 kernels run under the interpreter, for gradcheck."""
    return use_triton(x) and not (x.is_cuda and x.dtype == torch.float64)


def reference_double_backward(forward, grad: torch.Tensor, primals: list[torch.Tensor],
                              grad_grads: tuple) -> tuple:
    """The autograd formula of a Triton backward op ``vjp(forward at primals)(grad)``, by autograd through
    ``forward``, the op's plain-torch reference: the gradients of ``sum_i <grad_grads[i], first-order gradient of
    primals[i]>`` w.r.t. grad and each primal (None where there is none). Second derivatives thus run the
    reference; these results are not differentiable again (no third derivatives)."""
    with torch.enable_grad():
        grad, *primals = (t.detach().requires_grad_(True) for t in (grad, *primals))
        first = torch.autograd.grad(forward(*primals), primals, grad, create_graph=True)
        pairs = [(g, gg) for g, gg in zip(first, grad_grads) if gg is not None and g.requires_grad]
        if not pairs:
            return (None,) * (1 + len(primals))
        return torch.autograd.grad([g for g, _ in pairs], [grad, *primals], [gg for _, gg in pairs],
                                   allow_unused=True)
