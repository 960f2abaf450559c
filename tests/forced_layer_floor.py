"""`ream-hf` with every merged layer's held-out error made infinite, so that the layer floor falls back to the pruned
layer everywhere: tests/test_distributed.py runs it under torchrun (a module, so each rank gets the patch)."""

import dataclasses
import sys

from ream_hf.cli import main
from ream_hf.pipeline import layer

_refit_down = layer.refit_down
layer.refit_down = lambda *args: dataclasses.replace(_refit_down(*args), heldout_error_after=float("inf"))

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
