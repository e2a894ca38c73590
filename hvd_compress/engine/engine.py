"""The step engine: gradients in by member, buckets launched when complete, one flush per step.

One engine serves one (compressor, optimizer) pair.  Per step:

* :meth:`Engine.add` (Horovod's backward hook, via the adaptor) copies a member's gradient into
  its bucket; when the bucket is complete its route starts (encode, phase-1 collective); when
  every member has come, the step header starts; a bucket whose collective has already
  completed is decoded (host data).  Nothing here waits or raises, and on a device nothing is
  read back (docs/design.md, "The hot path"): a failure is recorded, flagged in the header and
  raised in the flush on every rank.
* :meth:`Engine.result` (``synchronize()``): the first call of a step runs :meth:`flush`, which
  blocks, in the same order on every rank: incomplete buckets are started (absent members as
  zeros), the step header is started and waited (plan digest, errors, finite flags), every
  multi-phase route advances in bucket order, every route finishes (the first completed
  first: decoding is local and its order changes no bits), every
  compressed bucket's method sees its decoded sum (``Method.after_decode``), members
  flagged non-finite by any rank become NaN, and the step's state is committed (all finite) or
  rolled back.  The link is measured at the first flush when it was not declared.

See docs/design.md ("The engine") for the reasoning.
"""
from __future__ import annotations

import logging
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..backends import on_device
from ..codecs.rng import rank_seed, splitmix64
from ..routes.base import Job, Link, Pending, Speed
from . import cost
from .buckets import Bucket, Member, assign_buckets
from .plan import DENSE, Plan, plan_bucket
from .config_check import config_table, describe_differences
from .finite import DeviceFlags, all_finite, check_on_host
from .header import Header
from .persist import Restore, checked_restore, saved_state
from .state import BucketState
from .trial import Trial
from .topology import Placement, Topology

#: the planner's log: one INFO line per plan on rank 0, a WARNING when compression is switched off
log = logging.getLogger("hvd_compress")
#: what Horovod 0.28.1's allreduce takes (bf16 members stay in the engine, which casts to fp32)
_HOROVOD_DTYPES = (torch.float16, torch.float32, torch.float64)


@dataclass
class Stats:
    """Bytes and collectives since creation, counted from the buffers that went on the wire."""
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_dense: int = 0
    collectives: int = 0
    steps: int = 0
    skipped_steps: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class Timings:
    """Where this rank's time in the engine went, in seconds since creation, each part counted
    once (a part's clock stops while an inner part's runs):

    * ``hook``: :meth:`Engine.add` apart from encoding (copies, bookkeeping, polling);
    * ``encode``: a bucket's launch: the method's prepare, the finiteness check, the encode
      (error feedback included), packing and starting the collective;
    * ``wait``: blocked in a collective's ``wait()``, or in the Horovod adaptor's wait for the
      step header behind the buckets (the wire as this rank sees it);
    * ``decode``: decoding, the methods' ``after_decode``, the checks and the write-back.

    The bandwidth benchmark divides the growth over its timed steps by their number (the step
    breakdown of docs/bandwidth-hot-path.md)."""

    PARTS = ("hook", "encode", "wait", "decode")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self._accounted = 0.0       # every part's seconds so far: what an outer clock subtracts
        #: the current (or last) step's timeline: (perf_counter seconds, event, bucket index or -1)
        #: with events "begin" (first hook), "encoded" (a bucket's collective started),
        #: "decoded", "flush" (its start) and "end" (the flush is over)
        self.events: list[tuple[float, str, int]] = []

    def mark(self, event: str, bucket: int = -1) -> None:
        self.events.append((time.perf_counter(), event, bucket))

    @contextmanager
    def clock(self, part: str) -> Iterator[None]:
        start, before = time.perf_counter(), self._accounted
        try:
            yield
        finally:
            spent = time.perf_counter() - start - (self._accounted - before)
            self.seconds[part] += spent
            self._accounted += spent


