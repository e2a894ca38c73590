"""Train a character-level language model with Horovod or PyTorch DDP on text that ships with Python itself:
the Python documentation topics in ``pydoc_data.topics`` (about 465k characters).  Nothing is
downloaded.

A one-layer GRU over 64-character windows, next-character cross-entropy; the last 10% of the
text is held out and the reported loss is its mean cross-entropy in nats per character.

    horovodrun -np 2 --gloo python examples/train_charlm.py --compression topk:ratio=0.01
    torchrun --nproc_per_node 2 examples/train_charlm.py --framework ddp --compression topk:ratio=0.01
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (add_common_args, agreed_steps, distributed_optimizer, finish, init_world, progress,
                    warmup_lr, wire_bytes_per_step)
from models import CharGRU, pydoc_text


def load_text() -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train ids, held-out ids, vocabulary size) of the documentation topics, in sorted order."""
    text = pydoc_text()
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:], len(vocab)


def batches(ids: torch.Tensor, seq: int, batch: int, generator: torch.Generator):
    starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=generator)
    x = torch.stack([ids[s:s + seq] for s in starts.tolist()])
    y = torch.stack([ids[s + 1:s + seq + 1] for s in starts.tolist()])
    return x, y


def evaluate(model: nn.Module, ids: torch.Tensor, seq: int) -> float:
    """Mean next-character cross-entropy over the held-out text in non-overlapping windows."""
    model.eval()
    n = (len(ids) - 1) // seq
    x = ids[:n * seq].view(n, seq)
    y = ids[1:n * seq + 1].view(n, seq)
    with torch.no_grad():
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    model.train()
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, lr=0.5, epochs=4, batch_size=32)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()

    world = init_world(args)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    train, held_out, vocab = load_text()
    # Each rank draws its own windows: the data-parallel split of an unbounded stream.
    generator = torch.Generator().manual_seed(args.seed + 1000 * world.rank)
    model = CharGRU(vocab)
    net, optimizer, compression = distributed_optimizer(model, args, torch.optim.SGD)

    steps = agreed_steps(args.steps_per_epoch)
    bar = progress(args, args.epochs * steps, f"char-LM {args.compression}")
    history, step, start = [], 0, time.perf_counter()
    for epoch in range(args.epochs):
        for i in range(steps):
            x, y = batches(train, args.seq, args.batch_size, generator)
            warmup_lr(optimizer, args, epoch, i, steps)
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten())
            if hasattr(compression, "observe_loss"):   # eSGD reads the loss
                compression.observe_loss(loss)
            loss.backward()
            # Clip the *aggregated* gradient (Horovod's recipe): clipping p.grad before step()
            # would touch local gradients while their allreduce is still in flight.  (DDP's
            # backward returns with the gradients aggregated.)
            if hasattr(optimizer, "synchronize"):
                optimizer.synchronize()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                with optimizer.skip_synchronize():
                    optimizer.step()
            else:
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        held_out_loss = evaluate(model, held_out, args.seq)
        history.append({"epoch": epoch + 1, "step": step, "test_loss": held_out_loss,
                        "bytes_per_step": wire_bytes_per_step(compression, model, step, args.compression)})
        if bar is not None:
            bar.write(f"epoch {epoch + 1}: held-out loss {held_out_loss:.4f} nats/char")
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    finish(args, {"task": "charlm", "compression": args.compression, "workers": world.size,
                  "steps": step, "wall_s": wall, "step_ms": 1000 * wall / step,
                  "final_test_loss": history[-1]["test_loss"], "final_test_acc": None,
                  "bytes_per_step": history[-1]["bytes_per_step"], "history": history}, model)


if __name__ == "__main__":
    main()
