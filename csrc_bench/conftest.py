"""pytest set-up of the benchmark suites: without a CUDA GPU every benchmark skips (`common.requires_gpu`); the
summary then says why in one line instead of a bare count of skips."""
from csrc_bench.common import NO_GPU_REASON


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if NO_GPU_REASON in str(r.longrepr)]
    if skipped:
        n = len(skipped)
        terminalreporter.write_line(f"{NO_GPU_REASON}: {n} benchmark{'s' * (n != 1)} skipped (on a GPU: python -m "
                                    "csrc_bench report; on CPU, tiny smoke runs: make bench)")
