"""``torchrun --nproc_per_node N -m dcae.train --phase 1 ...``: the same options as ``dcae train-ae``."""
import sys

from ..cli import main

sys.exit(main(["train-ae", *sys.argv[1:]]))
