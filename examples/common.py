"""What the example training scripts share: the ``--framework`` (Horovod, or PyTorch DDP under
torchrun / srun), the ``--compression`` spec, the optimizer set-up Horovod's examples use,
wire-byte accounting, and the progress bar on rank 0."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


class World:
    """The ranks of the job, whichever framework runs it: ``rank``, ``size``, and the two
    collectives the scripts need besides the gradients' (the shortest shard, the initial
    weights)."""

    def __init__(self, framework: str) -> None:
        self.framework = framework
        if framework == "horovod":
            import horovod.torch as hvd
            hvd.init()
            self.rank, self.size = hvd.rank(), hvd.size()
        else:
            import torch.distributed as dist
            if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:   # srun: torchrun's variables
                os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                                  LOCAL_RANK=os.environ["SLURM_LOCALID"])
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def min(self, value: int) -> int:
        if self.framework == "horovod":
            import horovod.torch as hvd
            return int(hvd.allreduce(torch.tensor(value), op=hvd.Min, name="steps_per_epoch"))
        import torch.distributed as dist
        t = torch.tensor(value)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t)

    def barrier(self) -> None:
        if self.framework == "horovod":
            import horovod.torch as hvd
            hvd.allreduce(torch.zeros(1), name="world.barrier")
        else:
            import torch.distributed as dist
            dist.barrier()

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        t = torch.tensor([int(flag)])
        if self.framework == "horovod":
            import horovod.torch as hvd
            return bool(hvd.broadcast(t, root_rank=0, name="world.agree").item())
        import torch.distributed as dist
        dist.broadcast(t, src=0)
        return bool(t.item())

    def gather(self, row: list[float]) -> list[list[float]]:
        """Every rank's ``row``, in rank order."""
        t = torch.tensor([row], dtype=torch.float64)
        if self.framework == "horovod":
            import horovod.torch as hvd
            return hvd.allgather(t, name="world.gather").tolist()
        import torch.distributed as dist
        every = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(every, t)
        return torch.cat(every).tolist()

    def close(self) -> None:
        if self.framework == "ddp":
            import gc

            import torch.distributed as dist
            # free the DDP model (a reference cycle) while the process group lives: freed at
            # exit, after it, its gloo threads may abort the process (see docs/ddp.md)
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()
        else:
            import horovod.torch as hvd
            hvd.shutdown()


#: the job's world, set by :func:`init_world`
WORLD: World | None = None


def init_world(args) -> World:
    global WORLD
    WORLD = World(args.framework)
    return WORLD


def add_common_args(parser: argparse.ArgumentParser, *, lr: float, epochs: int, batch_size: int) -> None:
    parser.add_argument("--framework", choices=("horovod", "ddp"), default="horovod",
                        help="horovod (horovodrun, Slurm's srun with Horovod) or ddp (PyTorch DDP: torchrun, "
                             "or srun)")
    parser.add_argument("--compression", default="none",
                        help="none, hvd-fp16 (Horovod's), torch-fp16 / torch-powersgd:rank=4 (DDP's own "
                             "hooks), or an hvd_compress spec: terngrad, qsgd:bits=4, fp16, topk:ratio=0.01, "
                             "dgc:ratio=0.001,warmup_steps=100; or (Horovod) an averaging wrapper: "
                             "localsgd:period=4, delayed:delay=2 (optionally with compression='qsgd:bits=4', "
                             "and delta=True for localsgd)")
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
    if spec in ("none", "hvd-fp16"):
        import horovod.torch as hvd
        return hvd.Compression.none if spec == "none" else hvd.Compression.fp16
    import hvd_compress
    if "route=" not in spec:
        spec += ("," if ":" in spec else ":") + "route='compressed'"
    return hvd_compress.from_spec(spec)


#: averaging wrappers used in place of hvd.DistributedOptimizer, by spec name
WRAPPERS = {"localsgd": "LocalSGD", "delayed": "DelayedAveraging"}


