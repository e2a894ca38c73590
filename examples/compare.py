"""Run the digits example under ``horovodrun`` once per compression spec, then print a comparison
table and write a plot (test accuracy against steps and against bytes sent).

    python examples/compare.py --np 2 --specs none hvd-fp16 terngrad --out out/
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(spec: str, np_: int, out: Path, epochs: int, timeout: float) -> dict:
    result_file = out / f"digits_{spec.replace(':', '_').replace('=', '-').replace(',', '_')}_np{np_}.json"
    cmd = ["horovodrun", "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", sys.executable,
           str(HERE / "train_digits.py"), "--compression", spec, "--epochs", str(epochs),
           "--out", str(result_file)]
    print(f"$ {' '.join(cmd)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, timeout=timeout, env=env)
    return json.loads(result_file.read_text())


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["compression"] == "none"), results[0])
    rows = [("compression", "final acc %", "final loss", "bytes/step", "ratio", "wall s")]
    for r in results:
        rows.append((r["compression"], f"{100 * r['final_test_acc']:.2f}", f"{r['final_test_loss']:.4f}",
                     f"{r['bytes_per_step']:,.0f}", f"{base['bytes_per_step'] / r['bytes_per_step']:.1f}x",
                     f"{r['wall_s']:.1f}"))
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
    for r in results:
        steps = [h["step"] for h in r["history"]]
        acc = [100 * h["test_acc"] for h in r["history"]]
        sent = [h["step"] * h["bytes_per_step"] / 2 ** 20 for h in r["history"]]
        by_step.plot(steps, acc, marker="o", label=r["compression"])
        by_bytes.plot(sent, acc, marker="o", label=r["compression"])
    by_step.set(xlabel="step", ylabel="test accuracy (%)", title="accuracy vs steps")
    by_bytes.set(xlabel="MiB sent per worker", ylabel="test accuracy (%)", xscale="log",
                 title="accuracy vs bytes on the wire")
    from matplotlib.ticker import NullFormatter
    by_bytes.xaxis.set_minor_formatter(NullFormatter())  # log axis: label the decades only
    for ax in (by_step, by_bytes):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"digits CNN, {results[0]['workers']} Horovod workers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--specs", nargs="+", default=["none", "hvd-fp16"])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per training run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run(spec, args.np, args.out, args.epochs, args.timeout) for spec in args.specs]
    text = table(results)
    print("\n" + text)
    (args.out / "digits_table.txt").write_text(text + "\n")
    plot(results, args.out / "digits.png")
    print(f"\nwrote {args.out / 'digits_table.txt'} and {args.out / 'digits.png'}")


if __name__ == "__main__":
    main()
