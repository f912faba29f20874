"""Calibration of the statistics on the planted-answer tasks (a benchmark, not a test).

    python scripts/bench_calibration.py [--pool 30] [--sizes 2,3,4,5,6,8,10] [--studies 200]
                                        [--tasks planted_null,planted_cross,planted_depth]
                                        [--workers 2] [--scratch DIR] [--json FILE]

Runs every row of the Planted effects table (harness.tables.planted: the linear probe and the
rows each planted task tests) with ``--pool`` seeds through the harness's own sweep (the study's
params.yaml, tiny profile, process executor; records and feature caches in a scratch folder,
nothing in the checkout), then replays ``--studies`` studies per number of seeds n: each draws n
of the pool's seeds at random and computes the table's comparisons exactly as ``mmpetl tables``
does (harness.stats: paired t-test, Holm over the table, alpha 0.05). Printed per n:

- A/A false-positive rate: each row against ITSELF on two disjoint draws of n seeds (paired in
  draw order), where the true difference is zero by construction: the share of "significant"
  verdicts (alpha 0.05, one comparison, so Holm changes nothing). It calibrates the paired test
  on the metric's real seed-to-seed distribution. Needs 2n <= pool.
- null-task false-positive rate: the share of studies in which some row of the null task is
  found "better" than the probe (the theory says none is); and the share in which Wander's null
  comparison is significant in either direction.
- power: the share of studies in which every row predicted "better" (Wander on the cross task,
  LoRA and Adapter on the depth task) is found better; and the same per task.
- all predictions hold: the share of studies in which the whole table reads as predicted.

Then the recommended number of seeds: the smallest n with A/A and null-task false-positive rates
<= 5% and power >= 80%. Studies drawn from one pool of seeds share seeds (more so as n nears
the pool), so the rates are resampling estimates; a larger --pool makes them less dependent.
The fine-tuning runs dominate the time: 330 runs at --pool 30 (eleven rows; LoRA and Adapter,
which cannot read the feature cache, are most of it); ``--tasks`` runs some of the planted tasks
only (the table's comparisons of the others are then "not run" and left out of the rates); a
rerun with the same --scratch reuses its records and only replays the studies.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import stats
from harness.data import generate
from harness.data.planted import BACKBONE_FILE
from harness.records import write_json_atomic
from harness.settings import load_params
from harness.sweep import sweep
from harness.tables.collect import collect
from harness.tables.planted import BETTER, PLANTED_TASKS, PROBE, planted_comparisons, planted_values

ROOT = Path(__file__).resolve().parent.parent
GOAL_FALSE_POSITIVES, GOAL_POWER = 0.05, 0.80


def study_params(pool: int, data_dir: Path, tasks: list[str]) -> dict:
    """The study's params.yaml restricted to the planted tasks named in ``tasks``, their table
    rows and ``pool`` seeds, with the data generated under ``data_dir`` (a task whose backbone
    the generator writes beside the data, planted_depth, reads it from there)."""
    params = load_params(ROOT / "params.yaml")
    params.update(datasets=list(tasks), seeds=list(range(pool)), seeds_by_dataset={}, method="all")
    for task in PLANTED_TASKS:
        if task.dataset not in tasks:
            continue
        params["grid"][task.dataset] = [dict(PROBE)] + [dict(row.grid) for row in task.rows]
        folder = data_dir / task.dataset
        if not folder.exists():
            generate(task.dataset, folder, seed=params.get("data_seed", 0),
                     **(params.get("generate", {}).get(task.dataset) or {}))
        params["data"]["tiny"][task.dataset] = {"path": str(folder)}
        if params["pretrain"]["use"].get(task.dataset) == task.dataset:
            params["pretrain"]["checkpoints"][task.dataset] = str(folder / BACKBONE_FILE)
    return params


def aa_false_positive(values: dict, metrics: dict, n: int, rng: np.random.Generator) -> list[bool]:
    """One A/A draw per row: the row's values on n seeds against its values on n other seeds."""
    found = []
    for (dataset, _), by_seed in sorted(values.items()):
        seeds = rng.permutation(sorted(by_seed))[: 2 * n]
        first = {i: by_seed[int(s)] for i, s in enumerate(seeds[:n])}
        second = {i: by_seed[int(s)] for i, s in enumerate(seeds[n:])}
        comparison = stats.compare(first, second, metrics[dataset])
        stats.adjust([comparison])
        found.append(comparison["verdict"] in (stats.WANDER_BETTER, stats.BASELINE_BETTER))
    return found


