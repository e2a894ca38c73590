"""Engines in one process (LocalWorld threads), as the engine, method and planner tests drive
them: members of a spec, deterministic gradients per (rank, step, member), runs with resume,
and the checks the tests share."""
from __future__ import annotations

import contextlib
import math
import zlib

import torch

from hvd_compress import methods
from hvd_compress.codecs import Payload, RandomKey
from hvd_compress.engine.buckets import Member
from hvd_compress.engine.engine import Engine, rank_seed
from hvd_compress.engine.local import LocalWorld
from hvd_compress.routes.base import Link, chunk_bounds, derived_id


SHAPES = [(3000,), (40, 50), (10,)]           # two compressed members, one below min_numel


SLOW = Link.gbps(1)


def spec_with(spec: str, extra: str) -> str:
    """``spec`` with more ``key=value`` arguments."""
    return f"{spec}{',' if ':' in spec else ':'}{extra}"


def members_of(method, shapes=SHAPES, dtype=torch.float32) -> list[Member]:
    return [Member(i, f"p{i}", torch.Size(s), dtype, method) for i, s in enumerate(shapes)]


def grad(rank: int, step: int, m: Member) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + m.index)
    return torch.randn(m.shape, generator=g) * (1 + rank)


def run_engines(spec: str, world: int, steps: int = 2, *, shapes=SHAPES, cap_mb: float = 25,
                grad_fn=grad, order=None, average: bool = True, link=SLOW, after_step=None,
                cuda_path: bool = False):
    """Every rank runs an engine over ``steps`` steps; returns per rank (per step the members'
    results, the engine).  (The engine writes each result into the gradient tensor handed over,
    so ``grad_fn`` must return a tensor of its own for every rank and step.)  ``cuda_path``: the
    codecs' CUDA code path on the SIMT emulator (every rank's thread inside ``emulate``)."""
    method = methods.from_spec(spec) if isinstance(spec, str) else spec
    members = members_of(method, shapes)

    def fn(comm):
        with on_cuda_path(comm.rank, cuda_path):
            return steps_of(comm)

    def steps_of(comm):
        engine = Engine(members, lambda: comm, average=average, cap_bytes=int(cap_mb * 2 ** 20),
                        link=link, name="t")
        outs = []
        for step in range(steps):
            sequence = order(comm.rank, step, members) if order else list(reversed(members))
            for m in sequence:
                g = grad_fn(comm.rank, step, m)
                if g is not None:
                    engine.add(m.index, g)
            outs.append([engine.result(m.index).clone() for m in members])
            if after_step:
                after_step(comm.rank, step, engine)
        return outs, engine
    return LocalWorld(world).run(fn)


def on_cuda_path(rank: int, emulated: bool = True):
    """The codecs' CUDA code path on the SIMT emulator in this rank's thread (the emulator's
    context is per thread); a no-op context when ``emulated`` is False."""
    if not emulated:
        return contextlib.nullcontext()
    from emulator import EmulatedBackend
    from hvd_compress.backends import emulate
    return emulate(EmulatedBackend(seed=rank), fill_uninitialized=False)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (NaN included, which torch.equal never calls equal)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.int32 if a.element_size() == 4 else torch.int16),
        b.contiguous().view(torch.int32 if b.element_size() == 4 else torch.int16))


def assert_ranks_agree(results) -> None:
    for outs, _ in results[1:]:
        for step_a, step_b in zip(results[0][0], outs):
            for a, b in zip(step_a, step_b):
                assert same_bits(a, b)


def simulate_two_phase(spec: str, world: int, steps: int = 2, sparse: bool = False, grad_fn=grad):
    """The two-phase routes by hand over the bucket [p1, p0] (5000 elements).  Sparse: an owner
    takes at most ceil(1.5 C / P) entries of a rank (C: the segments' capacities), the rest go
    back into that rank's residual."""
    method = methods.from_spec(spec)
    codec, seed = method.codec_at(0, world), method.seed
    members = members_of(method)
    big = [members[1], members[0]]
    n, tid = 5000, zlib.crc32(b"p1\0p0")
    bounds = chunk_bounds(n, world)
    ef = method.error_feedback
    worker_r = [torch.zeros(n) for _ in range(world)]
    server_r = [torch.zeros(bounds[c + 1] - bounds[c]) for c in range(world)]
    out = []
    for step in range(steps):
        flat = [torch.cat([grad_fn(r, step, m).reshape(-1) for m in big]) for r in range(world)]
        chunk_payloads = [[None] * world for _ in range(world)]   # [owner][sender]
        for r in range(world):
            if sparse:
                segs = [(0, 2000, zlib.crc32(b"p1")), (2000, 3000, zlib.crc32(b"p0"))]
                idx, val = [], []
                for off, k, sid in segs:
                    p = codec.encode(flat[r][off:off + k], RandomKey(rank_seed(seed, r), step, sid),
                                     residual=worker_r[r][off:off + k])
                    idx.append(p.parts["indices"].long() + off)
                    val.append(p.parts["values"])
                idx, val = torch.cat(idx), torch.cat(val)
                cap = math.ceil(1.5 * (codec.capacity(2000) + codec.capacity(3000)) / world)
                for c in range(world):
                    run = torch.nonzero((idx >= bounds[c]) & (idx < bounds[c + 1])).flatten()
                    keep, back = run[:cap], run[cap:]
                    worker_r[r].index_add_(0, idx[back], val[back].float())
                    chunk_payloads[c][r] = Payload(
                        bounds[c + 1] - bounds[c], {"indices": (idx[keep] - bounds[c]).int(), "values": val[keep]})
            else:
                for c in range(world):
                    part = slice(bounds[c], bounds[c + 1])
                    chunk_payloads[c][r] = codec.encode(flat[r][part], RandomKey(rank_seed(seed, r), step,
                                                                                 derived_id(tid, 1, c)),
                                                        residual=worker_r[r][part] if ef else None)
        total = torch.zeros(n)
        for c in range(world):
            chunk = codec.decode_accumulate(chunk_payloads[c], torch.zeros(bounds[c + 1] - bounds[c]))
            again = codec.encode(chunk, RandomKey(rank_seed(seed, c), step, derived_id(tid, 2, c)),
                                 residual=server_r[c] if ef else None)
            codec.decode_accumulate([again], total[bounds[c]:bounds[c + 1]])
        total /= world
        out.append([total[2000:].view(3000), total[:2000].view(40, 50)])
    return out


