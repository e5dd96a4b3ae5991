"""Benchmarks: Triton ops against eager, torch.compile and hand-written CUDA C++ (run on a GPU)."""