def ddp_hook(ddp, spec: str):
    """Register on ``ddp`` the communication hook ``spec`` names: none (DDP's own allreduce),
    PyTorch's ``torch-fp16`` or ``torch-powersgd:rank=R`` (error feedback and warm start on,
    compressing from the third step), or any hvd_compress spec through
    ``hvd_compress.ddp.hook``.  Returns what reports the bytes: the hvd_compress state, or None."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    import hvd_compress.ddp
    from hvd_compress.methods import parse_spec
    name, kwargs = parse_spec(spec)
    if spec == "none":
        return None
    if spec == "torch-fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    if name == "torch-powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=kwargs.get("rank", 1),
                                            start_powerSGD_iter=2, use_error_feedback=True, warm_start=True)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return None
    if name in WRAPPERS or name == "hvd-fp16":
        raise SystemExit(f"{spec}: Horovod only (run with --framework horovod)")
    return hvd_compress.ddp.register(ddp, compression_from_spec(spec))


def distributed_optimizer(model: torch.nn.Module, args, make_optimizer):
    """Horovod's recipe (lr scaled by the world size, broadcast of parameters and optimizer
    state) with ``compression=`` from ``args.compression``; returns (the module to call, the
    optimizer, what reports the bytes).  DGC keeps the momentum itself (momentum correction),
    so the wrapped optimizer then gets none.  A wrapper spec (:data:`WRAPPERS`) replaces
    ``hvd.DistributedOptimizer`` by that wrapper, which then also reports the bytes (returned
    in place of the compressor).  With ``--framework ddp`` the model is wrapped by DDP (which
    broadcasts the weights) and :func:`ddp_hook` registers the hook."""
    if args.framework == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model)
        compression = ddp_hook(ddp, args.compression)
        owns = getattr(getattr(compression, "compressor", None), "owns_momentum", False)
        optimizer = make_optimizer(model.parameters(), lr=args.lr * WORLD.size,
                                   momentum=0.0 if owns else args.momentum)
        return ddp, optimizer, compression
    import horovod.torch as hvd

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
        return model, optimizer, optimizer
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression)
    return model, optimizer, compression


def warmup_lr(optimizer, args, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> None:
    """Gradual warm-up (Goyal et al. 2017, as in Horovod's examples): the learning rate rises
    linearly from ``lr`` to ``lr * workers`` over ``--warmup-epochs``, then stays there."""
    progress = (epoch + step_in_epoch / steps_per_epoch) / args.warmup_epochs if args.warmup_epochs else 1.0
    scale = 1.0 + (WORLD.size - 1) * min(1.0, progress)
    for group in optimizer.param_groups:
        group["lr"] = args.lr * scale


def torch_powersgd_bytes(model: torch.nn.Module, rank: int, min_compression_rate: float = 2.0) -> float:
    """What PyTorch's ``powerSGD_hook`` allreduces per step once it compresses (its own rule): a
    tensor viewed as (rows, numel / rows) whose rank-``rank`` factors P and Q are at least
    ``min_compression_rate`` times smaller sends them (fp32); 1-D tensors and the others go
    whole."""
    total = 0
    for p in model.parameters():
        rows = p.shape[0] if p.dim() > 1 else 0
        cols = p.numel() // rows if rows else 0
        small = (rows + cols) * min(rank, rows, cols)
        total += 4 * (small if rows and small * min_compression_rate < p.numel() else p.numel())
    return float(total)


def wire_bytes_per_step(compression, model: torch.nn.Module, steps: int, spec: str) -> float:
    """Bytes one worker contributes per step: the compressor's own payload accounting when it
    has one, else the tensors the framework allreduces (fp32, or fp16 with Horovod's or
    PyTorch's fp16; PyTorch's PowerSGD: :func:`torch_powersgd_bytes`)."""
    if hasattr(compression, "stats"):
        return compression.stats()["bytes_sent"] / max(steps, 1)
    from hvd_compress.methods import parse_spec
    name, kwargs = parse_spec(spec)
    if name == "torch-powersgd":
        return torch_powersgd_bytes(model, kwargs.get("rank", 1))
    width = 2 if spec in ("hvd-fp16", "torch-fp16") else 4
    return float(sum(p.numel() for p in model.parameters()) * width)


def progress(args, total: int, desc: str):
    """A tqdm bar on rank 0 (None elsewhere or with --no-progress), drawn only on a terminal:
    under horovodrun (or in a log) output is a pipe, and a bar redrawn every step would flood
    it, so only the bar's ``write`` lines (one per epoch) appear there."""
    if WORLD.rank != 0 or args.no_progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", mininterval=1.0, disable=not sys.stderr.isatty())


def agreed_steps(local_steps: int) -> int:
    """Ranks may hold shards of different length: agree on the shortest so collectives match."""
    return WORLD.min(local_steps)


def finish(args, result: dict, model: torch.nn.Module) -> None:
    """Print the summary line on rank 0 and write the JSON (with history) if asked."""
    result["dense_bytes_per_step"] = float(sum(p.numel() for p in model.parameters()) * 4)
    result["framework"] = args.framework
    if WORLD.rank == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    WORLD.close()
