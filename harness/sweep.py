"""The finetune grid and its executors.

Every (dataset, grid row, seed) of params.yaml is one run, keyed by a hash of its resolved plan
and the code (harness/run.py). A run already recorded under its key is skipped, so adding a method
or a seed computes only what is new, and a sweep killed at any point resumes where it stopped:
each record is written atomically when its run ends.

Executors share one trial function (``run_trial``): ``sequential`` (in process), ``process`` (a
pool of worker processes) and ``ray`` (Ray Tune; imported only when used; honours RAY_ADDRESS).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
from pathlib import Path

import torch
from tqdm import tqdm

from harness import records
from harness.errors import InputError
from harness.ray_executor import ray_session, run_with_ray
from harness.run import RUNS_DIR, record_path, run_key, run_trial
from harness.settings import RunPlan, plan_run, plan_to_dict, section
from methods import method_names

EXECUTORS = ("sequential", "process", "ray")
# Ray Tune's storage, inside the records folder (a DVC output; .dvcignore and .gitignore skip it)
RAY_STORAGE = ".ray"


def grid_plans(params: dict) -> list[RunPlan]:
    """Every run of the study: datasets x grid rows (filtered by ``method``) x seeds."""
    file = params["_file"]
    chosen = params.get("method", "all")
    if chosen != "all" and chosen not in method_names():
        raise InputError("unknown method", file=file, key="method",
                         expected=f"'all' or one of {method_names()}", found=chosen)
    seeds = params.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise InputError("seeds must be a non-empty list of integers", file=file, key="seeds",
                         expected="e.g. [0, 1, 2]", found=seeds)
    datasets = params.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise InputError("datasets must be a non-empty list", file=file, key="datasets",
                         expected="e.g. [mosi]", found=datasets)
    grid = section(params, "grid")
    plans = []
    for dataset in datasets:
        if dataset not in grid:
            raise InputError("dataset has no grid rows", file=file, key=f"grid.{dataset}",
                             expected="a list of rows", found="nothing")
        for index, row in enumerate(grid[dataset]):
            if not isinstance(row, dict) or "method" not in row:
                raise InputError("a grid row must be a mapping with a method", file=file,
                                 key=f"grid.{dataset}[{index}]", expected="{method: ...}", found=row)
            if chosen not in ("all", row["method"]):
                continue
            settings = {k: v for k, v in row.items() if k not in ("method", "variant")}
            for seed in seeds:
                plans.append(plan_run(params, dataset, row["method"], row.get("variant", "paper"),
                                      seed, settings=settings))
    return plans


def pending(plans: list[RunPlan], out_dir: Path) -> list[RunPlan]:
    return [p for p in plans if not record_path(p, run_key(p), out_dir).is_file()]


@contextlib.contextmanager
def worker_pool(executor: str, workers: int):
    """What the executor keeps running across several ``run_many`` calls: the ``process``
    executor's pool (yielded), the ``ray`` executor's Ray instance (started once, not per call).
    Pool workers are forked, so they start with torch and the harness already imported; spawned
    (a fresh interpreter each) where fork is unavailable or this process has initialised CUDA,
    which a forked child cannot use."""
    if executor not in EXECUTORS:
        raise InputError("unknown executor", key="executor", expected=EXECUTORS, found=executor)
    if executor == "ray":
        with ray_session(workers):
            yield None
        return
    if executor != "process":
        yield None
        return
    forkable = "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()
    context = multiprocessing.get_context("fork" if forkable else "spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield pool


def run_many(plans: list[RunPlan], executor: str, workers: int, out_dir: Path,
             desc: str = "sweep", pool=None) -> None:
    """Run ``plans`` (not yet recorded) through ``executor``, ``workers`` at a time."""
    values = [plan_to_dict(p) for p in plans]
    root, out = os.getcwd(), str(Path(out_dir).resolve())
    if not values:
        return
    if executor == "sequential":
        for v in tqdm(values, desc=desc, unit="run"):
            run_trial(v, out, root)
    elif executor == "process":
        with contextlib.ExitStack() as stack:
            pool = pool or stack.enter_context(worker_pool(executor, workers))
            futures = [pool.submit(run_trial, v, out, root) for v in values]
            for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures),
                               desc=desc, unit="run"):
                future.result()
    elif executor == "ray":
        run_with_ray(values, out, root, workers, (Path(out_dir) / RAY_STORAGE).resolve())


def sweep(params: dict, executor: str = "sequential", workers: int | None = None,
          out_dir: Path = RUNS_DIR) -> dict:
    if executor not in EXECUTORS:
        raise InputError("unknown executor", key="executor", expected=EXECUTORS, found=executor)
    plans = grid_plans(params)
    todo = pending(plans, out_dir)
    workers = workers or max(1, min(len(todo), os.cpu_count() or 1))
    run_many(todo, executor, workers, out_dir)
    missing = pending(plans, out_dir)
    if missing:
        raise RuntimeError(f"{len(missing)} runs have no record after the sweep")
    return {"runs": len(plans), "computed": len(todo), "reused": len(plans) - len(todo),
            "pruned": prune(out_dir), "executor": executor, "workers": workers,
            "records": sorted(str(record_path(p, run_key(p), out_dir).relative_to(out_dir))
                              for p in plans)}


def prune(out_dir: Path) -> int:
    """Delete records computed by other code or under other compute-package versions (their keys
    can never be asked for again here)."""
    current, packages, removed = records.code_hash(), records.compute_versions(), 0
    for path in Path(out_dir).glob("*/*-seed*-*.json"):
        record = records.read_json(path)
        if record.get("code_hash") != current or record.get("packages") != packages:
            path.unlink()
            removed += 1
    return removed
