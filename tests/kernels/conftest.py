"""Fixtures shared by the kernel tests."""
import pytest

from .sm90 import compile_sm90


@pytest.fixture(scope="module")
def sm90(request):
    """The test module's ``SM90`` specs (name -> spec) compiled for sm_90 once: name -> result."""
    pytest.importorskip("triton.backends.nvidia")
    specs = request.module.SM90
    return dict(zip(specs, compile_sm90(list(specs.values()))))
