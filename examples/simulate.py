"""Simulate N data-parallel workers in one process (no Horovod job, no cluster): the digits CNN
of train_digits.py with any compressor at any worker count, through the very engine a Horovod
job runs (hvd_compress.simulate).

    python examples/simulate.py --workers 16 --compression terngrad
    python examples/simulate.py --workers 64 --compression none --epochs 4

Each worker trains on its own shard (as DistributedSampler would give it), batch 32, learning
rate lr x workers reached by the warm-up of Horovod's examples (Goyal et al. 2017).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import hvd_compress
from hvd_compress.simulate import DataParallel
from models import DigitsNet, evaluate_digits, load_digits_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--compression", default="terngrad",
                        help="'none' or an hvd_compress spec (compression is forced: route='compressed')")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=0.025, help="per worker; scaled by the worker count")
    parser.add_argument("--warmup-epochs", type=float, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", help="write the run's metrics as JSON here")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    (x_train, y_train), (x_test, y_test) = load_digits_split(args.seed)
    shards = [(x_train[r::args.workers], y_train[r::args.workers]) for r in range(args.workers)]
    steps_per_epoch = min(len(y) for _, y in shards) // args.batch_size
    if steps_per_epoch < 1:
        parser.error(f"{args.workers} workers leave fewer than {args.batch_size} examples per shard")
    model = DigitsNet()
    spec = args.compression
    if spec == "none":
        compression = hvd_compress.from_spec("fp16:route='dense'")   # every bucket uncompressed
    else:
        compression = hvd_compress.from_spec(spec, route="compressed")
    momentum = 0.0 if getattr(compression, "owns_momentum", False) else 0.9
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=momentum)
    sim = DataParallel(model, optimizer, compression, args.workers)

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    history, start = [], time.perf_counter()
    for epoch in range(args.epochs):
        perms = [torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed + 1000 * r + epoch))
                 for r, (_, y) in enumerate(shards)]
        for i in range(steps_per_epoch):
            progress = (epoch + i / steps_per_epoch) / args.warmup_epochs if args.warmup_epochs else 1.0
            for group in optimizer.param_groups:
                group["lr"] = args.lr * (1 + (args.workers - 1) * min(1.0, progress))
            idx = [p[i * args.batch_size:(i + 1) * args.batch_size] for p in perms]
            sim.step(loss_fn, [(x[j], y[j]) for (x, y), j in zip(shards, idx)])
        test_loss, test_acc = evaluate_digits(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "test_loss": test_loss, "test_acc": test_acc})
        print(f"epoch {epoch + 1}: test loss {test_loss:.4f}  accuracy {100 * test_acc:.2f}%", flush=True)
    stats = sim.stats()
    result = {"task": "digits", "compression": spec, "workers": args.workers, "simulated": True,
              "steps": stats["steps"], "wall_s": time.perf_counter() - start,
              "final_test_acc": history[-1]["test_acc"], "final_test_loss": history[-1]["test_loss"],
              "bytes_per_step": stats["bytes_sent"] / max(stats["steps"], 1), "history": history}
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
