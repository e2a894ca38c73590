"""Selective compression decided by measurement: the engine's trial of compressed against
uncompressed steps (docs/design.md, "The plan, the link and selective compression")."""
from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

from .header import Header
from .plan import DENSE

if TYPE_CHECKING:
    from .engine import Engine


class Trial:
    """Selective compression decided by measurement (with a measured link only).

    The cost model decides where compression should pay; on a machine where the "link" is
    really memory bandwidth or shared cores, it can be wrong.  So once the link is measured and
    the model compresses something (without a decisive margin), the engine alternates
    :data:`STEPS` steps with the model's plan and :data:`STEPS` with every ``route="auto"``
    bucket uncompressed (Horovod's own allreduce) -- alternating, so that a change in the
    machine's background load hits both alike -- times every step from start to start on every
    rank, and keeps compression only if its median step (the slowest rank's) is at least
    :data:`MARGIN` shorter.  The step header carries the times, so every rank takes the same
    decision without another collective.  The verdict is part of the state (a resumed run
    keeps it)."""

    STEPS = 3
    #: compression is kept only if its median step is at most this fraction of uncompressed
    MARGIN = 0.95
    #: no trial when the model predicts compression at least this many times faster: it would
    #: have to be that wrong (a slow link's uncompressed steps are also the costliest to time)
    DECISIVE = 10.0
    _MODEL, _DENSE = 1, 2

    def __init__(self) -> None:
        self.phase = "off"          # off -> running -> done
        self.schedule: list[int] = []
        self.samples: dict[int, list[float]] = {self._MODEL: [], self._DENSE: []}
        self.verdict: int | None = None
        self.current = 0            # variant of the step in progress (0: not a trial step)
        self.note = ""              # how the verdict was reached, when not by timing
        self._started: float | None = None
        self.last = [0, 0]          # (variant, microseconds) of the previous step, for the header

    @property
    def running(self) -> bool:
        return self.phase == "running"

    def settled(self, engine: "Engine") -> bool:
        """The plan will not change any more (link known, no trial in progress)."""
        return engine.link is not None and not self.running

    def start(self, engine: "Engine") -> None:
        """After the link is measured: run the trial if the model compresses something the
        trial may turn off, unless the model's margin is decisive."""
        auto = [b for b in engine.plan.buckets if b.route is not DENSE and b.bucket.method.route == "auto"]
        if self.phase != "off" or not auto:
            return
        predicted = sum(b.seconds for b in auto)
        if sum(b.dense_seconds for b in auto) >= self.DECISIVE * predicted:
            self.phase, self.verdict = "done", self._MODEL
            self.note = f"model: compressed {predicted * 1e3:.1f} ms vs uncompressed " \
                        f"{sum(b.dense_seconds for b in auto) * 1e3:.1f} ms per step, no trial needed"
            return
        self.phase = "running"
        self.schedule = [self._MODEL, self._DENSE] * self.STEPS

    def next_step(self, engine: "Engine") -> bool:
        """At a step's start: time the previous step; pick this step's variant.  True when the
        plan must change."""
        now = time.perf_counter()
        self.last = [self.current, int(min((now - self._started) * 1e6, 2 ** 31 - 1))] \
            if self.current and self._started is not None else [0, 0]
        self._started = now
        before = self.current
        self.current = self.schedule.pop(0) if self.running and self.schedule else 0
        return (before == self._DENSE) != (self.current == self._DENSE) or \
            (self.phase == "done" and before != 0)

    def record(self, rows: list[Header], engine: "Engine") -> None:
        """Every rank's time of the previous step (from the header); decide when complete."""
        if not self.running or not rows or not rows[0].trial_variant:
            return
        self.samples[rows[0].trial_variant].append(max(h.trial_us for h in rows) / 1e6)
        if all(len(v) >= self.STEPS - 1 for v in self.samples.values()) and not self.schedule:
            model, dense = (statistics.median(self.samples[k]) for k in (self._MODEL, self._DENSE))
            self.verdict = self._MODEL if model <= self.MARGIN * dense else self._DENSE
            self.phase = "done"

    def dense_reason(self) -> str | None:
        if self.current == self._DENSE:
            return "trial: timing uncompressed steps"
        if self.phase == "done" and self.verdict == self._DENSE:
            return "measured: uncompressed steps were faster"
        return None

    def summary(self) -> str:
        if self.phase != "done":
            return "trial running" if self.running else ""
        if self.note:
            return self.note
        model, dense = (statistics.median(self.samples[k]) if self.samples[k] else float("nan")
                        for k in (self._MODEL, self._DENSE))
        kept = "uncompressed" if self.verdict == self._DENSE else "compressed"
        return f"measured {model:.3f} s/step compressed vs {dense:.3f} s/step uncompressed: {kept} kept"

    def state(self) -> dict:
        return {"phase": self.phase, "verdict": self.verdict, "note": self.note,
                "samples": {str(k): v for k, v in self.samples.items()}}

    def load(self, saved: dict | None) -> None:
        if not saved or saved.get("phase") != "done":
            return  # an unfinished trial starts again
        self.phase, self.verdict, self.note = "done", saved["verdict"], saved.get("note", "")
        self.samples = {int(k): v for k, v in saved["samples"].items()}
        self.current = 0
