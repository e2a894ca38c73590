"""The convergence study's trainer (examples/study.py): the simulated workers and a real
``horovodrun`` job of the same trainer produce the same run, bit for bit, on a compressed route;
the report renders tables, the targets' verdicts and plots from the results file."""
import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
import study  # noqa: E402
import study_report  # noqa: E402


@pytest.mark.horovod
def test_real_job_equals_simulation_and_report(tmp_path):
    sim = study.train("digits", "terngrad", 2, seed=3, progress=False, max_steps=33)
    real = study._real_run("digits", "terngrad", 2, seed=3, timeout=300, max_steps=33)
    assert real["real"] and not sim["real"] and real["steps"] == sim["steps"] == 33
    assert [h["loss"] for h in real["history"]] == [h["loss"] for h in sim["history"]]
    assert real["bytes_per_step"] == sim["bytes_per_step"] < sim["dense_bytes_per_step"] / 8

    base = study.train("digits", "none", 2, seed=3, progress=False, max_steps=33)
    results = tmp_path / "results.jsonl"
    with open(results, "w") as f:
        for record, label in ((sim, "terngrad"), (real, "terngrad"), (base, "none")):
            f.write(json.dumps(dict(record, label=label)) + "\n")
        f.write(json.dumps({"task": "digits", "label": "qsgd 4-bit", "workers": 2, "seed": 0, "real": False,
                            "spec": "qsgd:bits=4", "error": "RuntimeError: boom"}) + "\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n" + "\nstale table\n".join(study_report.README_MARKS) + "\noutro\n")
    study_report.report(results, docs=tmp_path, readme=readme)
    text = (tmp_path / "convergence.md").read_text()
    table = readme.read_text()
    assert table.startswith("intro\n") and table.endswith("\noutro\n") and "stale" not in table
    assert "| `TernGrad(clip=2.5)` (the paper's) | 12x | " in table and "at 2 workers" in table
    assert "| terngrad | " in text and "target cells met" in text and "identical" in text
    assert "qsgd 4-bit N=2 seed 0: RuntimeError: boom" in text
    assert (tmp_path / "study" / "digits_vs_workers.png").stat().st_size > 10_000
    assert "# Time to accuracy" in (tmp_path / "time-to-accuracy.md").read_text()


@pytest.mark.horovod
def test_real_job_plans_the_simulated_routes():
    """At 2 workers on the study's 1 Gbit/s link the Transformer's big bucket goes two-phase (it
    quantizes twice); a real job planning for its measured loopback link gathers instead, a
    different run.  With the link declared the real job has the simulation's plan and run."""
    sim = study.train("pylm", "terngrad:clip=1.0", 2, seed=0, progress=False, max_steps=50)
    real = study._real_run("pylm", "terngrad:clip=1.0", 2, seed=0, timeout=300, max_steps=50)
    assert "two_phase" in sim["plan"] and "(declared)" in sim["plan"]
    assert real["plan"] == sim["plan"]
    assert real["history"] == sim["history"] and real["bytes_per_step"] == sim["bytes_per_step"]


def test_every_task_builds_and_steps():
    """Each task's model, batches and evaluation work through the simulator (a few steps)."""
    import math
    for name in ("digits", "charlm", "pylm"):
        record = study.train(name, "qsgd:bits=4", 4, seed=0, progress=False, max_steps=2)
        assert record["steps"] == 2 and record["bytes_per_step"] < record["dense_bytes_per_step"] / 4
        model, batches, loss_fn, evaluate = study.task(name).make(0)
        (x, y), *others = batches(0, 4, 8)
        assert len(others) == 3 and len(x) == 8
        held_out = evaluate(model)["loss"]
        assert math.isfinite(held_out) and held_out < 1.2 * math.log(100)   # near a uniform guess, untrained


def test_bad_worker_count_is_refused():
    with pytest.raises(ValueError, match="does not split"):
        study.train("digits", "none", 3, seed=0, progress=False, max_steps=1)


def test_noise_budget_separates_the_qsgd_norms():
    """examples/noise_budget.py: the L2-normalized QSGD adds far more noise to the averaged
    gradient than the max-normalized one (the study's explanation of QSGD-L2's miss)."""
    import noise_budget
    rows = noise_budget.budget("charlm", [(2, 1)], steps=20, draws=2, reference=4)
    added = {row.split(" | ")[2]: float(row.split(" | ")[3]) for row in rows if "qsgd" in row}
    assert added["qsgd 4-bit L2 (paper)"] > 0.5 > 0.2 > added["qsgd 4-bit max (default)"]
    assert any("(uncompressed" in row for row in rows)
