"""The finetune grid and its executors.

Every (dataset, grid row, seed) of params.yaml is one run, keyed by a hash of its resolved plan
and the code (harness/run.py). A run already recorded under its key is skipped, so adding a method
or a seed computes only what is new, and a sweep killed at any point resumes where it stopped:
each record is written atomically when its run ends. The code in a key is the harness code and,
of methods/, only the run's method (``harness.run.run_code_hash``): editing or adding one method
recomputes that method's runs only.

Records whose key can no longer be asked for (other code, other compute-package versions, a method
no longer registered) are moved aside to ``<records>/.stale/<dataset>/``, never deleted by a
sweep: the tables do not read them, ``mmpetl records stale`` lists them, ``mmpetl records prune``
deletes them, and a sweep moves one back when its key is asked for again (e.g. an edit undone).

Executors share one trial function (``run_trial``): ``sequential`` (in process), ``process`` (a
pool of worker processes) and ``ray`` (Ray Tune; imported only when used; honours RAY_ADDRESS).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from harness import concurrency, records
from harness.checkpoints import verify_checkpoint_bytes
from harness.errors import InputError
from harness.ray_executor import RayOptions, ray_session, run_with_ray
from harness.run import RUNS_DIR, prepare, record_path, run_code_hash, run_key, run_trial
from harness.settings import RunPlan, plan_run, plan_to_dict, section, seeds_for
from methods import method_names

EXECUTORS = ("sequential", "process", "ray")
# Ray Tune's storage, inside the records folder (a DVC output; .dvcignore and .gitignore skip it)
RAY_STORAGE = ".ray"
# Records of other code or versions, moved aside by a sweep (a folder of the records folder that
# the tables' <dataset>/*.json never reaches; .gitignore and .dvcignore skip it)
STALE = ".stale"


def grid_plans(params: dict) -> list[RunPlan]:
    """Every run of the study: per dataset, its grid rows (filtered by ``method``) x its seeds
    (``settings.seeds_for``)."""
    file = params["_file"]
    chosen = params.get("method", "all")
    if chosen != "all" and chosen not in method_names():
        raise InputError("unknown method", file=file, key="method",
                         expected=f"'all' or one of {method_names()}", found=chosen)
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
        seeds = seeds_for(params, dataset)
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
    """The plans without a record; a record that is there must be whole (``records.read_run_record``:
    InputError naming a corrupt, empty, metric-less or another run's one)."""
    todo = []
    for plan in plans:
        path = record_path(plan, run_key(plan), out_dir)
        if path.exists() or path.is_symlink():
            records.read_run_record(path)
        else:
            todo.append(plan)
    return todo


def check_can_compute(plans: list[RunPlan], out_dir: Path) -> None:
    """Before the first of ``plans`` runs: the folders their records go to can be written, every
    pre-training checkpoint they start from has the bytes recorded for it, and, where the plans
    read several datasets, one run of each prepares (its data load and tokenise, its checkpoint
    fills its backbone), so bad input stops the sweep (InputError) before any record is written,
    not after other datasets'. (With one dataset, the first run's own preparation is that check:
    ``mmpetl run`` does not prepare twice.)"""
    for folder in sorted({record_path(p, run_key(p), out_dir).parent for p in plans}):
        records.require_writable_folder(folder)
    for path in sorted({p.pretrained["path"] for p in plans if p.pretrained}):
        verify_checkpoint_bytes(path)
    inputs = {records.canonical_hash([p.dataset, p.data, p.backbone_kind, p.backbone, p.pretrained]): p
              for p in plans}
    if len(inputs) > 1:
        for plan in tqdm(inputs.values(), desc="check inputs", unit="dataset"):
            prepare(plan)


def write_index(out_dir: Path, summary: dict) -> bool:
    """Write ``<out_dir>/index.json``: every record of the folder (``summary["records"]``), its
    state, not what the sweep did (the command prints that), so a code edit and its undo leave it
    as it was. A sweep that leaves the list as it was writes nothing (it runs on a read-only
    results folder). Returns whether it wrote."""
    path = Path(out_dir) / "index.json"
    index = {"records": summary["records"]}
    if path.is_file():
        try:
            if records.read_json(path) == index:
                return False
        except (OSError, ValueError):
            pass  # an unreadable index is rewritten
    records.write_json_atomic(path, index)
    return True


def restore(plans: list[RunPlan], out_dir: Path) -> int:
    """Move back from ``.stale`` each record a plan asks for again (the same key); how many."""
    moved = 0
    for plan in plans:
        path = record_path(plan, run_key(plan), out_dir)
        aside = Path(out_dir) / STALE / path.relative_to(out_dir)
        if aside.is_file() and not path.is_file() and _move(aside, path):
            moved += 1
    return moved


def _move(source: Path, target: Path) -> bool:
    """Move a record file between the records folder and ``.stale`` (an OS error names the
    target: exit 2); False when another sweep on the folder moved it first."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    except OSError as error:
        if isinstance(error, FileNotFoundError) and not source.exists():
            return False
        raise records.write_error(target, error) from None
    return True


@contextlib.contextmanager
def worker_pool(executor: str, workers: int, ray_cpus: int | None = None):
    """What the executor keeps running across several ``run_many`` calls: the ``process``
    executor's pool (yielded), the ``ray`` executor's Ray instance (started once, not per call;
    ``ray_cpus``: the CPUs of the command's own, ``RayOptions.local_cpus``, default ``workers``).
    Pool workers are forked, so they start with torch and the harness already imported; spawned
    (a fresh interpreter each) where fork is unavailable or this process has initialised CUDA,
    which a forked child cannot use. Either way a worker is this process's child and dies with it
    (``concurrency.worker_init``); an exception or a stop signal leaving the block stops the
    workers at once (``stop_workers``) instead of letting them finish every queued run."""
    if executor not in EXECUTORS:
        raise InputError("unknown executor", key="executor", expected=EXECUTORS, found=executor)
    if executor == "ray":
        with ray_session(ray_cpus or workers):
            yield None
        return
    if executor != "process":
        yield None
        return
    forkable = "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()
    context = multiprocessing.get_context("fork" if forkable else "spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                initializer=concurrency.worker_init,
                                                initargs=(os.getpid(),)) as pool:
        try:
            yield pool
        except BaseException:
            stop_workers(pool)
            raise


# How long a worker asked to stop (SIGTERM) may take to unwind before it is killed
WORKER_GRACE_S = 10.0


def stop_workers(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Cancel the runs not started and stop the pool's workers: SIGTERM (a worker unwinds: its
    temporary record removed, its lock released), SIGKILL after ``WORKER_GRACE_S``."""
    workers = list((pool._processes or {}).values())  # Python >= 3.14: pool.terminate_workers()
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.terminate()
    deadline = time.monotonic() + WORKER_GRACE_S
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()


def run_many(plans: list[RunPlan], executor: str, workers: int, out_dir: Path,
             desc: str = "sweep", pool=None, ray_options: RayOptions | None = None) -> dict | None:
    """Run ``plans`` (not yet recorded) through ``executor``, ``workers`` at a time. The
    ``sequential`` and ``process`` executors return ``{"computed": n}``, the runs this call computed
    (not those another sweep on the folder computed meanwhile); the ``ray`` executor returns what
    came back to the driver (records received, duplicates, trials retried)."""
    values = [plan_to_dict(p) for p in plans]
    root, out = os.getcwd(), str(Path(out_dir).resolve())
    if not values:
        return
    if executor in ("sequential", "process"):
        paths = [str(record_path(p, run_key(p), Path(out))) for p in plans]
        trials = [(v, out, root, path) for v, path in zip(values, paths)]
        with concurrency.stop_on_signals():
            return {"computed": run_local(trials, executor, workers, desc, pool)}
    elif executor == "ray":  # each record is written here, on the driver, as it comes back
        keys = [run_key(p) for p in plans]
        paths = {key: record_path(p, key, Path(out)) for key, p in zip(keys, plans)}
        # every run's lock for the whole Ray sweep (another sweep on the folder waits for them,
        # then reads), taken in one order: two Ray sweeps taking them each in its plan's order
        # could each hold a lock the other waits for
        with contextlib.ExitStack() as held, concurrency.stop_on_signals():
            for path in sorted(paths.values()):
                held.enter_context(concurrency.record_lock(Path(out), path))
            left = [(key, v) for key, v in zip(keys, values) if not paths[key].is_file()]
            return run_with_ray(left, root, workers, (Path(out_dir) / RAY_STORAGE).resolve(),
                                ray_options or RayOptions(), paths.__getitem__) if left else None


def trial_once(plan_values: dict, out_dir: str, root: str, record: str) -> bool:
    """The trial of the sequential and process executors: ``run_trial`` under the run's lock,
    unless another sweep on the same folder wrote ``record`` meanwhile (waited for, then read).
    True when this call computed the run."""
    return concurrency.compute_once(Path(out_dir), Path(record),
                                    lambda: run_trial(plan_values, out_dir, root))


def run_local(trials: list[tuple], executor: str, workers: int, desc: str, pool) -> int:
    """``trial_once(*arguments)`` for each of ``trials``, in this process or in the pool's
    workers; how many runs were computed."""
    if executor == "sequential":
        return sum(trial_once(*arguments) for arguments in tqdm(trials, desc=desc, unit="run"))
    with contextlib.ExitStack() as stack:
        pool = pool or stack.enter_context(worker_pool(executor, workers))
        futures = [pool.submit(concurrency.exit_when_stopped, trial_once, *arguments)
                   for arguments in trials]
        try:
            return sum(future.result() for future in tqdm(concurrent.futures.as_completed(futures),
                                                           total=len(futures), desc=desc, unit="run"))
        except concurrent.futures.process.BrokenProcessPool:
            raise RuntimeError("a worker process died before its run finished (killed, e.g. by "
                               "the out-of-memory killer): every finished run keeps its record; "
                               "the same command resumes the rest") from None


def sweep(params: dict, executor: str = "sequential", workers: int | None = None,
          out_dir: Path = RUNS_DIR) -> dict:
    if executor not in EXECUTORS:
        raise InputError("unknown executor", key="executor", expected=EXECUTORS, found=executor)
    with records.inputs_fixed():  # every run's key is asked for several times
        return _sweep(params, executor, workers, out_dir)


# The ray executor's part of a sweep's summary when every run was recorded already (Ray not started)
NOTHING_CAME_HOME = {"records_received": 0, "duplicates": 0, "trials_retried": 0}


def _sweep(params: dict, executor: str, workers: int | None, out_dir: Path) -> dict:
    plans = grid_plans(params)
    ray_options = RayOptions.from_params(params) if executor == "ray" else None
    restored = restore(plans, out_dir)
    moved_aside = set_aside(out_dir)  # reads every record first: a corrupt one stops the sweep here
    todo = pending(plans, out_dir)
    workers = workers or max(1, min(len(todo), os.cpu_count() or 1))
    if todo:
        check_can_compute(todo, out_dir)
    came_home = run_many(todo, executor, workers, out_dir, ray_options=ray_options) or {}
    missing = pending(plans, out_dir)
    if missing:
        raise RuntimeError(f"{len(missing)} runs have no record after the sweep")
    # runs another sweep computed while this one waited for them count as recorded, not computed
    computed = came_home.get("computed", len(todo))
    return {"runs": len(plans), "computed": computed, "reused": len(plans) - computed,
            "restored": restored, "set_aside": moved_aside, "executor": executor, "workers": workers,
            "records": [str(path.relative_to(out_dir)) for path in folder_records(out_dir)],
            **({"ray": came_home or NOTHING_CAME_HOME} if executor == "ray" else {})}


def stale_reason(record: dict, hashes: dict | None = None) -> str | None:
    """Why a record's key can no longer be asked for here, or None when it can (``hashes``: a
    {method: run_code_hash} memo for many records)."""
    if record.get("packages") != records.compute_versions():
        return "other compute-package versions"
    method = record.get("method")
    if method not in method_names():
        return f"method {method!r} is not registered"
    hashes = {} if hashes is None else hashes
    if method not in hashes:
        hashes[method] = run_code_hash(method)
    if record.get("code_hash") != hashes[method]:
        return f"other code (harness or method {record['method']!r})"
    data = Path(str((record.get("data") or {}).get("path")))
    if record.get("data_hash") and data.exists() and record["data_hash"] != records.tree_hash(data):
        return f"other data (the data at {data} changed since)"
    return None


def folder_records(out_dir: Path) -> list[Path]:
    """Every run record of ``out_dir`` (``<dataset>/<row>-seed<k>-<key>.json``), sorted; not Ray's
    storage, temporaries or the set-aside ones (names starting with a dot)."""
    return [path for path in sorted(Path(out_dir).glob("*/*-seed*-*.json"))
            if not (path.parent.name.startswith(".") or path.name.startswith("."))]


def set_aside(out_dir: Path) -> int:
    """Move every record of ``out_dir`` with a ``stale_reason`` to ``out_dir/.stale/<dataset>/``
    (never deleted here); how many."""
    moved, hashes = 0, {}
    for path in folder_records(out_dir):
        try:
            record = records.read_run_record(path)
        except InputError:
            if path.exists():
                raise
            continue  # another sweep on the folder set it aside meanwhile
        if stale_reason(record, hashes) and _move(path, Path(out_dir) / STALE / path.relative_to(out_dir)):
            moved += 1
    return moved


def stale_records(out_dir: Path = RUNS_DIR) -> list[dict]:
    """The records set aside in ``out_dir/.stale``: path, dataset, method, variant, seed, why."""
    found, hashes = [], {}
    for path in sorted((Path(out_dir) / STALE).glob("*/*.json")):
        record = records.read_run_record(path)
        found.append({"path": str(path), "dataset": record.get("dataset"),
                      "method": record.get("method"), "variant": record.get("variant"),
                      "seed": record.get("seed"),
                      "why": stale_reason(record, hashes) or "current again"})
    return found


def prune_stale(out_dir: Path = RUNS_DIR) -> int:
    """Delete the records set aside in ``out_dir/.stale`` (on request only); how many."""
    files = sorted((Path(out_dir) / STALE).glob("*/*.json"))
    for path in files:
        try:
            path.unlink()
        except OSError as error:
            raise records.write_error(path, error) from None
    return len(files)
