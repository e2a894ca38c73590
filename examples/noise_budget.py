"""Why a compressor misses: the noise it adds to the averaged gradient against SGD's own noise.

    python examples/noise_budget.py                  # writes docs/study/noise-budget.md (minutes)
    python examples/noise_budget.py --tasks charlm --workers 4 16
    python examples/noise_budget.py --workers 4 32 --local-size 2 8 --out docs/study/noise-budget-hosts.md

At a checkpoint of uncompressed training (the study's task, seed 0, ``--steps`` steps of SGD on
the global batch), and for each worker count N (the study's global batch split over N workers,
each with its own data, as in examples/study.py), over ``--draws`` independent batch draws:

    sgd   = E || gbar - G ||^2                    the error of one uncompressed global batch
    codec = E || (1/N) sum_w C_w(g_w) - G ||^2      the error of the compressed average

g_w is worker w's gradient, gbar = (1/N) sum_w g_w, G the mean gradient over ``--reference``
global batches (the "true" gradient), C_w the codec with worker w's random key (per tensor,
tensors under 1,024 elements dense, as the compressors' ``min_numel``).  With a fixed global
batch, ``sgd`` does not depend on N.  For an unbiased codec codec - sgd is (1/N^2) sum_w
E||C(g_w) - g_w||^2, which stays level in N only if each worker's error grows no faster than N
as its batch shrinks; a biased one (clipping) can also remove sampling noise (codec < sgd).  The
table gives codec / sgd - 1, the noise the compressor adds in units of SGD's own: SGD at a
constant learning rate plateaus higher the larger it is; the step along G, <(1/N) sum_w C_w(g_w),
G> / <gbar, G> (below 1: the codec shortens the step in the true gradient's direction, as a
smaller learning rate would); the added noise at equal step (the compressed average divided by
its step along G); and the tensor with the largest part of the excess.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import study
from hvd_compress.codecs.base import RandomKey
from hvd_compress.codecs.qsgd import QSGDCodec
from hvd_compress.codecs.terngrad import TernGradCodec, optimal_clip

#: label -> the codec for N workers
CODECS = {"terngrad 2.5σ (paper)": lambda n: TernGradCodec(clip=2.5),
          "terngrad 1σ": lambda n: TernGradCodec(clip=1.0),
          "terngrad clip for N (default)": lambda n: TernGradCodec(clip=optimal_clip(n)),
          "qsgd 4-bit L2 (paper)": lambda n: QSGDCodec(bits=4, norm="l2"),
          "qsgd 4-bit max (default)": lambda n: QSGDCodec(bits=4, norm="max")}
MIN_NUMEL = 1024
OUT = Path(__file__).resolve().parent.parent / "docs" / "study" / "noise-budget.md"


def gradients(model: torch.nn.Module, loss_fn, batch) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    return [p.grad.detach().reshape(-1).clone() for p in model.parameters()]


def checkpoint(name: str, steps: int):
    """The task's model after ``steps`` uncompressed steps on the global batch (seed 0)."""
    t = study.task(name)
    model, batches, loss_fn, _ = t.make(0)
    optimizer = study.ClippedSGD(model.parameters(), lr=t.lr, momentum=0.9, max_norm=t.clip)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = t.lr_at(step)
        optimizer.zero_grad()
        (x, y), = batches(step, 1, t.global_batch)
        loss_fn(model, (x, y)).backward()
        optimizer.step()
    return t, model, batches, loss_fn


def compressed_mean(codec, grads: list[torch.Tensor], i: int, d: int, local: int) -> torch.Tensor:
    """(1/N) sum of the decoded payloads of tensor ``i``: one per worker, or with ``local`` > 1
    one per host of ``local`` consecutive workers, each compressing its host's sum (the
    hierarchical routes: one quantization per host, with the codec for the number of hosts)."""
    n = len(grads)
    terms = [sum(grads[h:h + local]) for h in range(0, n, local)] if local > 1 else grads
    return torch.stack([codec.decode(codec.encode(t, RandomKey(seed=w + 1, step=d, tensor_id=i)))
                        for w, t in enumerate(terms)]).sum(0) / n


