"""Where the kernel tests run: CUDA when present, else the CPU under Triton's interpreter."""
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# The interpreter touches fake tensors' data, so on CPU only these two opcheck utils can run.
OPCHECK_UTILS = (("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
                 if CUDA else ("test_schema", "test_autograd_registration"))
