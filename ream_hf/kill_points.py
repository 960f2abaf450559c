"""TEST-ONLY fault injection: a run kills itself with SIGKILL at a named point.

The resume and overwrite tests must stop a run at an exact moment (after the calibration embedding, while a
layer's outputs are written, between a shard part and its commit, during the final rename...), as the OOM killer
or a preemption would, and then check that `--resume` finishes it byte-identically. Setting the environment
variable `REAM_HF_TEST_KILL_AT=<point>` (or `<point>:<n>`, the n-th time the point is reached) makes the process
kill itself there. Never set it outside tests.

Cost when unset: one environment lookup per call; points sit at per-layer and per-batch steps, never per tensor.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "REAM_HF_TEST_KILL_AT"

# every point a run passes, in order (tests/test_streaming.py checks that each is passed and killed at)
POINTS = (
    "work-opened",  # the work folder exists with its state file (0 finished layers)
    "calibration-embedded",  # calibration tokens embedded, no layer run yet
    "layer-statistics",  # a token batch of an MoE layer's statistics accumulated
    "hidden-written",  # one batch of a layer's outputs (the next layer's inputs) written to the work folder (by a
    #                    background writer thread, as is the next point)
    "layer-written",  # a layer's shard part written, its commit not yet made (rank 0 under torchrun)
    "mtp-layer",  # an MTP layer loaded and fed, not yet compressed
    "output-verified",  # the new output folder written and verified, not yet moved into place
    "overwrite-moved-aside",  # --overwrite without an atomic exchange: the old output renamed aside, new not in place
    "output-renamed",  # the output folder in place; the work folder (or the replaced output) not yet removed
)

_reached: dict[str, int] = {}
_lock = threading.Lock()  # points are also passed in the background writer's threads


def kill_point(name: str) -> None:
    """SIGKILL this process if `REAM_HF_TEST_KILL_AT` names `name` (and this is its n-th passage)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    with _lock:
        _reached[name] = _reached.get(name, 0) + 1
        if _reached[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
