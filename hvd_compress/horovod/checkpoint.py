"""Checkpoints of compressor state, which is per rank (each worker's residuals, DGC momentum).

Two recipes (README, "Checkpoints"):

* each rank saves ``compression.state_dict()`` (or ``optimizer.state_dict()`` of
  ``hvd_compress.DistributedOptimizer``, which holds it) to a file of its own;
* or rank 0 writes one file: :func:`gather_state` collects every rank's state there, and
  :func:`scatter_state` hands each rank its own back on load.

Resume on the same number of ranks to continue bit for bit; on another number, each rank that
has a saved state gets it (its residuals are still its unsent gradient) and the others start
empty; two-phase server residuals, which belong to a world size, are dropped.
"""
from __future__ import annotations

import warnings


def gather_state(compression) -> list[dict] | None:
    """Every rank's ``compression.state_dict()``, in rank order, on rank 0 (None elsewhere).
    A collective: call it on every rank."""
    import horovod.torch as hvd
    states = hvd.allgather_object(compression.state_dict(), name="hvdc.checkpoint.gather")
    return states if hvd.rank() == 0 else None


def scatter_state(compression, states: list[dict] | None) -> None:
    """Load rank r's entry of ``states`` (given on rank 0, ignored elsewhere) into every rank's
    ``compression``.  A collective: call it on every rank."""
    import horovod.torch as hvd
    states = hvd.broadcast_object(states, root_rank=0, name="hvdc.checkpoint.scatter")
    if len(states) != hvd.size():
        warnings.warn(f"hvd_compress: compressor state saved by {len(states)} ranks, loading into "
                      f"{hvd.size()}: ranks without a saved state start empty")
    if hvd.rank() < len(states):
        compression.load_state_dict(states[hvd.rank()])
