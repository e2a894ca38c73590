"""Run an example under ``horovodrun`` (or, ``--framework ddp``, under ``torchrun`` with DDP) once
per compression spec, then print a comparison table and write a plot (test accuracy, or held-out
loss for the char-LM, against steps and against bytes sent).

    python examples/compare.py --task digits --np 2 --specs none hvd-fp16 terngrad --out out/
    python examples/compare.py --framework ddp --specs none torch-fp16 torch-powersgd:rank=1 powersgd:rank=1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


SCRIPTS = {"digits": "train_digits.py", "charlm": "train_charlm.py"}


def run(task: str, spec: str, np_: int, out: Path, epochs: int | None = None, seed: int = 42,
        timeout: float = 900, progress: bool = True, extra: tuple[str, ...] = (),
        framework: str = "horovod") -> dict:
    """One ``horovodrun`` (or ``torchrun`` + DDP) training; returns its JSON result."""
    slug = spec.replace(":", "_").replace("=", "-").replace(",", "_").replace("'", "")
    result_file = out / f"{task}_{slug}_np{np_}_seed{seed}{'_ddp' if framework == 'ddp' else ''}.json"
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(np_)] if framework == "ddp"
              else ["horovodrun", "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", sys.executable])
    cmd = [*launch, str(HERE / SCRIPTS[task]), "--framework", framework, "--compression", spec,
           "--seed", str(seed), "--out", str(result_file)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    if not progress:
        cmd.append("--no-progress")
    cmd += list(extra)
    print(f"$ {' '.join(cmd)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, timeout=timeout, env=env, stdout=None if progress else subprocess.DEVNULL)
    return json.loads(result_file.read_text())


def metric(result: dict) -> tuple[str, float]:
    """The headline quality number: test accuracy in % (digits) or held-out loss (char-LM)."""
    if result["task"] == "digits":
        return "accuracy %", 100 * result["final_test_acc"]
    return "held-out loss", result["final_test_loss"]


def table(results: list[dict], seeds: dict[str, list[dict]] | None = None) -> str:
    """One row per run; with ``seeds`` (spec -> its runs over several seeds) the quality columns
    are the mean and standard deviation over them."""
    import statistics
    base = next((r for r in results if r["compression"] == "none"), results[0])
    rows = [("compression", f"final {metric(base)[0]}", "final loss", "bytes/step", "ratio", "wall s")]
    for r in results:
        runs = (seeds or {}).get(r["compression"], [r])
        quality = [metric(x)[1] for x in runs]
        loss = [x["final_test_loss"] for x in runs]
        spread = (lambda v: f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")
        rows.append((r["compression"], f"{statistics.mean(quality):.2f}{spread(quality)}",
                     f"{statistics.mean(loss):.4f}", f"{r['bytes_per_step']:,.0f}",
                     f"{base['bytes_per_step'] / r['bytes_per_step']:.1f}x", f"{r['wall_s']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (by_step, by_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    digits = results[0]["task"] == "digits"
    label = "test accuracy (%)" if digits else "held-out loss (nats/char)"
    for r in results:
        steps = [h["step"] for h in r["history"]]
        quality = [100 * h["test_acc"] if digits else h["test_loss"] for h in r["history"]]
        sent = [h["step"] * h["bytes_per_step"] / 2 ** 20 for h in r["history"]]
        by_step.plot(steps, quality, marker="o", label=r["compression"])
        by_bytes.plot(sent, quality, marker="o", label=r["compression"])
    by_step.set(xlabel="step", ylabel=label, title=f"{label.split(' (')[0]} vs steps")
    by_bytes.set(xlabel="MiB sent per worker", ylabel=label, xscale="log",
                 title=f"{label.split(' (')[0]} vs bytes on the wire")
    from matplotlib.ticker import NullFormatter
    by_bytes.xaxis.set_minor_formatter(NullFormatter())  # log axis: label the decades only
    for ax in (by_step, by_bytes):
        ax.grid(alpha=0.3)
    # one legend, under both panels, so it hides no curve
    fig.legend(*by_step.get_legend_handles_labels(), loc="lower center", ncol=min(len(results), 4),
               fontsize="small", frameon=False)
    model = "digits CNN" if digits else "char-level GRU on the Python docs"
    framework = "DDP" if results[0].get("framework") == "ddp" else "Horovod"
    fig.suptitle(f"{model}, {results[0]['workers']} {framework} workers")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(SCRIPTS), default="digits")
    parser.add_argument("--framework", choices=("horovod", "ddp"), default="horovod")
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--specs", nargs="+", default=["none", "hvd-fp16"])
    parser.add_argument("--epochs", type=int, help="default: the training script's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42],
                        help="several: the table gives mean ± standard deviation over them (the plot: the first)")
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per training run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = {spec: [run(args.task, spec, args.np, args.out, args.epochs, seed=seed, timeout=args.timeout,
                        framework=args.framework) for seed in args.seeds] for spec in args.specs}
    results = [runs[0] for runs in seeds.values()]
    text = table(results, seeds)
    if len(args.seeds) > 1:
        text += f"\n(mean ± standard deviation over seeds {', '.join(map(str, args.seeds))}; other columns: seed {args.seeds[0]})"
    print("\n" + text)
    (args.out / f"{args.task}_table.txt").write_text(text + "\n")
    plot(results, args.out / f"{args.task}.png")
    print(f"\nwrote {args.out / f'{args.task}_table.txt'} and {args.out / f'{args.task}.png'}")


if __name__ == "__main__":
    main()