@dataclass
class _Step:
    """What one step has gathered so far."""
    grads: dict[int, torch.Tensor] = field(default_factory=dict)       # member index -> grad
    arrived: list[int] = field(default_factory=list)                   # per bucket
    pending: dict[int, Pending | None] = field(default_factory=dict)   # bucket index -> in flight
    finite: list[bool] = field(default_factory=list)                   # per member, this rank's input
    flags: DeviceFlags | None = None     # the same, on the device (CUDA path: no host read in hooks)
    errors: list[str] = field(default_factory=list)
    header: Any = None
    rows: list[Header] | None = None                                   # every rank's header, read
    results: dict[int, torch.Tensor] | None = None                     # bucket index -> fp32 sum
    decoded: dict[int, torch.Tensor | BaseException] = field(default_factory=dict)  # finished early
    bad: set[int] = field(default_factory=set)                         # members non-finite anywhere
    reported: int = 0                                                  # external results seen
    finalized: bool = False
    broken: bool = False                                               # no comm: cannot take part


class Engine:
    """Buckets, plan, state and the step lifecycle for one (compressor, optimizer) pair.

    Args:
        members: the parameters, in registration order (``Member.index`` = position).
        comm_factory: builds the :class:`~hvd_compress.engine.comm.Comm` (called at each step
            start, so an elastic reset's new world is seen).
        average: divide the sum by the number of ranks (Horovod's ``op=Average``).
        cap_bytes: bucket cap (0: one member per bucket).
        link: a declared :class:`Link` (between hosts), or None to measure it at the first flush.
        intra_link: a declared :class:`Link` inside a host (several ranks per host), or None:
            measured with ``link``, else :data:`~hvd_compress.engine.cost.ASSUMED_INTRA`.
        name: tag of this engine's collectives (the same on every rank).
        check_name: tag of the step header and the configuration check, the same on every rank
            whatever its model (default: ``name``); the Horovod adaptor names it after the
            compressor's creation number, since ``name`` comes from the parameters' names.
        external_dense: dense buckets of methods that do not transform gradients are left to
            the caller (the Horovod adaptor returns those gradients to Horovod's own allreduce:
            exactly uncompressed Horovod, fused its way); see :meth:`add`.
    """

    def __init__(self, members: list[Member], comm_factory: Callable[[], Any], *, average: bool,
                 cap_bytes: int, link: Link | None, name: str, external_dense: bool = False,
                 check_name: str | None = None, intra_link: Link | None = None) -> None:
        self.members = members
        self.buckets: list[Bucket] = assign_buckets(members, cap_bytes)
        self.cap_bytes = cap_bytes
        self._where: dict[int, tuple[Bucket, int]] = {}
        for bucket in self.buckets:
            for pos, m in enumerate(bucket.members):
                self._where[m.index] = (bucket, pos)
        self.states = [BucketState(b.numel) for b in self.buckets]
        self._comm_factory = comm_factory
        self.average = average
        self.external_dense = external_dense
        self.tag = f"hvdc.{name}"
        self.check_tag = f"hvdc.{check_name or name}"
        self.step = 0
        self.link: Link | None = link
        self.link_source = "declared" if link is not None else "assumed until measured"
        self.intra_link: Link | None = intra_link
        self._intra_declared = intra_link is not None
        #: the hosts, learned from the first step header (every rank's placement); None: not yet
        self.topology: Topology | None = None
        self.speeds: dict[int, Speed] = {}      # id(method) -> measured speed
        self.comm: Any = None
        self.plan: Plan | None = None
        self.stats = Stats()
        self.timings = Timings()
        self._inputs: dict[int, torch.Tensor] = {}  # bucket index -> reused flat input buffer
        self._flags: dict[torch.device, DeviceFlags] = {}   # the steps' device flags, reused
        self._outputs: dict[int, torch.Tensor] = {}  # bucket index -> reused flat output buffer
        self._step: _Step | None = None
        self._loaded_owner: tuple[int, int] | None = None   # (world, rank) of a loaded state
        self._trial = Trial()
        #: the plan is new: its first step carries a header (the configuration check) even
        #: when every bucket is the caller's own
        self._check_due = True
        self._announced = ""      # the last plan summary logged

    # -- the step ----------------------------------------------------------------------------

    def add(self, index: int, grad: torch.Tensor) -> bool:
        """Hand over member ``index``'s gradient (called from Horovod's hook: never raises).

        Returns False when the member's bucket is *external* this step: the caller sends the
        gradient itself, uncompressed, and reports the aggregate with :meth:`external_result`."""
        with self.timings.clock("hook"):
            return self._add(index, grad)

    def _add(self, index: int, grad: torch.Tensor) -> bool:
        step = self._step if self._step is not None and self._step.results is None else None
        try:
            if step is None:
                step = self._begin()
            if index in step.grads:
                raise RuntimeError(f"{self.members[index].name}: gradient handed over twice in one "
                                   "step (call synchronize() or step() between backward passes)")
            step.grads[index] = grad
            bucket, _ = self._where[index]
            external = self.plan.buckets[bucket.index].external
            if external:
                nbytes = grad.numel() * grad.element_size()
                self.stats.bytes_dense += 4 * grad.numel()
                self.stats.bytes_sent += nbytes
                self.stats.bytes_received += nbytes
            step.arrived[bucket.index] += 1
            if step.arrived[bucket.index] == len(bucket.members) and not external:
                self._launch(bucket, step)
            if len(step.grads) == len(self.members) and self._header_due():
                self._start_header(step)
            self._decode_completed(step)
            return not external
        except Exception:  # noqa: BLE001 - recorded, raised in synchronize() on every rank
            if step is None:   # no world to talk to (Horovod shut down?): fail in synchronize()
                step = self._step = _Step(arrived=[0] * len(self.buckets), finite=[True] * len(self.members),
                                          broken=True)
            step.errors.append(traceback.format_exc())
            return True

    def result(self, index: int) -> torch.Tensor:
        """Member ``index``'s aggregated gradient, written into the very tensor handed to
        :meth:`add` (as Horovod's in-place allreduce writes into ``p.grad``): never one of the
        engine's buffers, so clipping or unscaling it cannot touch the engine's state."""
        if self._step is None:
            raise RuntimeError("hvd_compress: decompress() before any compress() in this step")
        if self._step.results is None:
            self.flush()
        grad = self._step.grads.get(index)
        if grad is None:   # a member that never came (only a direct caller can ask for it)
            bucket, pos = self._where[index]
            member = bucket.members[pos]
            grad = torch.empty(member.shape, dtype=member.dtype, device=self._step.results[bucket.index].device)
            self._step.grads[index] = grad
            self._write_back(bucket, self._step.results[bucket.index], self._step,
                             self._step.pending[bucket.index].averaged, only=member.index)
        return grad

    def external_result(self, index: int, output: torch.Tensor) -> torch.Tensor:
        """The aggregate of an external member (Horovod's allreduce output), returned as it is;
        checked for inf/NaN when the step has state to protect (one min/max pass).  (The last
        one of a step without engine buckets waits for the step header when a trial needs it.)"""
        step = self._step
        if step is None:
            return output
        if self.plan.stateful and not all_finite(output):
            step.bad.add(index)
        step.reported += 1
        if step.reported == len(step.grads) and step.results is None and not self.plan.engine_buckets:
            step.results = {}                # the step is over (no flush: nothing of ours in flight)
            if self._header_due() or step.header is not None:   # (in synchronize(): may wait)
                self._header_rows(step)
            if self.link is None:
                self._measure()
        return output

    def close(self) -> Any:
        """No more members will come this step: start the buckets still incomplete (absent
        members as zeros) and the step header, without waiting; returns the header's handle
        (None when the step needs none).  The Horovod adaptor calls it at the start of
        ``synchronize()`` and waits for the handle before Horovod waits on its own."""
        step = self._step
        if step is None or step.results is not None or step.broken:
            return None
        for bucket in self.buckets:
            if not self.plan.buckets[bucket.index].external and bucket.index not in step.pending:
                self._launch(bucket, step)
        if step.header is None and self._header_due():
            self._start_header(step)
        return step.header

    def settle(self) -> None:
        """Finish the step now if anything of the engine's is in flight (the flush, or the
        configuration check of a step whose buckets are all the caller's); raises as the flush
        does, on every rank."""
        step = self._step
        if step is None or step.results is not None:
            return
        if step.broken or self.plan.engine_buckets:
            self.flush()
        elif step.header is not None:
            self._header_rows(step)

    def _header_due(self) -> bool:
        return self.plan.engine_buckets or self._trial.running or self._check_due

    @property
    def finite_everywhere(self) -> bool:
        """Whether the step just flushed had every member finite on every rank (the same answer
        on every rank; False while no step has been flushed)."""
        step = self._step
        return step is not None and step.results is not None and not step.broken and not step.bad

    def finalize(self) -> None:
        """Commit the last step's state if every member was finite everywhere, else roll it
        back.  Runs at the next step's start, or at once in the flush when no member is
        external; :meth:`state_dict` runs it too."""
        step = self._step
        if step is None or step.finalized or step.broken or step.results is None:
            return          # (a step still in flight is finalized when it is over)
        step.finalized = True
        self.stats.steps += 1
        if step.bad:
            self._rollback()
            self.stats.skipped_steps += 1
        else:
            for state in self.states:
                state.commit()
            self.step += 1

    def _begin(self) -> _Step:
        """A new step: the last one is finalized; the world may have changed (elastic), the
        plan with it."""
        if self._step is not None and not self._step.finalized and self._step.grads:
            if self._step.results is None:
                # never finished (no synchronize(), or an error in it): drop that step
                self._rollback()
                self._step.finalized = True
            self.finalize()
        comm = _Counted(self._comm_factory(), self.stats, self.timings)
        replan = self._trial.next_step(self)
        topology_changed = self.plan is not None and self._planned_topology(comm.size) != self.plan.topology
        if replan or topology_changed or self.plan is None or self.plan.padded != self._padded() or \
                (comm.size, comm.rank) != (self.plan.world, self.plan.rank):
            owner = (self.plan.world, self.plan.rank) if self.plan is not None else self._loaded_owner
            if owner not in (None, (comm.size, comm.rank)):
                # chunk ownership moved: the server residuals mean nothing now
                for state in self.states:
                    state.buffers.pop("server", None)
                if owner[0] != comm.size:
                    self.topology = None       # another world (elastic): learned again
                if self.link_source != "declared" and owner[0] != comm.size:
                    # another world (elastic): measure the link and run the trial again
                    self.link, self.link_source, self._trial = None, "assumed until measured", Trial()
                    if not self._intra_declared:
                        self.intra_link = None
            self.comm = comm
            self._replan()
        self.comm = comm
        self._step = _Step(arrived=[0] * len(self.buckets), finite=[True] * len(self.members))
        self.timings.events = []
        self.timings.mark("begin")
        return self._step

    def _replan(self) -> None:
        link = self.link or cost.ASSUMED
        intra = self.intra_link or cost.ASSUMED_INTRA
        topology = self._planned_topology(self.comm.size)
        plans = []
        dense = self._trial.dense_reason()
        padded = self._padded()
        for b in self.buckets:
            bplan = plan_bucket(b, self.comm.size, link, self.speeds.get(id(b.method), Speed()), self.step,
                                dense_if_auto=dense, topology=topology, intra=intra, padded=padded)
            bplan.external = (self.external_dense and bplan.route is DENSE and not b.method.transforms_gradients
                              and all(m.dtype in _HOROVOD_DTYPES for m in b.members))
            plans.append(bplan)
        self.plan = Plan(self.comm.size, self.comm.rank, link, self.link_source, self.cap_bytes, plans,
                         decided=self._trial.summary(), topology=topology, intra=intra, padded=padded)
        self._check_due = True
        self.plan.stateful = any(not p.external for p in plans) or any(s.buffers for s in self.states)
        self._announce()

    def _padded(self) -> bool:
        """Whether the plan should count payloads at their fixed device capacity: some method's
        payloads have one (top-k's) and the gradients live on a device, known once a step has
        filled the buckets' inputs (the first plan assumes the host, the next one counts the
        padding)."""
        return any(b.method.pads_on_device for b in self.buckets) and \
            any(on_device(x) for x in self._inputs.values())

    def _planned_topology(self, size: int) -> Topology:
        """The topology the plan is made for: the learned one where the hierarchical routes can
        use it, else one rank per host (nothing else changes a route)."""
        topo = self.topology
        return topo if topo is not None and topo.size == size and topo.hierarchical else Topology.flat(size)

    def _announce(self) -> None:
        """Rank 0 logs each new plan once (not the alternating plans of a trial), and warns when
        a settled plan sends most of the gradient uncompressed although compression was asked
        for: on a fast link a compressor may cost more than it saves, and the user should know."""
        if self.comm.rank != 0 or self._trial.running:
            return
        text = self.plan.summary()
        if text == self._announced:
            return
        self._announced = text
        names = ", ".join(sorted({b.method.name for b in self.buckets if b.method.codec is not None})) or "none"
        switched_off = [b for b in self.plan.buckets if b.route is DENSE and not b.bucket.small
                        and b.why.startswith(("compression would not pay", "measured"))]
        if self.link is not None and switched_off and self.plan.compressed_fraction < 0.5:
            log.warning("hvd_compress (%s) sends most of the gradient uncompressed: %s. To compress anyway "
                        "pass route='compressed'%s", names, text,
                        "" if self.link_source == "declared" else
                        ", or declare the link (link=hvd_compress.Link.gbps(...))")
        else:
            log.info("hvd_compress (%s) plan: %s", names, text)

    def _launch(self, bucket: Bucket, step: _Step) -> None:
        """Fill the bucket's input, check it, and start its route (in the hook)."""
        with self.timings.clock("encode"):
            self._start_route(bucket, step)
        self.timings.mark("encoded", bucket.index)

    def _start_route(self, bucket: Bucket, step: _Step) -> None:
        bplan = self.plan.buckets[bucket.index]
        method, state = bucket.method, self.states[bucket.index]
        grads = [step.grads.get(m.index) for m in bucket.members]
        device = next((g.device for g in grads if g is not None), torch.device("cpu"))
        x = self._inputs.get(bucket.index)
        if x is None or x.device != device:
            x = self._inputs[bucket.index] = torch.empty(bucket.numel, dtype=torch.float32, device=device)
            self._outputs[bucket.index] = torch.empty_like(x)
        self.stats.bytes_dense += 4 * bucket.numel
        try:
            state.to(device)
            x = method.prepare(bucket, grads, x, state, self.comm)
            compressed = bplan.route is not DENSE
            if compressed:  # (dense sums carry inf/NaN by themselves)
                if on_device(x):
                    self._device_flags(step, x.device).check(bucket, x)
                else:
                    check_on_host(bucket, x, step.finite)
            residual = None
            if "residual" in state.buffers or (compressed and method.error_feedback):
                residual = state.buffer("residual", device).begin()
            job = Job(x, bucket.tensor_id, method.codec_at(self.step, bplan.workers), bucket.segments(method.scope),
                      residual, self.comm, f"{self.tag}.b{bucket.index}", self.step,
                      lambda r: rank_seed(method.seed, r), self._server_buffer(bucket, device),
                      state=lambda name, numel: state.buffer(name, device, numel).begin(),
                      fresh=lambda name: state.buffers[name].fresh,
                      members=bucket.members, shared_seed=splitmix64(method.seed), average=self.average,
                      out=self._outputs[bucket.index], topology=self.plan.topology)
            try:
                pending = bplan.route.start(job)
            except FloatingPointError:  # a codec overflowed on finite input (QSGD's norm)
                for m in bucket.members:    # (the header multiplies these into any device flags)
                    step.finite[m.index] = False
                x.zero_()
                if residual is not None:    # (the encode had added g to it; the step rolls back)
                    residual.zero_()
                pending = bplan.route.start(job)
            if step.flags is not None:
                step.flags.restrict(bucket, [p.finite for p in pending.payloads if p.finite is not None])
            if compressed:
                method.after_encode(bucket, pending, state)
            step.pending[bucket.index] = pending
        except Exception:  # noqa: BLE001
            step.pending[bucket.index] = None
            step.errors.append(f"bucket {bucket.index} ({bucket.describe()}):\n{traceback.format_exc()}")

    def _server_buffer(self, bucket: Bucket, device: torch.device) -> Callable[[int], torch.Tensor | None]:
        state, method = self.states[bucket.index], bucket.method

        def server(numel: int) -> torch.Tensor | None:
            # Server-side EF only with EF on: fed back into a quantizer that is not a
            # contraction (QSGD, TernGrad) the residual grows without bound.
            if not method.error_feedback:
                return None
            return state.buffer("server", device, numel).begin()
        return server

    def _device_flags(self, step: _Step, device: torch.device) -> DeviceFlags:
        """The step's device flags (the engine keeps one vector per device, reset per step)."""
        if step.flags is None:
            flags = self._flags.get(device)
            if flags is None:
                flags = self._flags[device] = DeviceFlags(len(self.members), device)
            else:
                flags.reset()
            step.flags = flags
        return step.flags

    def _start_header(self, step: _Step) -> None:
        """This rank's step header (:mod:`.header`): plan digest, error flag, the previous
        step's trial variant and time, placement, one finite flag per member (with the device
        flags when the step has some: the header then goes on the wire from the device)."""
        header = Header(self.plan.digest, bool(step.errors), *self._trial.last, self.comm.placement,
                        tuple(step.finite))
        packed = header.pack(None if step.flags is None else step.flags.flags)
        step.header = self.comm.allgather(packed, f"{self.check_tag}.header")

    def _header_rows(self, step: _Step) -> list[Header]:
        """Every rank's header (started if need be, waited once, checked once)."""
        if step.rows is None:
            if step.header is None:
                self._start_header(step)
            rows = step.rows = Header.unpack_all(step.header.wait())
            self._read_header(rows, step)
            self._check_due = False
        return step.rows

    def flush(self) -> None:
        """Finish the step's engine buckets (see the module docstring); raises on every rank if
        any rank failed."""
        self.timings.mark("flush")
        with self.timings.clock("decode"):
            self._flush()
        self.timings.mark("end")

    @staticmethod
    def _issue(live: list[Bucket], step: _Step) -> None:
        """Put every bucket's collective in flight before waiting for any (a comm whose
        collectives exchange sizes first issues the data here: in bucket order, on every rank)."""
        for bucket in live:
            issue = getattr(step.pending[bucket.index].handle, "issue", None)
            if issue is not None:
                issue()

    def _finish(self, index: int, pending: Pending) -> torch.Tensor | BaseException:
        """Wait for bucket ``index``'s last phase and decode it (the exception, if it fails:
        the flush raises it)."""
        with self.timings.clock("decode"):
            try:
                return self.plan.buckets[index].route.finish(pending)
            except Exception as exc:  # noqa: BLE001 - raised by the flush
                return exc
            finally:
                self.timings.mark("decoded", index)

    def progress(self) -> bool:
        """While the caller waits for something else (the Horovod adaptor, for the step
        header): decode the buckets whose collectives have completed; True if it decoded any.
        Never raises (a failure is the flush's to raise)."""
        step = self._step
        if step is None or step.results is not None or step.broken:
            return False
        before = len(step.decoded)
        try:
            self._decode_completed(step)
        except Exception:  # noqa: BLE001 - the flush meets it again
            return False
        return len(step.decoded) > before

    def _decode_completed(self, step: _Step) -> None:
        """In a hook: decode every single-phase bucket whose collective has completed, so the
        decode of early buckets overlaps the backward pass and the later buckets' time on the
        wire.  Decoding is local work, its order changes no bits, and it starts no collective
        (a multi-phase route's next phase starts in the flush, in bucket order).  Only for data
        on the host: on a device, decoding reads payload sizes, which would stall the hook (the
        flush decodes the first completed bucket first instead)."""
        for index, pending in step.pending.items():
            if pending is not None and index not in step.decoded and not on_device(pending.job.x) \
                    and not self.plan.buckets[index].route.phases and pending.handle.done():
                step.decoded[index] = self._finish(index, pending)

    def _flush(self) -> None:
        step = self._step
        if step.broken:
            step.results = {}
            raise RuntimeError("hvd_compress: this rank could not start the step:\n" + "\n".join(step.errors))
        try:
            live = [b for b in self.buckets if not self.plan.buckets[b.index].external]
            for bucket in live:
                if bucket.index not in step.pending:     # members that never came: zeros
                    self._launch(bucket, step)
            rows = self._header_rows(step)
            routes = {b.index: self.plan.buckets[b.index].route for b in live}
            for phase in range(max((r.phases for r in routes.values()), default=0)):
                self._issue(live, step)
                for bucket in live:     # every bucket's next phase starts before any waits on it
                    if phase < routes[bucket.index].phases:
                        routes[bucket.index].advance(step.pending[bucket.index])
            self._issue(live, step)
            results = {}
            waiting = [b.index for b in live]
            while waiting:      # the first completed bucket in bucket order, else the first
                index = next((i for i in waiting if i in step.decoded or step.pending[i].handle.done()),
                             waiting[0])
                waiting.remove(index)
                pending = step.pending[index]
                out = step.decoded.pop(index, None)
                if out is None:
                    out = self._finish(index, pending)
                if isinstance(out, BaseException):
                    raise out
                results[index] = out
                self.stats.bytes_sent += pending.sent
                self.stats.bytes_received += pending.received
            for bucket in live:     # (in bucket order, on every rank; state in working buffers)
                if self.plan.buckets[bucket.index].route is not DENSE:
                    bucket.method.after_decode(bucket, results[bucket.index], self.states[bucket.index],
                                               self.comm)
            flagged = {i for i in range(len(self.members)) if any(not h.finite[i] for h in rows)}
            for i in flagged:   # zeros went on the wire for them: every rank makes them NaN
                bucket, pos = self._where[i]
                offset = bucket.offsets[pos]
                results[bucket.index][offset:offset + bucket.members[pos].numel].fill_(float("nan"))
            step.bad |= flagged | self._non_finite_outputs(results, live)
            for bucket in live:
                self._write_back(bucket, results[bucket.index], step, step.pending[bucket.index].averaged)
            step.bad |= self._non_finite_written(live, step)
            step.results = results
            if self.link is None:
                self._measure()
            if all(not self.plan.buckets[b.index].external for b in self.buckets):
                self.finalize()     # nothing else can change the verdict
        except BaseException:
            self._rollback()
            step.results = {}
            step.finalized = True
            raise

    def _write_back(self, bucket: Bucket, out: torch.Tensor, step: _Step, averaged: bool,
                    only: int | None = None) -> None:
        """Each member's slice of the bucket's sum into the gradient tensor it came in (divided
        by the world size for Average: sum / size exactly, fused with the copy)."""
        divide = self.average and not averaged
        for m, offset in zip(bucket.members, bucket.offsets):
            grad = step.grads.get(m.index)
            if grad is None or only not in (None, m.index):
                continue
            src = out[offset:offset + m.numel].view(grad.shape)
            if divide and grad.dtype == torch.float32:
                torch.div(src, self.comm.size, out=grad)
            else:
                grad.copy_(src / self.comm.size if divide else src)

    def _non_finite_outputs(self, results: dict[int, torch.Tensor], live: list[Bucket]) -> set[int]:
        """Members whose aggregate holds inf/NaN although every input was finite (a sum or a
        codec overflowed, e.g. stochastic fp16): the same on every rank, since the outputs are.
        One min/max pass per bucket, read on the host in one go."""
        if not live:
            return set()
        extremes = torch.stack([torch.stack(torch.aminmax(results[b.index])) if b.numel
                                else torch.zeros(2, device=results[b.index].device) for b in live])
        finite = torch.isfinite(extremes).all(1).tolist()
        bad = set()
        for bucket, ok in zip(live, finite):
            if not ok:
                for m, offset in zip(bucket.members, bucket.offsets):
                    if not bool(torch.isfinite(results[bucket.index][offset:offset + m.numel]).all()):
                        bad.add(m.index)
        return bad

    def _non_finite_written(self, live: list[Bucket], step: _Step) -> set[int]:
        """Members narrower than fp32 (fp16, bf16) whose written gradient overflowed although
        the fp32 aggregate was finite (fp16 ends at 65504): judged where they were written, in
        their own dtype, the same on every rank (the same bits were written).  One min/max pass
        per such member, read on the host in one go."""
        narrow = [(m.index, step.grads[m.index]) for b in live for m in b.members
                  if m.index not in step.bad and step.grads.get(m.index) is not None
                  and step.grads[m.index].dtype in (torch.float16, torch.bfloat16)
                  and step.grads[m.index].numel()]
        if not narrow:
            return set()
        finite = torch.isfinite(torch.stack([torch.stack(torch.aminmax(g)).float() for _, g in narrow])).all(1)
        return {index for (index, _), ok in zip(narrow, finite.tolist()) if not ok}

    def _read_header(self, rows: list[Header], step: _Step) -> None:
        self._check_header(rows, step)
        self._trial.record(rows, self)
        # every rank's placement: the same topology on every rank; a new one is planned for
        # from the next step on
        self.topology = Topology.of([h.placement for h in rows])

    def _check_header(self, rows: list[Header], step: _Step) -> None:
        digests = [h.digest for h in rows]
        if len(set(digests)) != 1:
            groups: dict[tuple, list[int]] = {}
            for rank, d in enumerate(digests):
                groups.setdefault(d, []).append(rank)
            # every rank read the same rows, so every rank takes part in this one allgather
            tables = self.comm.allgather(config_table(self.plan, self.members), f"{self.check_tag}.config").wait()
            raise RuntimeError(
                "hvd_compress: ranks use different compressor settings or models (ranks grouped by "
                f"plan: {sorted(groups.values())}); every rank must pass the same compression= and "
                f"the same parameters.\n{describe_differences(tables)}")
        failed = [rank for rank, h in enumerate(rows) if h.failed]
        if failed:
            mine = "\n".join(step.errors) if step.errors else "(this rank had no error)"
            raise RuntimeError(f"hvd_compress: compression failed on rank(s) {failed} in this step; "
                               f"this rank's error:\n{mine}")

    def _rollback(self) -> None:
        for state in self.states:
            state.rollback()

    def _measure(self) -> None:
        """Measure the link and the codecs once, agree across ranks, re-plan, and start the
        trial if the new plan compresses anything (in the flush, or at the last uncompressed
        result of a step without flush: in synchronize(), where waiting is allowed; the new
        plan applies from the next step)."""
        device = next(iter(self._inputs.values())).device if self._inputs else torch.device("cpu")
        self.link, intra, self.link_source = cost.measure_links(self.comm, self._planned_topology(self.comm.size),
                                                                device, f"{self.tag}.link")
        if not self._intra_declared:
            self.intra_link = intra
        methods = {id(b.method): b.method for b in self.buckets if not b.small and b.method.codec is not None}
        for i, method in enumerate(methods.values()):
            self.speeds[id(method)] = cost.measure_speed(self.comm, method.codec_at(self.step, self.comm.size),
                                                         method.error_feedback, device,
                                                         f"{self.tag}.speed{i}")
        self._replan()
        self._trial.start(self)

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """(Finalizes the last step first.)  This rank's state: see
        :func:`~hvd_compress.engine.persist.saved_state`."""
        self.finalize()
        return saved_state(self)

    def load_state_dict(self, sd: dict, strict: bool = True) -> list[str]:
        """Restore a :meth:`state_dict` (buckets may differ: buffers are rebuilt per member);
        returns what ``strict=False`` dropped.  See :meth:`check_state`."""
        restore = self.check_state(sd, strict)
        for state in self.states:
            state.buffers.clear()
        for state, name, offset, tensor in restore.loads:
            if offset is None:
                state.buffer(name, tensor.device, tensor.numel()).load(tensor)
            else:
                state.buffer(name, tensor.device).load(tensor, offset)
        self.step = int(sd["step"])
        self._loaded_owner = (sd["world"], sd["rank"]) if sd.get("world") is not None else None
        if restore.link is not None:
            self.link = restore.link
            self.link_source = sd.get("link_source", "declared")
        if restore.intra_link is not None and not self._intra_declared:
            self.intra_link = restore.intra_link
        self.topology = restore.topology
        self._trial.load(sd.get("trial"))
        by_name = {b.method.config(): b.method for b in self.buckets}
        self.speeds = {id(by_name[k]): v for k, v in restore.speeds.items() if k in by_name}
        self._step = None
        self.plan = None      # re-planned at the next step, with the restored link
        return restore.dropped

    def check_state(self, sd: dict, strict: bool = True) -> Restore:
        """What loading ``sd`` would do, checked in full; changes nothing (see
        :func:`~hvd_compress.engine.persist.checked_restore`)."""
        return checked_restore(self, sd, strict)