def replay(values: dict, metrics: dict, pool: int, n: int, studies: int, seed: int,
           tasks: list[str]) -> dict:
    """The rates of the module docstring for studies of n seeds, on the comparisons of ``tasks``
    (the other tasks' comparisons are "not run", without a p-value, so Holm's family is the
    comparisons of ``tasks``: smaller than the study's table when some tasks are left out)."""
    rng = np.random.default_rng([seed, n])
    effects = [t.dataset for t in PLANTED_TASKS
               if t.dataset in tasks and any(r.prediction == BETTER for r in t.rows)]
    aa, null_better, null_wander, power, holds = [], [], [], [], []
    power_by_task = {dataset: [] for dataset in effects}
    ran = {key: by_seed for key, by_seed in values.items() if key[0] in tasks}
    for _ in range(studies):
        chosen = sorted(int(s) for s in rng.choice(pool, size=n, replace=False))
        table = [c for c in planted_comparisons(values, metrics, chosen) if c["dataset"] in tasks]
        null = [c for c in table if c["dataset"] == "planted_null"]
        null_better.append(any(c["outcome"] == BETTER for c in null))
        null_wander.append(any(c["row"] == "Wander (d=16)" and c["verdict"] in (
            stats.WANDER_BETTER, stats.BASELINE_BETTER) for c in null))
        power.append(all(c["outcome"] == BETTER for c in table if c["prediction"] == BETTER))
        for dataset in effects:
            power_by_task[dataset].append(all(
                c["outcome"] == BETTER for c in table
                if c["dataset"] == dataset and c["prediction"] == BETTER))
        holds.append(all(c["holds"] for c in table))
        if 2 * n <= pool:
            aa.extend(aa_false_positive(ran, metrics, n, rng))
    return {"n": n, "studies": studies,
            "aa_false_positive": float(np.mean(aa)) if aa else None,
            "null_false_positive": float(np.mean(null_better)) if "planted_null" in tasks else None,
            "null_wander_significant": (float(np.mean(null_wander)) if "planted_null" in tasks
                                        else None),
            "power": float(np.mean(power)),
            "power_by_task": {dataset: float(np.mean(found))
                              for dataset, found in power_by_task.items()},
            "all_hold": float(np.mean(holds))}


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def recommend(rows: list[dict]) -> int | None:
    for row in rows:
        if (row["aa_false_positive"] is not None and row["aa_false_positive"] <= GOAL_FALSE_POSITIVES
                and (row["null_false_positive"] or 0.0) <= GOAL_FALSE_POSITIVES
                and row["power"] >= GOAL_POWER):
            return row["n"]
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=int, default=30, help="seeds run per row (default 30)")
    parser.add_argument("--sizes", default="2,3,4,5,6,8,10",
                        help="numbers of seeds per study, comma-separated (default 2,3,4,5,6,8,10)")
    parser.add_argument("--studies", type=int, default=200, help="studies replayed per size (default 200)")
    parser.add_argument("--tasks", default=",".join(t.dataset for t in PLANTED_TASKS),
                        help="planted tasks to run, comma-separated (default: every one)")
    parser.add_argument("--workers", type=int, default=2, help="sweep worker processes (default 2)")
    parser.add_argument("--scratch", help="folder for data, caches and records (default: a temporary one)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if args.pool < 2 or not sizes or sizes[0] < 2 or sizes[-1] > args.pool:
        parser.error(f"need 2 <= every size <= --pool; got sizes {sizes}, pool {args.pool}")
    tasks = [t for t in args.tasks.split(",") if t]
    known = [t.dataset for t in PLANTED_TASKS]
    if not tasks or not set(tasks) <= set(known):
        parser.error(f"--tasks: a comma-separated subset of {known}; got {args.tasks!r}")
    started = time.perf_counter()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="mmpetl-calibration-")).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    params = study_params(args.pool, scratch / "data", tasks)
    json_path = Path(args.json).resolve() if args.json else None
    os.chdir(scratch)   # the runs' feature caches go to <scratch>/datasets/features
    summary = sweep(params, "process", args.workers, scratch / "runs")
    sweep_s = time.perf_counter() - started
    print(f"runs: {summary['runs']} ({summary['computed']} computed) in {sweep_s:.0f} s; records in "
          f"{scratch / 'runs'}", file=sys.stderr)
    collected = planted_values(collect(scratch / "runs", params))
    rows = [replay(collected["values"], collected["metrics"], args.pool, n, args.studies, seed=0,
                   tasks=tasks) for n in sizes]
    print(f"Calibration on the planted tasks {', '.join(tasks)}: {args.studies} studies per size "
          f"drawn from {args.pool} seeds per row; Holm over the Planted effects table, alpha "
          f"{stats.ALPHA}")
    effects = list(rows[0]["power_by_task"])
    print(f"{'seeds':>5} {'A/A FP':>7} {'null FP':>8} {'null Wander sig.':>17} {'power':>6} "
          + "".join(f"{'power ' + d.removeprefix('planted_'):>13}" for d in effects)
          + f" {'all hold':>9}")
    for row in rows:
        print(f"{row['n']:>5} {_rate(row['aa_false_positive']):>7} "
              f"{_rate(row['null_false_positive']):>8} "
              f"{_rate(row['null_wander_significant']):>17} {row['power']:>6.3f} "
              + "".join(f"{row['power_by_task'][d]:>13.3f}" for d in effects)
              + f" {row['all_hold']:>9.3f}")
    chosen = recommend(rows)
    print(f"recommended seeds: {chosen if chosen is not None else 'none of ' + str(sizes)} "
          f"(smallest n with A/A and null false positives <= {GOAL_FALSE_POSITIVES:.0%} and power "
          f">= {GOAL_POWER:.0%}); total {time.perf_counter() - started:.0f} s")
    if json_path:
        write_json_atomic(json_path, {"pool": args.pool, "studies": args.studies, "sizes": rows,
                                            "recommended_seeds": chosen, "sweep_s": sweep_s,
                                            "total_s": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    sys.exit(main())
