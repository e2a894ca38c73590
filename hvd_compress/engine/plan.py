"""The plan: one route per bucket, chosen once from the method's candidates and ``dense`` by
the cost model of :mod:`hvd_compress.routes`, printable so a user sees what goes where and why.

A method's ``route`` setting decides what may be chosen: ``"auto"`` (default) any candidate or
dense, whichever is predicted fastest (selective compression: a bucket is left uncompressed
where compression would not pay); ``"compressed"`` only the compressed candidates; a route name
forces that route.  Buckets of members below ``min_numel`` are always dense.

On several hosts of several ranks each, every compressed candidate also has its hierarchical
form (:mod:`hvd_compress.routes.hierarchical`), timed with both links: the method's
``hierarchy`` setting allows them (``"auto"``), requires them (``True``) or excludes them
(``False``).  Flat routes are timed with the link between hosts (a ring is as fast as its
slowest hop).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..routes.base import Link, Route, Speed
from ..routes.dense import DenseRoute
from ..routes.hierarchical import HierarchicalRoute
from .buckets import Bucket
from .topology import Topology

DENSE = DenseRoute()
AUTO, COMPRESSED = "auto", "compressed"


@dataclass
class BucketPlan:
    bucket: Bucket
    route: Route
    payload_bytes: float      # this rank's payload per step (predicted for sparse codecs)
    received_bytes: float     # what the route makes each rank receive per step (predicted)
    seconds: float            # predicted time of the chosen route
    dense_seconds: float      # predicted time uncompressed
    why: str
    #: sent by the caller itself (Horovod's own allreduce), not by the engine
    external: bool = False
    #: how many independently compressed terms the sum has (ranks; hosts on hierarchical routes)
    workers: int = 1
    #: bytes entering each host from the other hosts per step (predicted; 0 unless the
    #: topology is hierarchical)
    crossing_bytes: float = 0.0


@dataclass
class Plan:
    world: int
    rank: int
    link: Link
    link_source: str
    cap_bytes: int
    buckets: list[BucketPlan]
    topology: Topology | None = None
    #: the link inside a host (used where the topology is hierarchical)
    intra: Link | None = None
    #: the step has state to protect (compressed buckets, or buffers): check dense outputs too
    stateful: bool = True
    #: how the choice between compressing and not was made (the engine's trial), if it was
    decided: str = ""
    #: made for gradients on a device (payloads at their fixed capacity, see plan_bucket)
    padded: bool = False

    @property
    def engine_buckets(self) -> bool:
        """Whether the engine sends any bucket itself (else it needs no header nor flush)."""
        return any(not b.external for b in self.buckets)

    @property
    def digest(self) -> int:
        """63-bit digest of everything that decides collectives: compared across ranks."""
        text = "|".join([str(self.world), str(self.cap_bytes), str(self.topology)] + [
            f"{b.bucket.describe()}:{b.bucket.numel}:{b.route.name}:{b.external}:{b.bucket.method.config()}"
            for b in self.buckets])
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1

    def __str__(self) -> str:
        lines = [f"hvd_compress plan: {self._network()}, bucket cap {self.cap_bytes / 2**20:g} MiB, "
                 f"{len(self.buckets)} buckets" + (f"; {self.decided}" if self.decided else ""),
                 f"{'bucket':>6}  {'members':<44} {'numel':>11}  {'method':<12} {'route':<20} "
                 f"{'recv/rank':>10} {'cross/host':>10} {'predicted':>10} {'dense':>10}  why"]
        for b in self.buckets:
            lines.append(
                f"{b.bucket.index:>6}  {b.bucket.describe()[:44]:<44} {b.bucket.numel:>11,}  "
                f"{b.bucket.method.name[:12]:<12} {b.route.name:<20} "
                f"{_size(b.received_bytes):>10} {_size(b.crossing_bytes) if self._hosts > 1 else '-':>10} "
                f"{b.seconds * 1e3:>8.2f}ms {b.dense_seconds * 1e3:>8.2f}ms  {b.why}"
                + (" (Horovod's own allreduce)" if b.external else ""))
        return "\n".join(lines)

    @property
    def _hosts(self) -> int:
        """Hosts the plan knows of (1: one flat link)."""
        return self.topology.n_hosts if self.topology is not None and self.topology.hierarchical else 1

    def _network(self) -> str:
        """The ranks, hosts and links the plan was made for."""
        if self._hosts == 1:
            return f"{self.world} ranks, link {self.link} ({self.link_source})"
        return (f"{self.world} ranks ({self.topology.describe()}), between hosts {self.link} "
                f"({self.link_source}), inside {self.intra}")

    def summary(self) -> str:
        """One line: what goes compressed, what does not and why (the planner's log line)."""
        total = sum(b.bucket.numel for b in self.buckets)
        compressed = [b for b in self.buckets if b.route is not DENSE]
        numel = sum(b.bucket.numel for b in compressed)
        reasons: dict[str, int] = {}
        for b in self.buckets:
            if b.route is DENSE:
                key = b.why.split(" (")[0]
                reasons[key] = reasons.get(key, 0) + b.bucket.numel
        why = "; ".join(f"{_share(n, total)} {reason}" for reason, n in
                        sorted(reasons.items(), key=lambda kv: -kv[1]))
        sent = sum(b.received_bytes for b in self.buckets)
        dense = sum(received_bytes(DENSE, 4 * b.bucket.numel, b.bucket.numel, self.world) for b in self.buckets)
        crossing = (f", {_size(sum(b.crossing_bytes for b in self.buckets))} into each host"
                    if self._hosts > 1 else "")
        return (f"{self._network()}: {len(compressed)} of "
                f"{len(self.buckets)} buckets compressed ({_share(numel, total)} of {total:,} elements), "
                f"{_size(sent)} received per rank per step vs {_size(dense)} uncompressed{crossing}"
                + (f"; uncompressed: {why}" if reasons else "") + (f"; {self.decided}" if self.decided else ""))

    @property
    def compressed_fraction(self) -> float:
        """Fraction of the gradient's elements on compressed routes."""
        total = sum(b.bucket.numel for b in self.buckets)
        return sum(b.bucket.numel for b in self.buckets if b.route is not DENSE) / max(total, 1)


def _share(part: float, whole: float) -> str:
    share = part / max(whole, 1)
    return "<1%" if 0 < share < 0.01 else ">99%" if 0.99 < share < 1 else f"{share:.0%}"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return ""


def plan_bucket(bucket: Bucket, world: int, link: Link, speed: Speed, step: int,
                dense_if_auto: str | None = None, *, topology: Topology | None = None,
                intra: Link | None = None, padded: bool = False) -> BucketPlan:
    """The route of one bucket.  ``dense_if_auto``: send buckets whose method has
    ``route="auto"`` uncompressed, for this reason (the engine's measured trial).  ``topology``
    (default: one rank per host) and ``intra`` (the link inside a host) open the hierarchical
    routes.  ``padded``: the gradients live on a device, where payloads of a data-dependent size
    go at their fixed capacity (top-k's)."""
    topology = topology or Topology.flat(world)
    method = bucket.method
    n = bucket.numel
    dense_s = DENSE.seconds(n, world, 4 * n, 1, link, speed)

    def dense(why: str) -> BucketPlan:
        return BucketPlan(bucket, DENSE, 4 * n, received_bytes(DENSE, 4 * n, n, world), dense_s, dense_s, why,
                          workers=world, crossing_bytes=crossing_bytes(DENSE, 4 * n, n, topology))
    if bucket.small or world < 2 or (dense_if_auto and method.route == AUTO):
        return dense("below min_numel" if bucket.small else "single rank" if world < 2 else dense_if_auto)
    codec = method.codec_at(step, world)
    payload = method.payload_bytes(bucket, codec, padded)
    segments = len(bucket.segments(method.scope))
    candidates, note = routes_for(method, topology)
    wanted = method.route
    if wanted not in (AUTO, COMPRESSED):
        if wanted == DENSE.name:
            return dense("forced")
        if wanted not in method.candidates():
            raise ValueError(f"{method.name}: route {wanted!r} is not one of its routes "
                             f"{sorted(method.candidates())} (or 'dense', 'auto', 'compressed')")
        candidates = {k: r for k, r in candidates.items() if _inner(r).name == wanted}
    intra = intra or link
    timed = {name: (route.network_seconds(n, topology.n_hosts, topology.local_size, payload, link, intra, speed)
                    if isinstance(route, HierarchicalRoute) else
                    route.seconds(n, world, payload, segments, link, speed))
             for name, route in candidates.items()}
    best = min(timed, key=timed.get)
    route, seconds = candidates[best], timed[best]
    received = received_bytes(route, payload, n, world, topology)
    if wanted == AUTO and dense_s <= seconds:
        return dense(f"compression would not pay ({best}: {seconds * 1e3:.2f} ms)")
    why = "fastest" if wanted == AUTO else "forced" if wanted != COMPRESSED else \
        "fastest compressed (forced)" if len(candidates) > 1 else "forced"
    if dense_s < seconds:
        why += f", predicted slower than dense ({dense_s * 1e3:.2f} ms)"
    why += note
    workers = topology.n_hosts if isinstance(route, HierarchicalRoute) else world
    return BucketPlan(bucket, route, payload, received, seconds, dense_s, why, workers=workers,
                      crossing_bytes=crossing_bytes(route, payload, n, topology))


def routes_for(method, topology: Topology) -> tuple[dict[str, Route], str]:
    """The compressed candidates of ``method`` on ``topology`` (flat, hierarchical or both, as
    its ``hierarchy`` setting says), and a note for the plan when hierarchy was asked for but
    cannot be had."""
    flat = method.candidates()
    wanted = method.hierarchy
    if wanted is False:
        return flat, ""
    if not method.hierarchical:
        return flat, (f"; flat: {method.name} is not hierarchical (its state follows each rank's own "
                      "payload)" if wanted is True else "")
    if not topology.hierarchical:
        return flat, f"; flat: no hierarchy on {topology.describe()}" if wanted is True else ""
    hier = {f"hier_{name}": HierarchicalRoute(route) for name, route in flat.items()}   # (stateless)
    return (hier if wanted is True else {**flat, **hier}), ""


def _inner(route: Route) -> Route:
    return route.inner if isinstance(route, HierarchicalRoute) else route


def received_bytes(route: Route, payload: float, n: int, world: int, topology: Topology | None = None) -> float:
    """Bytes each rank receives per step on ``route`` (payload: this rank's bytes)."""
    if isinstance(route, HierarchicalRoute):
        local, hosts = topology.local_size, topology.n_hosts
        gather = hosts * payload / local if route.gathers_payloads else 4 * n / local
        return ((local - 1) / local * 4 * n + (local - 1) * gather
                + received_bytes(route.inner, payload / local, n // local, hosts))
    if route.name == "dense":
        return 2 * (world - 1) / world * 4 * n
    if route.name == "allgather":
        return (world - 1) * payload
    return 2 * (world - 1) / world * payload   # allreduce (ring) and the two-phase routes


def crossing_bytes(route: Route, payload: float, n: int, topology: Topology) -> float:
    """Bytes entering each host from the others per step (predicted): a hierarchical route's L
    inner exchanges; a ring allreduce crosses each host's link once (2 (P - 1)/P of the data);
    gathers and alltoalls bring each rank what the ranks of other hosts send."""
    hosts, local, world = topology.n_hosts, topology.local_size, topology.size
    if not topology.hierarchical:
        return 0.0
    if isinstance(route, HierarchicalRoute):
        return local * received_bytes(route.inner, payload / local, n // local, hosts)
    if route.name in ("dense", "allreduce"):
        return received_bytes(route, payload, n, world)
    return local * received_bytes(route, payload, n, world) * (world - local) / (world - 1)
