"""Test set-up: Triton runs under its interpreter when there is no CUDA device; `gpu` tests skip there."""
import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# The interpreter is ~1e4x slower than a GPU: no deadline, few examples, small shapes in the strategies.
settings.register_profile("dcae", deadline=None, max_examples=25, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("dcae")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel does not write fails its test."""
    from dcae_kernels import outputs
    monkeypatch.setattr(outputs, "POISON", True)


@pytest.fixture(scope="module", autouse=True)
def reference_ops_outside_kernel_tests(request):
    """Model, trainer and CLI tests run the plain-torch reference ops (the kernels have their own tests under
    tests/kernels); a test that wants the Triton path sets DCAE_KERNELS_BACKEND=auto itself. Module scope, so
    that module-scoped fixtures which build and run models see the setting too."""
    if "kernels" in request.path.parts or "bench" in request.path.parts:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DCAE_KERNELS_BACKEND", "reference")
        yield


def pytest_terminal_summary(terminalreporter, config):
    """``pytest --benchmark-only`` here skips every test, none being a benchmark: say where the benchmarks are."""
    if config.getoption("benchmark_only", default=False):
        terminalreporter.write_line("the benchmarks are in csrc_bench/, not tests/, and need a CUDA GPU: "
                                    "pytest csrc_bench --benchmark-only, or python -m csrc_bench report "
                                    "(make bench; on a CPU it runs tiny smoke runs instead)")