class _Counted:
    """A comm that counts the collectives it starts into the engine's stats and the time spent
    waiting for them into its timings."""

    def __init__(self, comm: Any, stats: Stats, timings: Timings) -> None:
        self._comm, self._stats, self._timings = comm, stats, timings
        self.rank, self.size = comm.rank, comm.size
        self.placement = getattr(comm, "placement", None) or Placement(comm.rank, 0, 1)

    def allreduce(self, tensor: torch.Tensor, name: str, op: str = "sum"):
        self._stats.collectives += 1
        return _Timed(self._comm.allreduce(tensor, name, op), self._timings)

    def allgather(self, tensor: torch.Tensor, name: str):
        self._stats.collectives += 1
        return _Timed(self._comm.allgather(tensor, name), self._timings)

    def alltoall(self, tensor: torch.Tensor, splits: list[int], name: str):
        self._stats.collectives += 1
        return _Timed(self._comm.alltoall(tensor, splits, name), self._timings)


class _Timed:
    """A handle whose ``wait()`` counts as the engine's ``wait`` time."""

    def __init__(self, handle: Any, timings: Timings) -> None:
        self._handle, self._timings = handle, timings

    def wait(self) -> Any:
        with self._timings.clock("wait"):
            return self._handle.wait()

    def done(self) -> bool:
        return self._handle.done()

    def issue(self) -> None:
        """(See engine.comm.Handle: the data of a size-staged collective.)"""
        issue = getattr(self._handle, "issue", None)
        if issue is not None:
            with self._timings.clock("wait"):
                issue()
