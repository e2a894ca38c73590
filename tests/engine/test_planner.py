"""The planner says what it decided: a log line per plan on rank 0, a warning when compression
is switched off, forced routes labelled as such, implausible link measurements replaced."""
from __future__ import annotations

import logging

from hvd_compress import methods
from hvd_compress.engine import cost
from hvd_compress.engine.plan import plan_bucket
from hvd_compress.routes.base import Link, Speed

from engine_helpers import members_of, run_engines, run_like_the_adaptor
from hvd_compress.engine.buckets import assign_buckets

FAST = Link.gbps(100, latency_us=5)


def test_switched_off_compression_is_a_warning_on_rank_0(monkeypatch, caplog):
    """A measured link fast enough that TernGrad would not pay: the settled plan sends
    everything uncompressed, and rank 0 says so (once) at WARNING, which Python's logging
    shows without any configuration; the first plan (assumed link) is an INFO line."""
    monkeypatch.setattr(cost, "measure_link", lambda comm, device, tag, world=None: (FAST, 1e12))
    caplog.set_level(logging.INFO, logger="hvd_compress")
    results = run_like_the_adaptor("terngrad", 2, 4, link=None)
    assert results[0][1].plan.compressed_fraction == 0
    records = [r for r in caplog.records if r.name == "hvd_compress"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "sends most of the gradient uncompressed" in warnings[0] and "compression would not pay" in warnings[0]
    assert "route='compressed'" in warnings[0] and "100 Gbit/s" in warnings[0]
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "assumed until measured" in infos[0], infos


def test_a_compressing_plan_is_one_info_line(caplog):
    caplog.set_level(logging.INFO, logger="hvd_compress")
    run_like_the_adaptor("terngrad:route='compressed'", 2, 3)    # declared link: no trial
    lines = [r.getMessage() for r in caplog.records if r.name == "hvd_compress"]
    assert len(lines) == 1 and "buckets compressed" in lines[0] and "(declared)" in lines[0], lines
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "hvd_compress")


def test_forced_routes_are_labelled_forced_even_when_predicted_slower():
    for route, label in (("compressed", "fastest compressed (forced)"), ("allgather", "forced")):
        method = methods.from_spec(f"terngrad:route='{route}'")
        bucket = next(b for b in assign_buckets(members_of(method), 25 * 2 ** 20) if not b.small)
        plan = plan_bucket(bucket, 2, FAST, Speed(), 0)
        assert plan.why.startswith(label) and "predicted slower than dense" in plan.why, plan.why
    bucket = next(b for b in assign_buckets(members_of(methods.TernGrad()), 25 * 2 ** 20) if not b.small)
    assert plan_bucket(bucket, 2, Link.gbps(0.1), Speed(), 0).why == "fastest"


def test_uncompressed_buckets_have_one_name_whoever_sends_them():
    """DGC's dense buckets go through the engine, TernGrad's through Horovod: both are 'dense'."""
    for spec in ("dgc", "terngrad"):
        results = run_like_the_adaptor(spec, 2, 1)
        table = str(results[0][1].plan)
        assert " horovod " not in table
        small = [line for line in table.splitlines() if "below min_numel" in line]
        assert small and all(" dense " in line for line in small), table


def test_implausible_link_measurements_are_measured_again_then_replaced(monkeypatch):
    """Faster than memory copies, or latency <= 0: measured once more, then the assumed link."""
    answers = iter([(Link(1e-5, 1e15), 1e10), (Link(20e-6, 5e8), 1e10)])
    monkeypatch.setattr(cost, "measure_link", lambda comm, device, tag, world=None: next(answers))
    link, source = cost.measure_link_checked(None, None, "t")
    assert link == Link(20e-6, 5e8) and source.startswith("measured, again after an implausible 8e+06 Gbit/s")
    answers = iter([(Link(-1e-6, 5e8), 1e10), (Link(0.0, 5e8), 1e10)])
    link, source = cost.measure_link_checked(None, None, "t")
    assert link == cost.ASSUMED and "implausible twice" in source and source.startswith("assumed")


def test_the_real_measurement_is_plausible_between_threads():
    from hvd_compress.engine.local import LocalWorld
    import torch
    results = LocalWorld(2).run(lambda comm: cost.measure_link_checked(comm, torch.device("cpu"), "t"))
    assert results[0] == results[1]             # every number was agreed across ranks


def test_device_payloads_are_planned_at_their_capacity():
    """On a device top-k's payloads go at their fixed capacity (floor(1.3 k) entries, padding
    included): the plan counts those bytes there, the exact entries on the host."""
    method = methods.from_spec("topk:ratio=0.01")
    bucket, = [b for b in assign_buckets(members_of(method, [(30_000,), (20_000,)]), 25 << 20) if not b.small]
    codec = method.codec_at(0, 2)
    host = plan_bucket(bucket, 2, Link.gbps(1), Speed(), 0)
    device = plan_bucket(bucket, 2, Link.gbps(1), Speed(), 0, padded=True)
    assert host.payload_bytes == 6 * (codec.k(30_000) + codec.k(20_000)) == 6 * 500
    assert device.payload_bytes == 6 * (codec.capacity(30_000) + codec.capacity(20_000)) == 6 * 650


def test_the_engine_plans_device_payloads_from_the_second_step():
    """The first step shows the gradients are on a device (the emulated CUDA path): from the
    second step on the plan counts top-k's padded payloads; on the host it never does."""
    spec = "topk:ratio=0.01,route='allgather'"
    for cuda_path in (False, True):
        seen = {}

        def record(rank, step, engine):
            compressed = next(b for b in engine.plan.buckets if not b.bucket.small)
            codec = compressed.bucket.method.codec
            sizes = [seg.numel for seg in compressed.bucket.segments("tensor")]
            seen[rank, step] = (engine.plan.padded, compressed.payload_bytes,
                                6 * sum(map(codec.k, sizes)), 6 * sum(map(codec.capacity, sizes)))
        run_engines(spec, 2, steps=3, cuda_path=cuda_path, after_step=record)
        for (rank, step), (padded, planned, exact, capacity) in seen.items():
            assert padded == (cuda_path and step > 0)
            assert planned == (capacity if padded else exact) and capacity > exact
