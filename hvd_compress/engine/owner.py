"""What a framework adaptor's user-facing object owns: the engines it built (one per optimizer
or model it serves, numbered in first-use order), their checkpoint, byte counts and plans.

:class:`~hvd_compress.horovod.compressor.Compressor` (Horovod) and
:class:`~hvd_compress.ddp.State` (PyTorch DDP) are :class:`EngineSet` subclasses: they say how
an engine is built and where this rank is; the checkpoint format, its checks and the
statistics are the same for both.
"""
from __future__ import annotations

import re
import warnings
from typing import Any

from .engine import Engine, Timings
from .persist import check_saved

#: the format tag of :meth:`EngineSet.state_dict`
STATE_FORMAT = "hvd_compress/1"


class EngineSet:
    """Engines in first-use order, a checkpoint loaded before they exist, and what users call
    on them.  Subclasses append ``(key, engine)`` pairs to ``_engines`` through :meth:`_adopt`
    (an entry that is not an :class:`Engine` stands for one that could not be built)."""

    #: the functions that save one file for every rank, if the framework has them (named in the
    #: warning about a checkpoint of another rank)
    _gather_hint = ""

    def __init__(self) -> None:
        self._engines: list[tuple[Any, Any]] = []
        self._loaded: list[dict] | None = None
        self._strict = True

    def _rank_and_size(self) -> tuple[int, int] | None:
        """(rank, world size) of this process, None when not known (not initialized)."""
        return None

    def _adopt(self, key: Any, engine: Any) -> Any:
        """Append a newly built engine, loading its part of a checkpoint loaded before it
        existed; raises ``ValueError`` (nothing appended) when that part does not fit."""
        ordinal = len(self._engines)
        if self._loaded is not None and ordinal < len(self._loaded) and isinstance(engine, Engine):
            engine.load_state_dict(self._loaded[ordinal], self._strict)
        self._engines.append((key, engine))
        return engine

    def _live_engines(self) -> list[Engine]:
        return [e for _, e in self._engines if isinstance(e, Engine)]

    def stats(self) -> dict[str, int]:
        """Since creation, over every optimizer served: ``bytes_sent`` (this rank's share of
        every collective: its payloads, or the tensor it allreduces), ``bytes_received``
        (payloads of other ranks gathered here, or what an allreduce delivers), ``bytes_dense``
        (what fp32 gradients would have cost), ``collectives``, ``steps``, ``skipped_steps``
        (steps with a non-finite gradient on some rank, rolled back)."""
        total: dict[str, int] = {}
        for engine in self._live_engines():
            engine.finalize()      # count the last step once it is over
            for key, value in engine.stats.as_dict().items():
                total[key] = total.get(key, 0) + value
        return total or {"bytes_sent": 0, "bytes_received": 0, "bytes_dense": 0, "collectives": 0,
                         "steps": 0, "skipped_steps": 0}

    def timings(self) -> dict[str, float]:
        """Seconds this rank spent since creation in each part of the engines' work, over every
        optimizer served: ``hook``, ``encode``, ``wait``, ``decode`` (see
        :class:`~hvd_compress.engine.engine.Timings`); the bandwidth benchmark's step breakdown."""
        total = dict.fromkeys(Timings.PARTS, 0.0)
        for engine in self._live_engines():
            for part, seconds in engine.timings.seconds.items():
                total[part] += seconds
        return total

    def timeline(self) -> list[tuple[float, str, str]]:
        """The last step's events of every engine, in time order: (``time.perf_counter()``,
        event, engine and bucket), see :class:`~hvd_compress.engine.engine.Timings`."""
        return sorted((t, what, f"{i}.{b}" if b >= 0 else str(i))
                      for i, engine in enumerate(self._live_engines()) for t, what, b in engine.timings.events)

    @property
    def settled(self) -> bool:
        """True once every engine's plan is final: its link measured (or declared) and its
        trial over.  Benchmarks warm up until then."""
        return all(e._trial.settled(e) for e in self._live_engines()) and bool(self._live_engines())

    def plan(self) -> str:
        """Every engine's plan: buckets, members, routes, predicted bytes and times."""
        plans = [str(e.plan) for e in self._live_engines() if e.plan is not None]
        return "\n\n".join(plans) if plans else "(no plan yet: it is made at the first step)"

    def state_dict(self) -> dict:
        """This rank's compressor state, by PyTorch's conventions (``torch.save``-able): per
        optimizer (in first-use order) the parameters' buffers by name, the committed step and
        the link the plan used.  Each rank saves its own (see README, "Checkpoints")."""
        engines = [e.state_dict() for e in self._live_engines()]
        if self._loaded is not None and len(engines) < len(self._loaded):
            engines += self._loaded[len(engines):]   # loaded but not used yet: keep it
        return {"format": STATE_FORMAT, "config": self.config(), "optimizers": engines}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore :meth:`state_dict`, checked in full before anything changes (a bad or foreign
        checkpoint raises ``ValueError`` saying what is wrong and leaves the state as it was).

        ``strict=True`` (the default) requires the same method and settings (the bucket cap and
        link may differ: buffers are kept per parameter); ``strict=False`` converts a checkpoint
        of other settings explicitly: the buffers this compressor keeps are loaded, the rest are
        dropped with a warning.  A checkpoint saved by another rank, or by a world of another
        size, loads with a warning (error feedback residuals are each rank's own unsent
        gradient).  Engines not built yet (the stock optimizer builds them at the first
        backward) get theirs then, checked against their parameters; a mismatch there fails
        that backward pass on every rank."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} compressor state (a dict with format={STATE_FORMAT!r}, "
                             "as compression.state_dict() returns)")
        engines = state.get("optimizers")
        if not isinstance(engines, list):
            raise ValueError("compressor state: 'optimizers' must be a list of engine states")
        for i, saved in enumerate(engines):
            check_saved(saved, f"optimizers[{i}]")
        saved_config = state.get("config")
        if strict and saved_config is not None and _settings(saved_config) != _settings(self.config()):
            raise ValueError(f"the checkpoint was saved by {saved_config}, this compressor is {self.config()}: "
                             "load_state_dict(..., strict=False) loads the buffers both keep and drops the rest")
        self._warn_owner(engines)
        dropped = []
        built = [(e, saved) for (_, e), saved in zip(self._engines, engines) if isinstance(e, Engine)]
        for engine, saved in built:          # check all, then load all
            engine.check_state(saved, strict)
        for (_, engine), saved in zip(self._engines, engines):
            if isinstance(engine, Engine):
                dropped += engine.load_state_dict(saved, strict)
        if dropped:
            warnings.warn(f"hvd_compress: dropped checkpoint buffers this compressor does not keep: "
                          f"{', '.join(dropped[:8])}" + (" ..." if len(dropped) > 8 else ""))
        self._loaded, self._strict = list(engines), strict

    def config(self) -> str:
        """Deterministic description of the settings (compared across ranks via the plan)."""
        return repr(self)

    def _warn_owner(self, engines: list[dict]) -> None:
        """Warn when a checkpoint was saved by another rank or world than this one (each rank's
        residuals are its own unsent gradient)."""
        where = self._rank_and_size()
        if where is None:
            return
        rank, size = where
        owners = {(e.get("world"), e.get("rank")) for e in engines if e.get("rank") is not None}
        for world, saved_rank in owners:
            if world == size and saved_rank != rank:
                warnings.warn(f"hvd_compress: this compressor state was saved by rank {saved_rank} and is "
                              f"loaded on rank {rank}: its error-feedback residuals are rank {saved_rank}'s "
                              "unsent gradient; save and load one file per rank"
                              + (f" (or use {self._gather_hint})" if self._gather_hint else ""))
            elif world != size:
                warnings.warn(f"hvd_compress: this compressor state was saved by a world of {world} ranks and "
                              f"is loaded into {size}: per-parameter buffers are kept, two-phase server "
                              "residuals are dropped")


def _settings(config: str) -> str:
    """A compressor's settings less the bucket cap, the links and the hierarchy setting, which
    a checkpoint may change (its buffers are kept per parameter)."""
    return re.sub(r", (bucket_cap_mb=[^,)]*|hierarchy=[^,)]*|(intra_)?link=(Link\([^)]*\)|'[^']*'))", "",
                  config)
