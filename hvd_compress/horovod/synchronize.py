"""``optimizer.synchronize()`` of a Horovod DistributedOptimizer whose compressor runs an engine:
the engines' step is closed and their configuration check complete before Horovod waits on its
own handles (see :func:`check_before_synchronize`)."""
from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

#: how long the adaptor sleeps between polls of the step header (doubling from the first)
_POLL_S = (5e-5, 1e-3)


def check_timeout() -> float:
    """Seconds a configuration check may lag behind every gradient's allreduce before this rank
    concludes that another rank does not run the compressor (``HVD_COMPRESS_CHECK_TIMEOUT_S``;
    60, Horovod's own stall warning)."""
    return float(os.environ.get("HVD_COMPRESS_CHECK_TIMEOUT_S", "60"))


def check_before_synchronize(optimizer, engine: Any, compressor: str) -> None:
    """Make ``optimizer.synchronize()`` finish ``engine``'s step before Horovod waits on its own
    handles, so the configuration check runs first: a parameter that only one rank has is
    allreduced by Horovod under its name, and waiting on that handle would never return.

    The wrapper first hands Horovod's missing gradients over (what Horovod 0.28.1's
    ``synchronize()`` does first; it then finds none missing), closes the engines' step and
    waits for their headers (:func:`await_headers`), then lets Horovod synchronize; a shape
    mismatch Horovod reports against this rank's 1-element placeholder means another rank sent
    a full gradient (``Compression.none``), and the error says so."""
    engines = getattr(optimizer, "_hvdc_engines", None)
    if engines is not None:
        engines.append(engine)
        return
    optimizer._hvdc_engines = engines = [engine]
    horovod_synchronize = optimizer.synchronize

    def synchronize():
        if optimizer.process_set.included():
            completed = set()
            for key in optimizer._handles:
                completed.update(key) if isinstance(key, tuple) else completed.add(key)
            for p in optimizer._requires_update - completed:
                optimizer._handles[p] = optimizer._allreduce_grad_async(p)
            for p, (handle, _) in list(optimizer._handles.items()):
                if handle is None:
                    optimizer._handles[p] = optimizer._allreduce_grad_async(p)
            if await_headers(optimizer, engines, compressor):
                for e in engines:
                    e.settle()
        try:
            return horovod_synchronize()
        except Exception as e:  # noqa: BLE001 - re-raised with the reason
            if "Mismatched" in str(e) and "shape [1]" in str(e):
                raise RuntimeError(
                    "hvd_compress: another rank sent a full gradient where this rank sent the "
                    "compressor's 1-element placeholder: every rank must pass the same compression= "
                    f"to DistributedOptimizer (this rank: {compressor}).\nHorovod said: {e}") from e
            raise

    optimizer.synchronize = synchronize


def await_headers(optimizer, engines: list[Any], compressor: str) -> bool:
    """Close the engines' step and wait until their headers are complete (True), or until every
    Horovod handle of the step is done while an engine sends buckets of its own (False: Horovod
    synchronizes first; its handles fail if another rank sent full gradients against this
    rank's placeholders).  When every bucket is Horovod's own and the header still lags
    :func:`check_timeout` seconds behind Horovod's handles, another rank does not run the
    compressor at all: raise."""
    headers = [h for h in (e.close() for e in engines) if h is not None]
    # the header is on the wire behind the step's buckets: this is the wire's time, counted
    # once (the first engine's "wait"; decoding meanwhile stays "decode")
    with engines[0].timings.clock("wait"):
        return _poll_headers(optimizer, engines, headers, compressor)


def _poll_headers(optimizer, engines: list[Any], headers: list[Any], compressor: str) -> bool:
    import horovod.torch as hvd
    # Horovod's handles, in the order they were started (roughly the order they complete): each
    # poll looks at the first one still running only, so a wait costs O(1) calls per poll
    running = deque(h for h, _ in optimizer._handles.values() if not callable(h))
    pause, horovod_done = _POLL_S[0], None
    while not all(h.done() for h in headers):
        while running and hvd.poll(running[0]):
            running.popleft()
        if horovod_done is None and not running:
            horovod_done = time.monotonic()
        if horovod_done is not None:
            if any(getattr(e, "plan", None) is not None and e.plan.engine_buckets for e in engines):
                return False
            if time.monotonic() - horovod_done > check_timeout():
                raise RuntimeError(
                    "hvd_compress: every gradient's allreduce completed but another rank never joined "
                    f"this rank's configuration check in {check_timeout():g} s: every rank must pass the "
                    f"same compression= to DistributedOptimizer (this rank: {compressor}; another may "
                    "use hvd.Compression.none)")
        if not any([e.progress() for e in engines]):    # (decoding beats sleeping)
            time.sleep(pause)
            pause = min(2 * pause, _POLL_S[1])
    return True