def states_after(spec: str, world: int, steps: int) -> dict[int, dict]:
    """Every rank's engine.state_dict() after ``steps`` steps."""
    saved = {}
    run_engines(spec, world, steps=steps, after_step=lambda r, s, e: saved.__setitem__(r, e.state_dict()))
    return saved


def resume_engines(spec: str, world: int, saved: dict[int, dict], steps, cap_mb: float = 25):
    """Fresh engines (bucket cap ``cap_mb``) load ``saved`` and run ``steps``: per rank, per
    step, the members' results."""
    members = members_of(methods.from_spec(spec))

    def resume(comm):
        engine = Engine(members, lambda: comm, average=True, cap_bytes=int(cap_mb * 2 ** 20), link=SLOW,
                        name="t")
        engine.load_state_dict(saved[comm.rank])
        outs = []
        for step in steps:
            for m in reversed(members):
                engine.add(m.index, grad(comm.rank, step, m))
            outs.append([engine.result(m.index).clone() for m in members])
        return outs
    return LocalWorld(world).run(resume)


def run_like_the_adaptor(spec: str, world: int, steps: int, *, link=SLOW, grad_fn=grad):
    """Engines with external dense buckets, driven as the Horovod adaptor drives them: members
    the engine returns are allreduced by the caller (here LocalWorld's Average) and reported
    back; all add() calls of a step come before any result."""
    method = methods.from_spec(spec)
    members = members_of(method)

    def fn(comm):
        engine = Engine(members, lambda: comm, average=True, cap_bytes=25 * 2 ** 20, link=link,
                        name="t", external_dense=True)
        outs = []
        for step in range(steps):
            external = {}
            for m in reversed(members):
                g = grad_fn(comm.rank, step, m)
                if not engine.add(m.index, g):
                    external[m.index] = comm.allreduce(g, f"horovod.{m.name}", op="average")
            outs.append([engine.external_result(i, external[i].wait()) if i in external
                         else engine.result(i).clone() for i in range(len(members))])
        return outs, engine
    return LocalWorld(world).run(fn)


def check_non_finite_skips(spec: str) -> None:
    """An inf in rank 1's gradient at step 1: NaN for that member on every rank, the step
    skipped everywhere, no trace in the state, and the next step is what a run that never saw
    step 1 computes."""
    spec = spec if "route=" in spec else spec_with(spec, "route='compressed'")

    def poisoned(rank, step, m):
        g = grad(rank, step, m)
        if step == 1 and rank == 1 and m.index == 0:
            g[17] = float("inf")
        return g
    snapshots = {}

    def snap(rank, step, engine):
        snapshots[rank, step] = engine.state_dict()
    results = run_engines(spec, 2, steps=3, grad_fn=poisoned, after_step=snap)
    assert_ranks_agree(results)
    for outs, engine in results:
        assert bool(outs[1][0].isnan().all())                        # the poisoned member: NaN
        assert bool(torch.isfinite(outs[1][1]).all())                # the others: finite
        assert engine.stats.skipped_steps == 1 and engine.step == 2  # step 1 not counted
    for rank in range(2):  # step 1 left no trace in the state
        a, b = snapshots[rank, 0], snapshots[rank, 1]
        assert a["step"] == b["step"] == 1
        for name in a["params"]:
            for key in a["params"][name]:
                assert torch.equal(a["params"][name][key], b["params"][name][key])
    # ... so the poisoned run's step 2 is step 1 of a run that never saw step 1's gradients
    clean = run_engines(spec, 2, steps=2, grad_fn=lambda rank, step, m: grad(rank, 2 * step, m))
    for rank in range(2):
        assert all(same_bits(a, b) for a, b in zip(results[rank][0][2], clean[rank][0][1]))