def budget(name: str, worlds: list[tuple[int, int]], steps: int, draws: int, reference: int) -> list[str]:
    """Rows for each (workers, workers per host) of ``worlds``."""
    t, model, batches, loss_fn = checkpoint(name, steps)
    names = [n for n, _ in model.named_parameters()]
    # batches far past the training steps: data the checkpoint has not been trained on
    ref = [gradients(model, loss_fn, batches(10_000 + i, 1, t.global_batch)[0]) for i in range(reference)]
    G = [torch.stack(parts).mean(0) for parts in zip(*ref)]
    rows = []
    for n, local in worlds:
        sgd, codec_err = 0.0, {label: torch.zeros(len(G)) for label in CODECS}
        shrink, rescaled = dict.fromkeys(CODECS, 0.0), dict.fromkeys(CODECS, 0.0)
        draws_c = {label: [] for label in CODECS}
        for d in range(draws):
            per_worker = [gradients(model, loss_fn, b) for b in batches(20_000 + d, n, t.global_batch // n)]
            gbar = [torch.stack(parts).mean(0) for parts in zip(*per_worker)]
            sgd += sum(float(((a - b) ** 2).sum()) for a, b in zip(gbar, G)) / draws
            for label, make in CODECS.items():
                codec = make(n // local)
                compressed = list(gbar)
                for i, g in enumerate(gbar):
                    if g.numel() < MIN_NUMEL:
                        continue
                    mean = compressed_mean(codec, [grads[i] for grads in per_worker], i, d, local)
                    codec_err[label][i] += float(((mean - G[i]) ** 2).sum() - ((g - G[i]) ** 2).sum()) / draws
                    compressed[i] = mean
                # projection on the true gradient, relative to the uncompressed average's: below 1 the
                # codec shortens the step along G (clipping does), like a smaller learning rate
                along = sum(float((c * g).sum()) for c, g in zip(compressed, G))
                shrink[label] += along / sum(float((b * g).sum()) for b, g in zip(gbar, G)) / draws
                draws_c[label].append(compressed)
        for label, cs in draws_c.items():
            # the error at equal step length (the compressed average divided by its step along G,
            # as a learning rate raised to match would): noise that a larger rate cannot undo
            rescaled[label] = sum(sum(float(((c / shrink[label] - g) ** 2).sum()) for c, g in zip(comp, G))
                                  for comp in cs) / draws / sgd - 1
        for label, err in codec_err.items():
            worst = int(err.argmax())
            hosts = f" ({n // local} hosts x {local})" if local > 1 else ""
            rows.append(f"| {name} | {n}{hosts} | {label} | {float(err.sum()) / sgd:+.2f} | {shrink[label]:.2f} | "
                        f"{rescaled[label]:+.2f} | "
                        + (f"{names[worst]} ({float(err[worst]) / sgd:+.2f}) |" if err[worst] > 0 else "- |"))
        rows.append(f"| {name} | {n} | (uncompressed: E‖ḡ − G‖² / ‖G‖²) | {sgd / sum(float((g * g).sum()) for g in G):.2f} "
                    "| 1 | 0 | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "charlm", "pylm"])
    parser.add_argument("--workers", nargs="+", type=int, default=[2, 4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=500, help="uncompressed steps before measuring")
    parser.add_argument("--draws", type=int, default=8, help="batch draws per worker count")
    parser.add_argument("--reference", type=int, default=64, help="global batches averaged for G")
    parser.add_argument("--local-size", nargs="+", type=int, default=[1], metavar="L",
                        help="workers per host, one per --workers value (hierarchical: each host's sum "
                             "compressed once)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.local_size == [1]:
        args.local_size = [1] * len(args.workers)
    if len(args.local_size) != len(args.workers) or any(n % l for n, l in zip(args.workers, args.local_size)):
        parser.error("--local-size needs one value per --workers value, each dividing it")
    torch.set_num_threads(1)
    from tqdm import tqdm
    rows = []
    for name in tqdm(args.tasks, desc="tasks"):
        # a hierarchical world with the flat one of as many workers beside it
        worlds = [w for n, local in zip(args.workers, args.local_size) for w in {(n, 1), (n, local)}]
        rows += budget(name, sorted(worlds), args.steps, args.draws, args.reference)
    lines = ["# Noise budget: compression noise against SGD's own", "",
             f"Generated by `python examples/noise_budget.py` (checkpoint after {args.steps} uncompressed "
             f"steps, seed 0; {args.draws} batch draws per worker count; G from {args.reference} global "
             "batches). Added noise = E‖(1/N) Σ C(g_w) − G‖² / E‖ḡ − G‖² − 1: the error of the compressed "
             "average against the true gradient G, in units of the uncompressed global batch's (which, "
             "with a fixed global batch, does not depend on N); negative where clipping removes more "
             "sampling noise than the codec adds. Step along G: ⟨(1/N) Σ C(g_w), G⟩ / ⟨ḡ, G⟩, below 1 where "
             "the codec shortens the step in the true gradient's direction (as a smaller learning rate "
             "would). At equal step: the added noise of the compressed average divided by its step "
             "along G, i.e. with the learning rate raised to give the uncompressed step length. Last "
             "column: the tensor contributing most added noise, in the same units. The module docstring "
             "has the definitions.", "",
             "| task | N | codec | added noise | step along G | added noise at equal step | largest contributor |",
             "|---|---|---|---|---|---|---|",
             *rows, ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
