"""Train a small CNN on scikit-learn's bundled handwritten digits with Horovod.

Written like Horovod's own PyTorch examples (argparse, ``hvd.init``, ``DistributedOptimizer``,
``broadcast_parameters``); the only hvd_compress-specific line is the ``compression=`` argument.
The data (1,797 8x8 images, 10 classes) ships inside scikit-learn: nothing is downloaded.

    horovodrun -np 2 --gloo python examples/train_digits.py --compression none
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

import horovod.torch as hvd


class DigitsNet(nn.Module):
    """Two 3x3 conv layers and two linear layers: ~30k parameters, trains in seconds on a CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def compression_from_spec(spec: str):
    """Horovod's built-in ``none``/``fp16``, or any hvd_compress spec such as ``terngrad``."""
    if spec == "none":
        return hvd.Compression.none
    if spec == "hvd-fp16":
        return hvd.Compression.fp16
    import hvd_compress
    return hvd_compress.from_spec(spec)


def wire_bytes_per_step(compression, model: nn.Module, steps: int) -> float:
    """Bytes one worker sends per step: from the compressor's own payload accounting when it
    has one, otherwise the dense tensor Horovod allreduces (fp32, or fp16 for Horovod's fp16)."""
    if hasattr(compression, "stats"):
        return compression.stats()["bytes_sent"] / max(steps, 1)
    width = 2 if compression is hvd.Compression.fp16 else 4
    return float(sum(p.numel() for p in model.parameters()) * width)


def load_data(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    return (x[order[n_test:]], y[order[n_test:]]), (x[order[:n_test]], y[order[:n_test]])


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    model.train()
    return loss, acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compression", default="none",
                        help="none, hvd-fp16, or an hvd_compress spec, e.g. terngrad, qsgd:bits=4")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", help="write the run's metrics as JSON here (rank 0)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # one core per rank
    (x_train, y_train), (x_test, y_test) = load_data(args.seed)
    # Each rank trains on its own shard, as DistributedSampler would give it.
    x_train, y_train = x_train[hvd.rank()::hvd.size()], y_train[hvd.rank()::hvd.size()]

    model = DigitsNet()
    compression = compression_from_spec(args.compression)
    # DGC's momentum correction moves momentum into the compressor (Lin et al. 2018).
    momentum = 0.0 if getattr(compression, "owns_momentum", False) else args.momentum
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=momentum)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression)

    steps_per_epoch = len(x_train) // args.batch_size
    # Ranks may hold shards of different length: agree on the shortest so collectives match.
    steps_per_epoch = int(hvd.allreduce(torch.tensor(steps_per_epoch), op=hvd.Min, name="steps"))
    history = []
    show = hvd.rank() == 0 and not args.no_progress
    bar = None
    if show:
        from tqdm import tqdm
        bar = tqdm(total=args.epochs * steps_per_epoch, desc=f"digits {args.compression}", unit="step")
    step, start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(args.seed + epoch))
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        test_loss, test_acc = evaluate(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "step": step, "test_loss": test_loss, "test_acc": test_acc,
                        "bytes_per_step": wire_bytes_per_step(compression, model, step)})
        if bar is not None:
            bar.write(f"epoch {epoch + 1}: test loss {test_loss:.4f}  accuracy {100 * test_acc:.2f}%")
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()

    dense = float(sum(p.numel() for p in model.parameters()) * 4)
    result = {"task": "digits", "compression": args.compression, "workers": hvd.size(),
              "steps": step, "wall_s": wall, "step_ms": 1000 * wall / step,
              "final_test_acc": history[-1]["test_acc"], "final_test_loss": history[-1]["test_loss"],
              "bytes_per_step": history[-1]["bytes_per_step"], "dense_bytes_per_step": dense,
              "history": history}
    if hvd.rank() == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    np.seterr(all="raise")
    main()
