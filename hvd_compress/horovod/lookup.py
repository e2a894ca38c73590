"""Which parameter Horovod is compressing: the one place in the package that reads Horovod's
frames, behind a check of Horovod's version."""
from __future__ import annotations

import sys
from typing import Any

import torch

#: the Horovod releases whose DistributedOptimizer calls compress() as calling_optimizer reads it
HOROVOD_TESTED = ("0.28.",)


def horovod_version_note() -> str:
    """Empty on a tested Horovod; else a sentence naming the version (checked once, warned once)."""
    import horovod
    version = getattr(horovod, "__version__", "unknown")
    if version.startswith(HOROVOD_TESTED):
        return ""
    return (f"Horovod {version} is not one hvd_compress was tested with ({', '.join(v + 'x' for v in HOROVOD_TESTED)}): "
            "it finds the parameter being compressed in DistributedOptimizer's own frames, which "
            "another release may lay out differently")


def calling_optimizer() -> tuple[Any, torch.Tensor]:
    """(optimizer, parameter) whose gradient Horovod is compressing.

    Horovod 0.28.1 calls ``compress(p.grad)`` from ``_allreduce_grad_async`` or from a
    comprehension in ``_grouped_allreduce_grad_async``; both bind the parameter as ``p``, with
    the optimizer (holding ``_parameter_names``) as ``self`` at most one frame up.  The only
    place in the package that reads Horovod's frames; on another release (see
    :data:`HOROVOD_TESTED`) it is tried as well, after a warning, and fails with the version
    named when the layout differs.
    """
    frame = sys._getframe(2)
    param = None
    for _ in range(4):
        if frame is None:
            break
        local = frame.f_locals
        if param is None and isinstance(local.get("p"), torch.Tensor):
            param = local["p"]
        names = getattr(local.get("self"), "_parameter_names", None)
        if param is not None and isinstance(names, dict) and param in names:
            return local["self"], param
        frame = frame.f_back
    note = horovod_version_note()
    raise RuntimeError(
        "hvd_compress compressors must be called by horovod.torch.DistributedOptimizer "
        "(compression=...) or hvd_compress.DistributedOptimizer; could not find the parameter "
        "being compressed in the caller" + (f" ({note})" if note else ""))
