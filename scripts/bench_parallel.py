"""Wall time of one finetune grid under each executor, side by side in one run.

    python scripts/bench_parallel.py [--rows 25] [--seeds 3] [--workers 2] [--repeat 5]
                                     [--executors sequential,process,ray,ray-running]

The grid is the study's own: the first ``--rows`` MOSI rows of params.yaml times the first
``--seeds`` of MOSI's seeds (``settings.seeds_for``) (default: all 25 rows x 3 seeds = 75 trials,
the MOSI part of stage finetune; tiny profile, MOSI generated as stage data@mosi does, in a
temporary folder; no pre-trained checkpoint). Fixed costs (Ray's start and stop, worker start-up)
weigh less the more trials share them; a grid of fewer trials shows them (``--seeds 1``).
Each executor runs it as a fresh ``mmpetl sweep`` command into its own empty record folder, so
each wall time is what a user waits for: interpreter and imports, worker start-up, every trial,
the index (the frozen encoders' feature cache is built before any of them). Prints the wall
times, each executor's summed trial time (the records' ``wall_s``), the ratio of sequential to
each other executor (target >= 1.6x on 2 cores), and whether every executor gave identical
metrics (exit 1 if not). ``--repeat`` runs the sweeps that many times (the order
of the other executors rotating) between sequential sweeps (one more than the repetitions): each
ratio is the mean of the two sequential sweeps around it over the executor's wall time, so a
drift of the machine's speed during a repetition weighs on both sides alike (this shared machine
ran the same sweep 84 s and then 188 s within minutes); it prints the median and range of each
ratio over the repetitions. The ``ray`` sweep batches
``executor.runs_per_trial`` runs per Tune trial (params.yaml) and starts and stops a Ray instance of
its own, as ``mmpetl sweep --executor ray`` does without RAY_ADDRESS. ``ray-running`` is the same
sweep joining a Ray instance started once before the timings (``harness.ray_local``'s ``ray start
--head --block``, stopped at the end; RAY_ADDRESS), as on a cluster that is up: it shows what the trials cost without the
instance's start and stop (the instance's idle processes run during every executor's sweeps).
``--executors`` leaves some out (sequential, the reference, always runs; default all but
ray-running). The temporary folder is removed at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXECUTORS = ("sequential", "process", "ray", "ray-running")
# the running instance and its sweeps: no token (a token file in ~/.ray would otherwise be asked for)
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None, help="first MOSI grid rows (default all)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="first of MOSI's seeds in params.yaml (default all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of the sweeps")
    parser.add_argument("--executors", default=",".join(EXECUTORS[:3]),
                        help="comma-separated executors to time (sequential always runs)")
    args = parser.parse_args()
    executors = ("sequential", *[e for e in EXECUTORS[1:] if e in args.executors.split(",")])
    unknown = set(args.executors.split(",")) - set(EXECUTORS)
    if unknown or len(executors) < 2:
        parser.error(f"--executors: expected sequential and one or more of {', '.join(EXECUTORS[1:])} "
                     f"(found {args.executors!r})")
    from harness.settings import seeds_for

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    rows, seeds = params["grid"]["mosi"][: args.rows], seeds_for(params, "mosi")[: args.seeds]
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1 (found {args.repeat})")
    if len(rows) * len(seeds) < 8:
        parser.error(f"the grid must have >= 8 trials (found {len(rows)} rows x {len(seeds)} seeds)")
    folder = Path(tempfile.mkdtemp(prefix="mmpetl-parallel-"))
    try:
        return compare(params, rows, seeds, executors, args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def compare(params: dict, rows: list, seeds: list, executors: tuple, args, folder: Path) -> int:
    """Generate MOSI into ``folder``, then time the sweeps ``args.repeat`` times; 0 when every
    executor gave the same metrics every time."""
    from harness.data import generate

    generate("mosi", folder / "mosi", seed=params["data_seed"], **params["generate"]["mosi"])
    params.update(profile="tiny", datasets=["mosi"], method="all", seeds=seeds, seeds_by_dataset={},
                  grid={"mosi": rows})
    params["data"]["tiny"]["mosi"]["path"] = str(folder / "mosi")
    params["pretrain"]["use"] = {}
    (folder / "params.yaml").write_text(yaml.safe_dump(params))

    # the frozen encoders' cache is built once beforehand, so no executor pays for it (or reuses
    # the one an earlier executor built)
    subprocess.run([sys.executable, "-m", "harness.cli", "extract", "--dataset", "mosi", "--params",
                    str(folder / "params.yaml"), "--json"], cwd=folder, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with contextlib.ExitStack() as stack:
        address = stack.enter_context(running_ray(args.workers)) if "ray-running" in executors else None
        return time_sweeps(executors, args, folder, address)


def time_sweeps(executors: tuple, args, folder: Path, address: str | None) -> int:
    """The timed repetitions; 0 when every executor gave the same metrics every time. Sequential
    sweeps bracket each repetition (one before the first, one after each), and each other
    executor's sweep is compared with the mean of the two around it: the machine's speed drifts
    by up to 2x within minutes here, and a drift then weighs on both sides of a ratio alike."""
    others = executors[1:]
    ratios, same = {executor: [] for executor in others}, True
    print("sequential sweep before the first repetition", flush=True)
    before, reference = timed_sweep("sequential", args.workers, folder, folder / "runs-sequential-0", address)
    for repetition in range(args.repeat):
        times, metrics = {}, {}
        shift = repetition % len(others)
        order = others[shift:] + others[:shift]
        print(f"repetition {repetition + 1}/{args.repeat} (order: {', '.join(order)}, sequential)", flush=True)
        for executor in order:
            out = folder / f"runs-{repetition}-{executor}"
            times[executor], metrics[executor] = timed_sweep(executor, args.workers, folder, out, address)
        after, metrics["sequential"] = timed_sweep("sequential", args.workers, folder,
                                                   folder / f"runs-sequential-{repetition + 1}", address)
        same = same and all(found == reference for found in metrics.values())
        bracket = (before + after) / 2
        for executor in order:
            ratios[executor].append(bracket / times[executor])
        print(f"  sequential (mean of {before:.1f} and {after:.1f} s) / " +
              ", ".join(f"{e} {ratios[e][-1]:.2f}x" for e in order), flush=True)
        before = after
    print(f"identical metrics across executors in every repetition: {same}")
    for executor, found in ratios.items():
        print(f"speed-up sequential / {executor + ':':<12} median {statistics.median(found):.2f}x, "
              f"range {min(found):.2f}-{max(found):.2f}x over {len(found)} repetitions "
              f"(workers {args.workers}; target >= 1.6x on 2 cores)")
    return 0 if same else 1


@contextlib.contextmanager
def running_ray(workers: int):
    """A Ray head of ``workers`` CPUs running until the block ends, as ``mmpetl sweep`` starts its own
    (``harness.ray_local``); yields its address."""
    from harness.ray_local import running

    os.environ["RAY_AUTH_MODE"] = RAY_ENV["RAY_AUTH_MODE"]  # the head's, as the sweeps joining it
    with running(workers) as head:
        yield head.address()


def timed_sweep(executor: str, workers: int, folder: Path, out: Path,
                address: str | None) -> tuple[float, list[str]]:
    """Wall time of one fresh ``mmpetl sweep`` into the empty folder ``out``, and its metrics;
    ``ray-running`` joins the Ray instance at ``address``."""
    workers = 1 if executor == "sequential" else workers
    env = {k: v for k, v in RAY_ENV.items() if k != "RAY_ADDRESS"}
    if executor == "ray-running":
        env["RAY_ADDRESS"] = address
    command = [sys.executable, "-m", "harness.cli", "sweep", "--executor", executor.split("-")[0],
               "--workers", str(workers), "--params", str(folder / "params.yaml"),
               "--out", str(out), "--json"]
    started = time.perf_counter()
    # run in the temporary folder: feature caches land there, not in this checkout's DVC outputs
    done = subprocess.run(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{executor}: mmpetl sweep exited {done.returncode}")
    computed = json.loads(done.stdout)["computed"]
    found = [json.loads(p.read_text()) for p in out.glob("mosi/*.json")]
    print(f"  {executor:<11} {computed} trials, {workers} worker(s): wall {wall:6.1f} s, trials' own "
          f"time summed {sum(r['wall_s'] for r in found):6.1f} s", flush=True)
    return wall, sorted(json.dumps([r["row"], r["metrics"]], sort_keys=True) for r in found)


if __name__ == "__main__":
    sys.exit(main())
