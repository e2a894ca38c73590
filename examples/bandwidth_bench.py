"""Step time of Horovod (or PyTorch DDP) training with and without gradient compression, over
whatever link the ranks talk through (``ci/bandwidth_bench.sh`` runs it inside a network
namespace whose loopback is rate-limited with ``tc``).  Synthetic data: this measures time, not
accuracy.

    horovodrun -np 2 -H localhost:2 --gloo python examples/bandwidth_bench.py --compression topk:ratio=0.01
    torchrun --nproc_per_node 2 examples/bandwidth_bench.py --framework ddp --compression torch-powersgd:rank=4

Per run, rank 0 prints one JSON line (and writes it to ``--out``) with

* ``step_s``: median wall time of a training step (zero_grad, forward, backward, ``step()``
  of ``hvd.DistributedOptimizer``, which waits for the gradients) after ``--warmup`` steps;
* ``compute_s``: median time of the same step with a plain optimizer on a copy of the model
  (no Horovod, no compression), timed in the same process: each iteration runs one of these,
  one codec pass and one distributed step, so all three see the same background load;
* ``codec_s``: encode (with error feedback when the method uses it) + decode of two workers'
  payloads of every compressed tensor, timed alone, for hvd_compress methods;
* ``bytes_sent_per_rank``: bytes each rank puts on the wire per step, from
  ``compression.stats()`` (hvd_compress), or what a ring allreduce of the dense gradient sends
  (fp32 for ``none``, fp16 for ``hvd-fp16`` / ``torch-fp16``, PyTorch PowerSGD's factors and
  uncompressed tensors for ``torch-powersgd:rank=R``);
* ``link_bytes_per_step``: bytes that crossed the rate limiter per step, read from
  ``tc -s qdisc show dev <--link-dev>`` around the timed steps (headers and ACKs included),
  when ``--link-dev`` is given and ``tc`` can read it.

``--report RESULTS.jsonl --markdown FILE`` turns collected JSON lines into the tables of
``docs/bandwidth.md`` (no Horovod needed for that).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per rank (the C codecs use OpenMP)

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units: with the defaults (1024 inputs, 3 x 2048, 10
    outputs) 10.5M parameters, 42 MB of fp32 gradient, ~2 GFLOP per step at batch 32."""

    def __init__(self, in_features: int = 1024, width: int = 2048, depth: int = 3, classes: int = 10) -> None:
        super().__init__()
        sizes = [in_features] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.head = nn.Linear(sizes[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


def resnet50_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of torchvision's ResNet-50 parameters, in its registration order: 161
    tensors, 25,557,032 parameters (conv weights, batch-norm weights and biases, the classifier)."""
    shapes = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    inplanes = 64
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for block in range(blocks):
            prefix = f"layer{layer}.{block}"
            for i, (out, inp, k) in enumerate([(planes, inplanes, 1), (planes, planes, 3),
                                               (planes * 4, planes, 1)], start=1):
                shapes += [(f"{prefix}.conv{i}.weight", (out, inp, k, k)),
                           (f"{prefix}.bn{i}.weight", (out,)), (f"{prefix}.bn{i}.bias", (out,))]
            if block == 0:
                shapes += [(f"{prefix}.downsample.0.weight", (planes * 4, inplanes, 1, 1)),
                           (f"{prefix}.downsample.1.weight", (planes * 4,)),
                           (f"{prefix}.downsample.1.bias", (planes * 4,))]
            inplanes = planes * 4
    return shapes + [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]


class ResNet50Shapes(nn.Module):
    """ResNet-50's 161 parameter tensors with a deliberately cheap forward, so that the gradient
    exchange, not the compute, dominates a step (the many-tensor case where per-tensor overheads
    show).  logits = x[:, :10] * 1e-6 * sum_i <p_i, p_i>: every gradient is dense (2e-6 c p_i for
    a per-step scalar c), forward + backward cost a few passes over the parameters."""

    def __init__(self, in_features: int = 16) -> None:
        super().__init__()
        self.names = []
        for name, shape in resnet50_shapes():
            attr = name.replace(".", "_")
            self.names.append(attr)
            # (torchvision's default init is not needed: magnitudes only shape the gradients)
            self.register_parameter(attr, nn.Parameter(torch.randn(shape) * (2.0 / shape[-1]) ** 0.5))
        self.in_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = sum((p * p).sum() for p in self.parameters())
        return x[:, :10] * (1e-6 * total)


def make_model(args: argparse.Namespace) -> nn.Module:
    if args.model == "resnet50":
        return ResNet50Shapes(args.in_features)
    return MLP(args.in_features, args.width, args.depth)


def compression_from_spec(spec: str):
    """Same convention as examples/train_digits.py: Horovod's ``none``/``hvd-fp16``, or any
    hvd_compress spec."""
    import horovod.torch as hvd
    if spec == "none":
        return hvd.Compression.none
    if spec == "hvd-fp16":
        return hvd.Compression.fp16
    import hvd_compress
    return hvd_compress.from_spec(spec)


def distributed(args: argparse.Namespace, model: nn.Module, momentum: float):
    """(module to call, optimizer, what reports bytes/plan or None, dense bytes one rank's
    gradient puts into the allreduce when nothing reports them) for ``--framework``."""
    from common import ddp_hook, torch_powersgd_bytes
    from hvd_compress.methods import parse_spec
    params = sum(p.numel() for p in model.parameters())
    if args.framework == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, bucket_cap_mb=args.ddp_bucket_mb)
        compression = ddp_hook(net, args.compression)
        owns = getattr(getattr(compression, "compressor", None), "owns_momentum", False)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.0 if owns else momentum)
        name, kwargs = parse_spec(args.compression)
        dense = torch_powersgd_bytes(model, kwargs.get("rank", 1)) if name == "torch-powersgd" else \
            params * (2 if args.compression == "torch-fp16" else 4)
        return net, optimizer, compression, dense
    import horovod.torch as hvd
    compression = compression_from_spec(args.compression)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=args.lr, momentum=momentum),
                                         named_parameters=model.named_parameters(), compression=compression)
    return model, optimizer, compression, params * (2 if compression is hvd.Compression.fp16 else 4)


def link_bytes(dev: str | None) -> int | None:
    """Bytes the root qdisc of ``dev`` has sent so far (``tc -s qdisc``), or None."""
    if not dev or shutil.which("tc") is None:
        return None
    try:
        text = subprocess.run(["tc", "-s", "qdisc", "show", "dev", dev], capture_output=True,
                              text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"Sent (\d+) bytes", text)
    return int(match.group(1)) if match else None


#: time.perf_counter() at the start of the last train_step, after its forward, its backward and at its end
MARKS: list[float] = []


def train_step(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    MARKS[:] = [start, forward, backward, time.perf_counter()]
    return MARKS[3] - start


class CodecTimer:
    """Encode (with error feedback when the method uses it) + decode of two workers' payloads of
    every tensor the compressor would compress, on random gradients of the parameters' sizes:
    the codec's share of a step, timed alone.  Does nothing for Horovod's own compressions."""

    def __init__(self, compression, model: nn.Module) -> None:
        compression = getattr(compression, "compressor", compression)    # DDP: the hook's state
        self.codec = getattr(compression, "codec", None)
        if self.codec is None:
            return
        if hasattr(self.codec, "with_shared_key"):   # random-k, sketch: a mask every rank shares
            from hvd_compress.codecs.base import RandomKey
            self.codec = self.codec.with_shared_key(RandomKey(seed=2 ** 64 - 1))
        self.seed = compression.seed
        sizes = [p.numel() for p in model.parameters() if p.numel() >= compression.min_numel]
        self.grads = [torch.randn(n) * 1e-3 for n in sizes]
        self.residuals = [torch.zeros(n) if compression.error_feedback else None for n in sizes]

    def __call__(self, step: int) -> float | None:
        if self.codec is None:
            return None
        from hvd_compress.codecs.base import RandomKey
        start = time.perf_counter()
        for i, (g, r) in enumerate(zip(self.grads, self.residuals)):
            payload = self.codec.encode(g, RandomKey(self.seed, step, i), residual=r)
            if getattr(self.codec, "summable", False):
                continue  # Horovod's allreduce sums it; decoding is a cast
            self.codec.decode_accumulate([payload, payload], torch.zeros(g.numel()))
        return time.perf_counter() - start


def benchmark(args: argparse.Namespace) -> dict:
    """Warm-up, then iterations of (compute-only step, codec pass, distributed step), so that the
    three are timed under the same background load; ranks stop together when rank 0 has at least
    ``--steps`` distributed steps and ``--min-time`` seconds of them (or ``--max-steps``)."""
    from common import init_world
    world = init_world(args)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed + world.rank)
    model = make_model(args)
    x = torch.randn(args.batch_size, args.in_features)
    y = torch.randint(0, 10, (args.batch_size,))
    params = sum(p.numel() for p in model.parameters())
    # DGC's momentum correction moves the momentum into the compressor (as in train_digits.py).
    momentum = 0.0 if "dgc" in args.compression else 0.9

    # Compute only: the same step with a plain optimizer on a copy of the model (no framework).
    local = copy.deepcopy(model)
    local_opt = torch.optim.SGD(local.parameters(), lr=args.lr, momentum=momentum)
    net, optimizer, compression, dense = distributed(args, model, momentum)
    codec_pass = CodecTimer(compression, model)
    warmup = []      # the warm-up's distributed steps (link measurement, trial), reported apart
    for i in range(args.warmup):
        train_step(local, local_opt, x, y)
        codec_pass(i)
        warmup.append(train_step(net, optimizer, x, y))
    # hvd_compress measures the link at its first step and may then time compressed against
    # uncompressed steps: warm up until its plan is final, so that the timed steps are its choice.
    extra = 0
    while not getattr(compression, "settled", True) and extra < 12:
        warmup.append(train_step(net, optimizer, x, y))
        extra += 1
    stats0 = compression.stats() if hasattr(compression, "stats") else None
    timings0 = compression.timings() if hasattr(compression, "timings") else None
    world.barrier()
    link0 = link_bytes(args.link_dev) if world.rank == 0 else None
    load0 = os.getloadavg()[0]
    compute, codec, steps = [], [], []
    while True:
        compute.append(train_step(local, local_opt, x, y))
        codec.append(codec_pass(args.warmup + len(steps)))
        # the ranks' codec passes end at different times: without a barrier the first to finish
        # would wait out the difference inside the distributed step's first collective
        world.barrier()
        steps.append(train_step(net, optimizer, x, y))
        more = len(steps) < args.max_steps and (len(steps) < args.steps or sum(steps) < args.min_time)
        if not world.agree(more):
            break
    link1 = link_bytes(args.link_dev) if world.rank == 0 else None
    n = len(steps)

    collectives = None
    if stats0 is not None:
        stats1 = compression.stats()
        sent = (stats1["bytes_sent"] - stats0["bytes_sent"]) / n
        received = (stats1["bytes_received"] - stats0["bytes_received"]) / n
        collectives = (stats1["collectives"] - stats0["collectives"]) / n
    else:
        # ring allreduce: each rank sends and receives 2 (P - 1)/P of the tensor
        sent = received = 2 * (world.size - 1) / world.size * dense
    per_rank = world.gather([sent, received])
    # The step breakdown: seconds per step in each part of hvd_compress's work (rank 0's view)
    breakdown = None
    if timings0 is not None:
        timings1 = compression.timings()
        breakdown = {part: (timings1[part] - timings0[part]) / n for part in timings1}
        # the last timed step: its forward / backward / step() boundaries and the engine's events
        origin = MARKS[0]
        marks = [[MARKS[1] - origin, "forward done", ""], [MARKS[2] - origin, "backward done", ""],
                 [MARKS[3] - origin, "step() done", ""]]
        events = [[t - origin, what, where] for t, what, where in compression.timeline()]
        breakdown["timeline"] = [[round(t, 4), what, where] for t, what, where in sorted(marks + events)]
    return {
        "bench": "bandwidth", "framework": args.framework, "compression": args.compression,
        "rate": args.rate_label, "workers": world.size, "model": args.model,
        "tensors": len(list(model.parameters())),
        "params": params, "dense_bytes": params * 4, "collectives_per_step": collectives,
        "plan": compression.plan() if hasattr(compression, "plan") else None,
        "batch_size": args.batch_size, "warmup": args.warmup + extra, "warmup_s_all": warmup,
        "warmup_s": sum(warmup), "steps": n,
        "step_s": statistics.median(steps), "step_s_all": steps,
        "compute_s": statistics.median(compute), "compute_s_all": compute,
        "codec_s": None if codec[0] is None else statistics.median(codec),
        "codec_s_all": None if codec[0] is None else codec,
        "breakdown_s": breakdown,
        "bytes_sent_per_rank": [r[0] for r in per_rank],
        "bytes_received_per_rank": [r[1] for r in per_rank],
        # includes the few bytes of the per-step stop broadcast
        "link_bytes_per_step": None if link0 is None or link1 is None else (link1 - link0) / n,
        "torch_threads": torch.get_num_threads(),
        # 1-minute load average of the machine at the start and end of the timed steps
        "loadavg": [load0, os.getloadavg()[0]],
    }


# ---------------------------------------------------------------------------------------------
# link calibration: TCP goodput over 127.0.0.1, one stream and two at once


def _tcp_goodput(streams: int, seconds: float) -> float:
    """Bits/s of payload that ``streams`` concurrent TCP connections over 127.0.0.1 deliver."""
    import socket
    import threading
    received = [0] * streams
    deadline = [0.0]

    def serve(sock: socket.socket, i: int) -> None:
        conn, _ = sock.accept()
        with conn:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    return
                received[i] += len(data)

    def send(port: int) -> None:
        chunk = b"\0" * (1 << 16)
        with socket.create_connection(("127.0.0.1", port)) as conn:
            while time.perf_counter() < deadline[0]:
                conn.sendall(chunk)

    listeners = []
    for _ in range(streams):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        listeners.append(sock)
    servers = [threading.Thread(target=serve, args=(s, i)) for i, s in enumerate(listeners)]
    for t in servers:
        t.start()
    start = time.perf_counter()
    deadline[0] = start + seconds
    senders = [threading.Thread(target=send, args=(s.getsockname()[1],)) for s in listeners]
    for t in senders:
        t.start()
    for t in senders + servers:
        t.join()
    elapsed = time.perf_counter() - start
    for s in listeners:
        s.close()
    return 8 * sum(received) / elapsed


def calibrate(rate_label: str, seconds: float, link_dev: str | None) -> dict:
    before = link_bytes(link_dev)
    one = _tcp_goodput(1, seconds)
    two = _tcp_goodput(2, seconds)
    after = link_bytes(link_dev)
    return {"bench": "link", "rate": rate_label, "goodput_1_stream_bits": one,
            "goodput_2_streams_bits": two, "tc_bytes": None if before is None else after - before}


# ---------------------------------------------------------------------------------------------
# report

_RATE_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def rate_bits(label: str) -> float | None:
    """``100mbit`` -> 1e8 bits/s; ``unlimited`` (or anything else) -> None."""
    match = re.fullmatch(r"([\d.]+)\s*(kbit|mbit|gbit)", label.strip().lower())
    return float(match.group(1)) * _RATE_UNITS[match.group(2)] if match else None


def ideal_s(r: dict, compute_s: float | None = None) -> float | None:
    """compute + (bytes every rank sends) / R: the loopback qdisc carries both directions, so the
    link moves the sum over ranks (see docs/bandwidth.md for the derivation)."""
    bits = rate_bits(r["rate"])
    if bits is None:
        return None
    compute = r["compute_s"] if compute_s is None else compute_s
    return compute + 8 * sum(r["bytes_sent_per_rank"]) / bits


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if n < 10 * scale else 1}f} {unit}"
    return f"{n:.0f} B"


def _rate_tables(results: list[dict]) -> list[str]:
    lines = []
    for workers, rate in dict.fromkeys((r["workers"], r["rate"]) for r in results):
        rows = [r for r in results if r["rate"] == rate and r["workers"] == workers]
        base = next((r for r in rows if r["compression"] == "none"), None)
        fp16 = next((r for r in rows if r["compression"] in ("hvd-fp16", "torch-fp16")), None)
        lines += [f"### {workers} ranks, {rate}", "",
                  f"| compression | steps | step s | vs none | vs {fp16['compression'] if fp16 else 'fp16'} "
                  "| bytes sent / rank / step "
                  "| collectives / step | compute s | codec s | measured / ideal | fastest step s | load avg |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            ideal = ideal_s(r)
            coll = r.get("collectives_per_step")
            lines.append("| " + " | ".join([
                f"`{r['compression']}`", str(r["steps"]), f"{r['step_s']:.3f}",
                f"{base['step_s'] / r['step_s']:.2f}x" if base else "-",
                f"{fp16['step_s'] / r['step_s']:.2f}x" if fp16 else "-",
                _fmt_bytes(max(r["bytes_sent_per_rank"])),
                ("DDP's" if r.get("framework") == "ddp" else "Horovod's") if coll is None else f"{coll:g}",
                f"{r['compute_s']:.3f}",
                f"{r['codec_s']:.3f}" if r.get("codec_s") is not None else "-",
                f"{r['step_s'] / ideal:.2f}" if ideal is not None else "-",
                f"{min(r['step_s_all']):.3f}",
                "-" if "loadavg" not in r else f"{r['loadavg'][0]:.1f} - {r['loadavg'][1]:.1f}",
            ]) + " |")
        lines.append("")
        plans = [r for r in rows if r.get("plan")]
        if plans:
            lines += ["<details><summary>plans (what the compressor chose, and why)</summary>", "", "```"]
            for r in plans:
                lines += [f"--- {r['compression']}", r["plan"]]
            lines += ["```", "", "</details>", ""]
    return lines


def _breakdown_tables(results: list[dict]) -> list[str]:
    """Where a step goes, per configuration with a rate limit: the engine's parts (from its
    timings), compute, and the rest (the framework's own work, its own allreduces' waits),
    beside the ideal's wire time."""
    rows = [r for r in results if r.get("breakdown_s") and rate_bits(r["rate"])]
    if not rows:
        return []
    lines = ["| ranks, rate | compression | step s | compute | hook | encode | wait (idle) | decode | other "
             "| wire (ideal) | ideal | step / ideal | warm-up s (steps) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b, ideal = r["breakdown_s"], ideal_s(r)
        wire = ideal - r["compute_s"]
        other = r["step_s"] - r["compute_s"] - sum(b[part] for part in ("hook", "encode", "wait", "decode"))
        lines.append("| " + " | ".join([
            f"{r['workers']}, {r['rate']}", f"`{r['compression']}`", f"{r['step_s']:.3f}",
            f"{r['compute_s']:.3f}", *(f"{b[part]:.3f}" for part in ("hook", "encode", "wait", "decode")),
            f"{other:.3f}", f"{wire:.3f}", f"{ideal:.3f}", f"{r['step_s'] / ideal:.2f}",
            f"{r['warmup_s']:.2f} ({r['warmup']})" if "warmup_s" in r else "-"]) + " |")
    return lines


#: the speed targets: (spec, workers, rate, compared with, minimum speed-up)
TARGETS = [("terngrad", 2, "1gbit", "hvd-fp16", 4.5), ("topk:ratio=0.01", 2, "1gbit", "hvd-fp16", 7.0),
           ("qsgd:bits=4", 2, "1gbit", "hvd-fp16", 3.0),
           # DDP: against PyTorch's own hooks (fp16; PowerSGD at the same rank: at least as fast)
           ("terngrad", 2, "1gbit", "torch-fp16", 4.0), ("topk:ratio=0.01", 2, "1gbit", "torch-fp16", 6.0),
           ("powersgd:rank=1", 2, "1gbit", "torch-powersgd:rank=1", 1.0),
           ("powersgd:rank=4", 2, "1gbit", "torch-powersgd:rank=4", 1.0)]
#: the default never above this factor of uncompressed on the fast link (2 and 4 ranks)
FAST_LINK_LIMIT = 1.10
#: the Horovod targets' compressors within this factor of their ideal step
IDEAL_LIMIT = 1.3
#: fused against layer-wise (bucket_cap_mb=0) at 1 Gbit/s
FUSED_MIN = 1.5


def _targets(results: list[dict]) -> list[str]:
    def find(spec, workers, rate):
        return next((r for r in results if r["compression"] == spec and r["workers"] == workers
                     and r["rate"] == rate), None)
    lines = ["| target | measured | wanted | met? |", "|---|---:|---:|---|"]
    baselines = {r["compression"] for r in results}
    for spec, workers, rate, against, want in TARGETS:
        if against not in baselines:     # the other framework's targets
            continue
        r, b = find(spec, workers, rate), find(against, workers, rate)
        if r is None or b is None:
            lines.append(f"| `{spec}` vs `{against}`, {workers} ranks, {rate} | not run | {want}x | - |")
            continue
        got = b["step_s"] / r["step_s"]
        lines.append(f"| `{spec}` vs `{against}`, {workers} ranks, {rate} | {got:.2f}x | {want}x | "
                     f"{'yes' if got >= want else f'no (missed by {want / got:.2f}x)'} |")
        if against == "hvd-fp16" and ideal_s(r):
            ratio = r["step_s"] / ideal_s(r)
            lines.append(f"| `{spec}`, {workers} ranks, {rate}: step / ideal | {ratio:.2f} | <= {IDEAL_LIMIT} | "
                         f"{'yes' if ratio <= IDEAL_LIMIT else 'no'} |")
    for r in results:
        if r["rate"] != "unlimited" or r["compression"] in ("none", "hvd-fp16", "torch-fp16") \
                or "route=" in r["compression"] or "bucket_cap_mb=0" in r["compression"]:
            continue
        b = find("none", r["workers"], "unlimited")
        if b is None:
            continue
        ratio = r["step_s"] / b["step_s"]
        lines.append(f"| default `{r['compression']}`, {r['workers']} ranks, fast link: step / uncompressed step | "
                     f"{ratio:.2f} | <= {FAST_LINK_LIMIT} | {'yes' if ratio <= FAST_LINK_LIMIT else 'no'} |")
    for r in results:
        spec = r["compression"]
        if r["rate"] != "1gbit" or not spec.endswith("bucket_cap_mb=0"):
            continue
        fused = find(spec.replace(",bucket_cap_mb=0", "").replace(":bucket_cap_mb=0", ""), r["workers"], "1gbit")
        if fused is None:
            continue
        got = r["step_s"] / fused["step_s"]
        lines.append(f"| fused `{fused['compression']}` vs layer-wise, {r['workers']} ranks, 1gbit | {got:.2f}x | "
                     f">= {FUSED_MIN}x | {'yes' if got >= FUSED_MIN else f'no (missed by {FUSED_MIN / got:.2f}x)'} |")
    return lines


def _links(links: list[dict]) -> list[str]:
    lines = ["| rate | qdisc on lo | goodput, 1 TCP stream | goodput, 2 streams at once (total) |",
             "|---|---|---:|---:|"]
    for link in links:
        lines.append(f"| {link['rate']} | `{link.get('tc') or 'none (noqueue)'}` | "
                     f"{link['goodput_1_stream_bits'] / 1e6:.1f} Mbit/s | {link['goodput_2_streams_bits'] / 1e6:.1f} Mbit/s |")
    return lines


def _machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores ({model})"


NOTES_MARKER = "<!-- Everything below this line is kept when ci/bandwidth_bench.sh rewrites the file. -->"


def markdown(records: list[dict], command: str, commit: str, notes: str = "", when: float | None = None) -> str:
    results = [r for r in records if r.get("bench") == "bandwidth"]
    links = [r for r in records if r.get("bench") == "link"]
    skipped = [r for r in records if r.get("bench") == "skipped"]
    failed = [r for r in records if r.get("bench") == "failed"]
    first = results[0] if results else {}
    kind = ("ResNet-50's parameter shapes with a cheap forward" if first.get("model") == "resnet50"
            else "MLP")
    model = (f"{kind}, {first.get('tensors', '?')} tensors, {first.get('params', 0):,} parameters "
             f"({first.get('dense_bytes', 0) / 1e6:.1f} MB of fp32 gradient), batch {first.get('batch_size')} "
             "per rank, synthetic data") if results else "-"
    ddp = first.get("framework") == "ddp"
    ranks = ("PyTorch DDP ranks (gloo, `torchrun`; PyTorch's PowerSGD hook with one DDP bucket, the others "
             "with DDP's default 25 MB)") if ddp else "Horovod ranks (Gloo, `horovodrun`)"
    lines = [
        "# Bandwidth-limited step time" + (", PyTorch DDP" if ddp else ""), "",
        f"Generated by `ci/bandwidth_bench.sh` on {time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(when))}, commit `{commit}`, as root "
        "(it needs `ip netns` and `tc`):", "",
        f"    {command}", "",
        f"Machine: {_machine()}, shared with other jobs, so the timings are noisy (same-run comparisons only). "
        f"{' or '.join(str(n) for n in sorted({r['workers'] for r in results}))} {ranks}, 1 torch thread "
        "and `OMP_NUM_THREADS=1` per rank. "
        f"Model: {model}. Each run: warm-up step(s), then iterations of one compute-only step, one "
        "codec pass and one distributed step (so the three see the same background load); medians over "
        "the iterations (`steps` column; every step's time is in the raw results).", "",
        "## Link", "",
        "The ranks run in a private network namespace (`ip netns add`), whose only interface is `lo`, "
        "MTU set to 1500 (Ethernet framing, so TCP/IP headers cost what they cost on a real link: a 1514-byte "
        "frame per 1448 payload bytes, ~4.6%) and a token bucket filter as its root qdisc. `burst` is far above "
        "the 1514-byte frame (and tbf splits lo's GSO super-packets to fit). Measured TCP goodput through it:", "",
        *_links(links), "",
        "Every packet between the two ranks leaves through the same `lo` qdisc, whichever direction it goes: "
        "two streams share the rate (last column), the link is **half-duplex at R in total**.", "",
        "## Ideal step time", "",
        "Let `s_r` be the bytes rank r sends per step (what `compression.stats()['bytes_sent']` counts; "
        "for the framework's own `none` and fp16 (and PyTorch's PowerSGD: its factors and uncompressed tensors), "
        "the ring allreduce's 2 (P-1)/P of what it allreduces). Every "
        "packet between the ranks leaves through the one `lo` qdisc, so the link carries the sum over ranks "
        "and, with rate R (bits/s):", "",
        "    ideal = compute + 8 (s_0 + ... + s_{P-1}) / R", "",
        "`compute` is forward + backward + optimizer step with a plain optimizer, measured in the same process. "
        "Not in the ideal: the codec's encode/decode (column `codec s`, timed alone), TCP/IP headers (~4.6% "
        f"plus ACKs) and {'DDP' if ddp else 'Horovod'}'s own work. Undefined without a rate limit.", "",
        "## Results", "",
        "`step s`, `compute s`, `codec s`: medians. `bytes sent / rank / step`: the largest `s_r`. "
        "`collectives / step`: started by hvd_compress (" + ("DDP's and PyTorch's hooks' own collectives are "
        "not counted" if ddp else "Horovod's own allreduces of uncompressed tensors and of the one-element probes "
        "are not counted") + "). `load avg`: the machine's 1-minute load average at "
        "the start and end of the timed steps (2 cores: above 2, ranks were competing for them). The "
        "hvd_compress rows use the defaults (the link measured, the plan timed against uncompressed steps "
        "where the model is not decisive) after a warm-up that lasts until the plan is final.", "",
        *_rate_tables(results),
        *(["## Where a step goes", "",
           "Seconds per step (medians of the step and compute columns, means of the parts over the timed "
           "steps, rank 0). `hook`, `encode`, `wait`, `decode` are hvd_compress's own timings "
           "(`compression.timings()`): time in the backward hooks apart from encoding; launching a bucket "
           "(prepare, finiteness check, encode with error feedback, pack, start the collective); blocked "
           "waiting for a collective or for the step header behind them (the rank idle on the wire); "
           "decoding, `after_decode`, checks and write-back. `other` = step - compute - those parts: the framework's own work (its allreduce "
           "of the small tensors, negotiation, waiting for its own handles) and "
           "scheduling (it can come out slightly negative: `step` and `compute` are medians of different "
           "steps). `wire (ideal)` = 8 (s_0 + ... + s_{P-1}) / R. `warm-up`: the distributed steps "
           "before the timed ones (the link measured, the trial), in total, apart from the steady state.",
           "", *_breakdown_tables(results), ""]
          if _breakdown_tables(results) else []),
        "## Targets", "",
        "Judged on the medians.", "",
        *_targets(results), "",
    ]
    if skipped:
        lines += ["Not run: " + ", ".join(f"`{r['compression']}` ({r['reason']})" for r in skipped) + ".", ""]
    if failed:
        lines += ["Failed: " + ", ".join(f"`{r['compression']}` at {r['rate']} ({r['reason']})" for r in failed) + ".", ""]
    lines += ["## Raw results", "", "<details><summary>JSON lines</summary>", "", "```"]
    lines += [json.dumps(r) for r in records]
    lines += ["```", "", "</details>", "", NOTES_MARKER, notes.rstrip("\n"), ""]
    return "\n".join(lines)


def write_markdown(jsonl: str, path: str, command: str, commit: str) -> None:
    notes = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if NOTES_MARKER in old:
            notes = old.split(NOTES_MARKER, 1)[1].strip("\n")
    with open(jsonl) as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(path, "w") as f:  # dated by the results file (the end of the run)
        f.write(markdown(records, command, commit, notes, os.path.getmtime(jsonl)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--framework", choices=("horovod", "ddp"), default="horovod")
    parser.add_argument("--ddp-bucket-mb", type=float, default=25.0,
                        help="DDP's bucket_cap_mb (PyTorch's PowerSGD hook over gloo needs one bucket: "
                             "see docs/ddp.md)")
    parser.add_argument("--compression", default="none",
                        help="none, hvd-fp16 (Horovod), torch-fp16 / torch-powersgd:rank=R (DDP), or an "
                             "hvd_compress spec (topk:ratio=0.01, terngrad, qsgd:bits=4, fp16)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (at least; after warm-up)")
    parser.add_argument("--min-time", type=float, default=0.0,
                        help="go on past --steps until the timed steps add up to this many seconds")
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--model", choices=("mlp", "resnet50"), default="mlp",
                        help="mlp: --depth x --width; resnet50: ResNet-50's 161 parameter shapes, cheap compute")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate-label", default="unlimited",
                        help="the link's rate as tc spells it (100mbit, 1gbit) or 'unlimited'; recorded and "
                             "used for the ideal time")
    parser.add_argument("--link-dev", help="read this device's qdisc byte counter around the timed steps (lo)")
    parser.add_argument("--out", help="rank 0 appends its JSON line to this file")
    parser.add_argument("--calibrate", type=float, metavar="SECONDS",
                        help="no training: measure TCP goodput over 127.0.0.1 (1 and 2 streams, SECONDS each), "
                             "append a JSON line to --out and exit")
    parser.add_argument("--tc", help="with --calibrate: the qdisc, recorded in the JSON line")
    parser.add_argument("--report", metavar="JSONL", help="no training: write the markdown of collected JSON lines "
                                                          "to --markdown and exit")
    parser.add_argument("--markdown", default="docs/bandwidth.md")
    parser.add_argument("--command", default="bash ci/bandwidth_bench.sh", help="with --report: recorded")
    parser.add_argument("--commit", default="?", help="with --report: recorded")
    args = parser.parse_args()

    if args.report:
        write_markdown(args.report, args.markdown, args.command, args.commit)
        return
    if args.calibrate:
        line = json.dumps(dict(calibrate(args.rate_label, args.calibrate, args.link_dev), tc=args.tc))
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
        return
    result = benchmark(args)
    from common import WORLD
    if WORLD.rank == 0:
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    WORLD.close()


if __name__ == "__main__":
    sys.exit(main())
