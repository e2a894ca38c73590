"""Train a small CNN on scikit-learn's bundled handwritten digits with Horovod or PyTorch DDP.

Written like Horovod's own PyTorch examples (argparse, ``hvd.init``, ``DistributedOptimizer``,
``broadcast_parameters``); the only hvd_compress-specific line is the ``compression=`` argument
(with DDP: the two hook lines, in common.py).  The data (1,797 8x8 images, 10 classes) ships
inside scikit-learn: nothing is downloaded.

    horovodrun -np 2 --gloo python examples/train_digits.py --compression none
    torchrun --nproc_per_node 2 examples/train_digits.py --framework ddp --compression terngrad
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common import (add_common_args, agreed_steps, distributed_optimizer, finish, init_world, progress,
                    warmup_lr, wire_bytes_per_step)
from models import DigitsNet, evaluate_digits, load_digits_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, lr=0.05, epochs=8, batch_size=32)
    args = parser.parse_args()

    world = init_world(args)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # one core per rank
    (x_train, y_train), (x_test, y_test) = load_digits_split(args.seed)
    # Each rank trains on its own shard, as DistributedSampler would give it.
    x_train, y_train = x_train[world.rank::world.size], y_train[world.rank::world.size]
    model = DigitsNet()
    net, optimizer, compression = distributed_optimizer(model, args, torch.optim.SGD)

    steps_per_epoch = agreed_steps(len(x_train) // args.batch_size)
    bar = progress(args, args.epochs * steps_per_epoch, f"digits {args.compression}")
    history, step, start = [], 0, time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(args.seed + epoch))
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            warmup_lr(optimizer, args, epoch, i, steps_per_epoch)
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            if hasattr(compression, "observe_loss"):   # eSGD reads the loss
                compression.observe_loss(loss)
            loss.backward()
            optimizer.step()
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        test_loss, test_acc = evaluate_digits(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "step": step, "test_loss": test_loss, "test_acc": test_acc,
                        "bytes_per_step": wire_bytes_per_step(compression, model, step, args.compression)})
        if bar is not None:
            bar.write(f"epoch {epoch + 1}: test loss {test_loss:.4f}  accuracy {100 * test_acc:.2f}%")
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    finish(args, {"task": "digits", "compression": args.compression, "workers": world.size,
                  "steps": step, "wall_s": wall, "step_ms": 1000 * wall / step,
                  "final_test_acc": history[-1]["test_acc"], "final_test_loss": history[-1]["test_loss"],
                  "bytes_per_step": history[-1]["bytes_per_step"], "history": history}, model)


if __name__ == "__main__":
    main()
