"""What a saved engine state must look like before any of it is loaded.

``Engine.state_dict()`` gives ``{"step", "params": {name: {buffer: tensor}}, "buckets": {key:
{buffer: tensor}}, "world", "rank", "link", "link_source", "speeds", "trial"}``.  A checkpoint
is loaded only once all of it is known to fit, so a bad file loses nothing: :func:`check_saved`
checks the structure and every tensor (floating point; finite where laid out like the
parameters) and raises ``ValueError`` naming
what is wrong; the engine then checks it against its own members (names, element counts, the
buffers each method declares) before it changes anything.
"""
from __future__ import annotations

from typing import Any

import torch


def check_saved(sd: Any, where: str = "optimizer 0") -> None:
    """Raise ``ValueError`` if ``sd`` is not a complete, finite engine state."""
    if not isinstance(sd, dict):
        raise ValueError(f"{where}: an engine state is a dict, got {type(sd).__name__}")
    missing = [k for k in ("step", "params") if k not in sd]
    if missing:
        raise ValueError(f"{where}: not an hvd_compress engine state (missing {', '.join(missing)}); "
                         "pass what compression.state_dict() returned")
    if isinstance(sd["step"], bool) or not isinstance(sd["step"], int) or sd["step"] < 0:
        raise ValueError(f"{where}: 'step' must be a non-negative integer, got {sd['step']!r}")
    for group in ("params", "buckets"):
        entries = sd.get(group, {})
        if not isinstance(entries, dict):
            raise ValueError(f"{where}: {group!r} must be a dict, got {type(entries).__name__}")
        for key, buffers in entries.items():
            if not isinstance(buffers, dict):
                raise ValueError(f"{where}: {group}[{key!r}] must be a dict of tensors")
            for name, tensor in buffers.items():
                # (per-bucket buffers may hold NaN by design: the engine checks them per method)
                check_tensor(tensor, f"{where}: {key} {name!r}", finite=group == "params")
    for key in ("world", "rank"):
        value = sd.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{where}: {key!r} must be a non-negative integer or None, got {value!r}")


def check_tensor(tensor: Any, what: str, finite: bool = True) -> None:
    """A saved buffer: a floating-point tensor, finite unless ``finite=False``."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got "
                         f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
    if finite and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{what} holds {bad} non-finite value(s) of {tensor.numel()}: the checkpoint "
                         "was written after a step that should have been rolled back, or is corrupt")
