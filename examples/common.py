"""What the example training scripts share: the ``--compression`` spec, the optimizer set-up
Horovod's examples use, wire-byte accounting, and the progress bar on rank 0."""
from __future__ import annotations

import argparse
import json
import sys

import torch

import horovod.torch as hvd


def add_common_args(parser: argparse.ArgumentParser, *, lr: float, epochs: int, batch_size: int) -> None:
    parser.add_argument("--compression", default="none",
                        help="none, hvd-fp16 (Horovod's), or an hvd_compress spec: terngrad, "
                             "qsgd:bits=4, fp16, topk:ratio=0.01, dgc:ratio=0.001,warmup_steps=100; "
                             "or an averaging wrapper: localsgd:period=4, delayed:delay=2 (optionally "
                             "with compression='qsgd:bits=4', and delta=True for localsgd)")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size, help="per worker")
    parser.add_argument("--lr", type=float, default=lr, help="per worker; scaled by the world size")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--warmup-epochs", type=float, default=2,
                        help="ramp the learning rate from lr to lr * workers over these epochs")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", help="write the run's metrics as JSON here (rank 0)")
    parser.add_argument("--no-progress", action="store_true")


def compression_from_spec(spec: str):
    """Horovod's built-in ``none`` / ``hvd-fp16``, or any :func:`hvd_compress.from_spec` spec.

    These examples study what compression does to training, on whatever link the ranks share
    (often one machine's loopback, where the default plan would rightly send everything dense):
    so compression is forced (``route='compressed'``) unless the spec names a route."""
    if spec == "none":
        return hvd.Compression.none
    if spec == "hvd-fp16":
        return hvd.Compression.fp16
    import hvd_compress
    if "route=" not in spec:
        spec += ("," if ":" in spec else ":") + "route='compressed'"
    return hvd_compress.from_spec(spec)


#: averaging wrappers used in place of hvd.DistributedOptimizer, by spec name
WRAPPERS = {"localsgd": "LocalSGD", "delayed": "DelayedAveraging"}


def distributed_optimizer(model: torch.nn.Module, args, make_optimizer):
    """Horovod's recipe (lr scaled by the world size, broadcast of parameters and optimizer
    state) with ``compression=`` from ``args.compression``.  DGC keeps the momentum itself
    (momentum correction), so the wrapped optimizer then gets none.  A wrapper spec
    (:data:`WRAPPERS`) replaces ``hvd.DistributedOptimizer`` by that wrapper, which then also
    reports the bytes (returned in place of the compressor)."""
    import hvd_compress
    from hvd_compress.methods import parse_spec
    name, kwargs = parse_spec(args.compression)
    wrapper = getattr(hvd_compress, WRAPPERS[name]) if name in WRAPPERS else None
    if wrapper is not None and "compression" in kwargs:
        kwargs["compression"] = compression_from_spec(kwargs["compression"])
    compression = None if wrapper is not None else compression_from_spec(args.compression)
    momentum = 0.0 if getattr(compression, "owns_momentum", False) else args.momentum
    optimizer = make_optimizer(model.parameters(), lr=args.lr * hvd.size(), momentum=momentum)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    if wrapper is not None:
        optimizer = wrapper(optimizer, named_parameters=model.named_parameters(), **kwargs)
        return optimizer, optimizer
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression)
    return optimizer, compression


def warmup_lr(optimizer, args, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> None:
    """Gradual warm-up (Goyal et al. 2017, as in Horovod's examples): the learning rate rises
    linearly from ``lr`` to ``lr * workers`` over ``--warmup-epochs``, then stays there."""
    progress = (epoch + step_in_epoch / steps_per_epoch) / args.warmup_epochs if args.warmup_epochs else 1.0
    scale = 1.0 + (hvd.size() - 1) * min(1.0, progress)
    for group in optimizer.param_groups:
        group["lr"] = args.lr * scale


def wire_bytes_per_step(compression, model: torch.nn.Module, steps: int) -> float:
    """Bytes one worker sends per step: the compressor's own payload accounting when it has one,
    else the dense tensors Horovod allreduces (fp32, or fp16 with Horovod's fp16)."""
    if hasattr(compression, "stats"):
        return compression.stats()["bytes_sent"] / max(steps, 1)
    width = 2 if compression is hvd.Compression.fp16 else 4
    return float(sum(p.numel() for p in model.parameters()) * width)


def progress(args, total: int, desc: str):
    """A tqdm bar on rank 0 (None elsewhere or with --no-progress), drawn only on a terminal:
    under horovodrun (or in a log) output is a pipe, and a bar redrawn every step would flood
    it, so only the bar's ``write`` lines (one per epoch) appear there."""
    if hvd.rank() != 0 or args.no_progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", mininterval=1.0, disable=not sys.stderr.isatty())


def agreed_steps(local_steps: int) -> int:
    """Ranks may hold shards of different length: agree on the shortest so collectives match."""
    return int(hvd.allreduce(torch.tensor(local_steps), op=hvd.Min, name="steps_per_epoch"))


def finish(args, result: dict, model: torch.nn.Module) -> None:
    """Print the summary line on rank 0 and write the JSON (with history) if asked."""
    result["dense_bytes_per_step"] = float(sum(p.numel() for p in model.parameters()) * 4)
    if hvd.rank() == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
