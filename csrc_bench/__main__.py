"""``python -m csrc_bench report ...``: the kernel benchmarks and their report (report.py);
``python -m csrc_bench model ...``: DC-AE ours vs diffusers end to end (model.py);
``python -m csrc_bench train ...``: a DC-AE training step, ours vs diffusers, and phase 2's memory (train.py)."""
import sys

if sys.argv[1:2] == ["model"]:
    from .model import main
    sys.exit(main(sys.argv[2:]))
elif sys.argv[1:2] == ["train"]:
    from .train import main
    sys.exit(main(sys.argv[2:]))
else:
    from .report import main
    sys.exit(main(sys.argv[1:]))
