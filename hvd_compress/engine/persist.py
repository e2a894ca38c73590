"""An engine's state as saved (:func:`saved_state`), and what it must look like before any of
it is loaded (:func:`check_saved`, :func:`checked_restore`).

``Engine.state_dict()`` gives ``{"step", "params": {name: {buffer: tensor}}, "buckets": {key:
{buffer: tensor}}, "world", "rank", "link", "link_source", "speeds", "trial"}``.  A checkpoint
is loaded only once all of it is known to fit, so a bad file loses nothing: :func:`check_saved`
checks the structure and every tensor (floating point; finite where laid out like the
parameters) and raises ``ValueError`` naming
what is wrong; the engine then checks it against its own members (names, element counts, the
buffers each method declares) before it changes anything.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..routes.base import Link, Speed
from .buckets import Bucket
from .state import BUCKET, MEMBER, BucketState
from .topology import Topology

if TYPE_CHECKING:
    from .engine import Engine


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


@dataclass
class Restore:
    """A checked state, ready to load: (bucket state, buffer, member offset or None for a
    per-bucket buffer, tensor), the link, codec speeds by method config, dropped buffers."""
    loads: list[tuple[BucketState, str, int | None, torch.Tensor]]
    link: Link | None
    speeds: dict[str, Speed]
    dropped: list[str]
    intra_link: Link | None = None
    topology: Topology | None = None


def bucket_key(bucket: Bucket) -> str:
    return f"{zlib.crc32(chr(0).join(m.name for m in bucket.members).encode()):08x}:{bucket.numel}"


def saved_state(engine: "Engine") -> dict:
    """An engine's state: per member its buffers (views of the committed flat buffers laid out
    like the bucket: residual, momentum), the committed step, the link, codec speeds and trial
    verdict the plan used, and per bucket the buffers laid out otherwise (the two-phase owner's
    residual, PowerSGD's Q), valid for the same bucket layout only."""
    params: dict[str, dict[str, torch.Tensor]] = {}
    buckets: dict[str, dict[str, torch.Tensor]] = {}
    for bucket, state in zip(engine.buckets, engine.states):
        for name, buf in state.buffers.items():
            if bucket.method.state_names().get(name) != MEMBER:
                buckets.setdefault(bucket_key(bucket), {})[name] = buf.committed.clone()
                continue
            for m, offset in zip(bucket.members, bucket.offsets):
                params.setdefault(m.name, {})[name] = buf.committed[offset:offset + m.numel].clone().view(m.shape)
    speeds = {b.method.config(): vars(engine.speeds[id(b.method)]).copy()
              for b in engine.buckets if id(b.method) in engine.speeds}
    return {"step": engine.step, "params": params, "buckets": buckets,
            "world": engine.plan.world if engine.plan else None,
            "rank": engine.plan.rank if engine.plan else None,
            "link": None if engine.link is None else vars(engine.link).copy(),
            "intra_link": None if engine.intra_link is None else vars(engine.intra_link).copy(),
            "topology": None if engine.topology is None else [list(h) for h in engine.topology.hosts],
            "link_source": engine.link_source, "speeds": speeds, "trial": engine._trial.state()}


def checked_restore(engine: "Engine", sd: dict, strict: bool = True) -> "Restore":
    """What loading ``sd`` would do, checked in full; changes nothing.

    A ``ValueError`` says what is wrong:
    the structure and finiteness (:func:`~hvd_compress.engine.persist.check_saved`), that
    every saved parameter is one of this engine's with the same element count, and that
    every buffer is one its method keeps, where it keeps it (``Method.state_names``).  ``strict=False`` drops
    the buffers a method does not keep instead of refusing them (converting a checkpoint
    to other settings); the returned list names what was dropped."""

    check_saved(sd)
    members = {m.name: m for m in engine.members}
    unknown = sorted(set(sd["params"]) - set(members))
    if unknown:
        raise ValueError(f"state has parameters this optimizer does not: {unknown[:5]}")
    dropped: list[str] = []

    def kept(name: str, method: Any, owner: str, layout: str) -> bool:
        if method.state_names().get(name) == layout:
            return True
        if strict:
            raise ValueError(f"{owner}: the checkpoint has a {name!r} buffer, which {method!r} does not "
                             "keep (another method or setting saved it); load_state_dict(..., "
                             "strict=False) drops it")
        dropped.append(f"{owner}: {name}")
        return False
    loads = []         # (state, name, offset or None, tensor): applied once all are checked
    for bucket, state in zip(engine.buckets, engine.states):
        for m, offset in zip(bucket.members, bucket.offsets):
            for name, tensor in sd["params"].get(m.name, {}).items():
                if not kept(name, m.method, m.name, MEMBER):
                    continue
                if tensor.numel() != m.numel:
                    raise ValueError(f"{m.name}: state {name!r} has {tensor.numel()} elements, "
                                     f"the parameter {m.numel}")
                loads.append((state, name, offset, tensor))
        for name, saved in sd.get("buckets", {}).get(bucket_key(bucket), {}).items():
            if kept(name, bucket.method, f"bucket {bucket.index}", BUCKET):
                check_tensor(saved, f"bucket {bucket.index} {name!r}",
                             finite=name not in bucket.method.nan_buffers)
                loads.append((state, name, None, saved))
    try:
        link, intra = (Link(**sd[k]) if sd.get(k) is not None else None for k in ("link", "intra_link"))
        speeds = {k: Speed(**v) for k, v in sd.get("speeds", {}).items()}
        topology = Topology(tuple(tuple(int(r) for r in h) for h in sd["topology"])) \
            if sd.get("topology") is not None else None
    except (TypeError, ValueError) as e:
        raise ValueError(f"saved link, topology or codec speeds do not fit: {e}") from None
    return Restore(loads, link, speeds, dropped, intra, topology)
