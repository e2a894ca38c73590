"""Elastic Horovod: compressor state in ``hvd.elastic.TorchState``.

Importing this module registers a state handler for hvd_compress compressors with Horovod's
``TorchState``, so the recipe is one keyword::

    import hvd_compress.horovod.elastic  # noqa: F401 (registers the handler)
    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, compression=compression)

* ``state.commit()`` saves a copy of this rank's compressor state, ``state.restore()`` (after a
  failed step) puts it back: the step in flight is rolled back as the model and optimizer are.
* After a reset (a worker removed or added), ``state.sync()`` makes every rank take rank 0's
  committed step counter (the Philox keys and DGC's warm-up position stay aligned) and re-plans
  for the new world at the next step; each rank keeps its own residuals and momentum (they are
  its unsent gradient), a new worker starts empty, and two-phase server residuals, which belong
  to a world size, are dropped.
* The config check needs nothing special: every step's header carries the plan digest, so a
  new worker and the survivors are checked against each other at their first common step.

``hvd_compress.DistributedOptimizer`` keeps the compressor state in ``optimizer.state_dict()``,
so ``TorchState(optimizer=...)`` alone already saves and restores it; registering the
compressor as well adds the step agreement on reset.
"""
from __future__ import annotations

import copy

from horovod.torch.elastic.state import StateHandler, get_handler_registry, set_handler_registry

from .compressor import Compressor


class CompressionStateHandler(StateHandler):
    """Saves, restores and re-synchronises a compressor's state for ``TorchState``."""

    def __init__(self, compression: Compressor) -> None:
        super().__init__(compression)
        self._saved = copy.deepcopy(compression.state_dict())

    def save(self) -> None:
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        self.value.load_state_dict(copy.deepcopy(self._saved))

    def sync(self) -> None:
        self.value.elastic_sync()


def register() -> None:
    """Put the handler first in Horovod's registry (idempotent)."""
    registry = [entry for entry in get_handler_registry() if entry[1] is not CompressionStateHandler]
    set_handler_registry([(Compressor, CompressionStateHandler)] + registry)


register()
