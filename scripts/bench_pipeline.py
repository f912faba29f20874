"""Time `dvc repro` on a fresh clone of this repository (the README's main job).

    python scripts/bench_pipeline.py [--keep DIR] [--venv]            # from scratch, per stage
    python scripts/bench_pipeline.py --reuse [--keep DIR] [--venv]    # what a newcomer's clone does

From scratch (default): clones HEAD into a temporary folder and removes the committed results,
the committed pre-training checkpoints and dvc.lock there, then times one `dvc repro` (what the
README's main job runs: one dvc process, its start-up paid once) and prints the wall time of
each stage (from dvc's "Running stage" line to the next one's, so a stage's time includes dvc's
own bookkeeping of its outputs), then the total, then per dataset the fine-tuning runs' summed
`wall_s` / `train_wall_s` from the records the sweep wrote (what the finetune stage's workers
spent, before dividing by the workers). Budget for the tiny profile: 6.5 minutes (goal 5). Then
it checks that the recomputed study is the committed one (exit 1 otherwise): the pre-training
checkpoints byte for byte, every run record under its committed name (so the same run key) with
the same results (metrics, validation metrics, initial test metrics, per-epoch history, selected
epoch, tunable counts; not its timings), and the tables, leaderboards and search results.

--reuse: keeps everything the clone has (committed results, checkpoints and dvc.lock) and times
one plain `dvc repro`, then checks what the README promises: the stages that ran, how many
fine-tuning runs were computed (records that are not in the commit), `dvc.lock` identical hash
for hash (`git diff --exit-code dvc.lock`), `git status` clean and `dvc status` up to date. Goal:
0 runs computed, at most 90 s on 2 cores.

--venv: install the clone into its own virtual environment first, with the README's command
(the lock file; install time printed, not counted), and run `dvc` / `mmpetl` from it, so the
clone's code and the locked versions compute (otherwise the `mmpetl` on PATH does, with the
clone first on PYTHONPATH, so the clone's code computes).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ('python -m pip install torch==2.13.0 && python -m pip install -r requirements-lock.txt'
           ' && python -m pip install -e ".[test,ray]" --no-deps')


def run(command, folder, env, check=True):
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True, env=env,
                            shell=isinstance(command, str))
    if check and result.returncode != 0:
        print(result.stdout[-2000:], result.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"failed: {command}")
    return result


def make_venv(folder: Path, env: dict) -> dict:
    started = time.perf_counter()
    run([sys.executable, "-m", "venv", ".venv"], folder, env)
    venv_env = {**env, "PATH": f"{folder / '.venv' / 'bin'}{os.pathsep}{env['PATH']}",
                "VIRTUAL_ENV": str(folder / ".venv")}
    run(INSTALL, folder, venv_env)
    print(f"venv: {folder / '.venv'} (README install, {time.perf_counter() - started:.0f} s, not counted)")
    return venv_env


def from_scratch(folder: Path, env: dict) -> int:
    shutil.rmtree(folder / "results", ignore_errors=True)
    checkpoints = folder / "datasets" / "checkpoints"
    for checkpoint in (p for p in checkpoints.iterdir() if p.is_dir()) if checkpoints.is_dir() else ():
        shutil.rmtree(checkpoint)
    (folder / "dvc.lock").unlink(missing_ok=True)
    started = time.perf_counter()
    process = subprocess.Popen(["dvc", "repro"], cwd=folder, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    stage, stage_started, tail = None, started, []
    for line in process.stdout:  # one stage after the other: a stage ends when the next starts
        tail = (tail + [line])[-40:]
        found = re.match(r"Running stage '([^']+)'", line)
        if found:
            if stage:
                print(f"  {stage:<22} {time.perf_counter() - stage_started:7.1f} s", flush=True)
            stage, stage_started = found.group(1), time.perf_counter()
    if process.wait() != 0:
        print("".join(tail), file=sys.stderr)
        return 1
    total = time.perf_counter() - started
    if stage:
        print(f"  {stage:<22} {time.perf_counter() - stage_started:7.1f} s")
    print(f"  {'total':<22} {total:7.1f} s ({total / 60:.1f} min; budget 6.5 min, goal 5)")
    print_run_costs(folder / "results" / "runs")
    status = run(["dvc", "status"], folder, env, check=False).stdout
    print("dvc status after the run:", status.strip() or "(empty)")
    return 0 if same_as_committed(folder, env) else 1


# What a run computed; a record's other fields are its timings and provenance
RESULT_FIELDS = ("metrics", "valid_metrics", "initial_test", "history", "selected_epoch", "tunable")
# The committed outputs the recomputed study must reproduce (not results/cost.*, which times this
# machine, nor the run records, compared on RESULT_FIELDS), less where and when they were made:
# a checkpoint's provenance file and the line of a table's header naming its records' commits
COMMITTED_OUTPUTS = ("datasets/checkpoints", "results/tables", "results/leaderboards",
                     "results/metrics.json", "results/metrics_detail.json", "results/search/summary.json",
                     "results/search/trials.csv", "results/audit_grads.json", "results/audit_params.json")
PROVENANCE_SUFFIX, COMMITS_LINE = ".provenance.json", "- git commit(s): "


def same_as_committed(folder: Path, env: dict) -> bool:
    """Whether the study recomputed in ``folder`` is the committed one; prints what differs."""
    def committed_text(name: str) -> str:
        return run(["git", "show", f"HEAD:{name}"], folder, env).stdout

    def without_commits(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith(COMMITS_LINE)]

    def results(text: str) -> list:
        record = json.loads(text)
        return [record.get(field) for field in RESULT_FIELDS]

    # the run records' names, as the sweep finds them (harness.sweep: <dataset>/*-seed*-*.json)
    records = run(["git", "ls-files", "--", "results/runs/*/*-seed*-*.json"], folder, env).stdout.split()
    missing = [name for name in records if not (folder / name).is_file()]
    different = [name for name in records if name not in missing
                 and results(committed_text(name)) != results((folder / name).read_text())]
    status = run(["git", "status", "--porcelain", "--untracked-files=all", "--", *COMMITTED_OUTPUTS],
                 folder, env).stdout.splitlines()
    changed = [line for line in status if not line.endswith(PROVENANCE_SUFFIX) and not (
        line.startswith(" M ") and line.endswith(".md")
        and without_commits(committed_text(line[3:])) == without_commits((folder / line[3:]).read_text()))]
    print(f"recomputed against the commit: {len(records) - len(missing) - len(different)} of "
          f"{len(records)} run records with the committed key and the same results "
          f"({', '.join(RESULT_FIELDS)}); {len(missing)} not recomputed under that key, "
          f"{len(different)} with other results")
    for name in (missing + different)[:10]:
        print(f"  {'missing' if name in missing else 'differs'}: {name}")
    print(f"  checkpoints, tables, leaderboards, headline metrics, search, audits: "
          f"{'the same as the commit, but for the commit they name' if not changed else 'CHANGED:'}")
    for line in changed[:20]:
        print(f"    {line}")
    return not (missing or different or changed)


def print_run_costs(runs: Path) -> None:
    """Per dataset: the runs, their summed ``wall_s`` (the whole run) and ``train_wall_s``."""
    print("fine-tuning runs per dataset: runs, summed wall_s, summed train_wall_s")
    totals = [0, 0.0, 0.0]
    for folder in sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")):
        records = [json.loads(path.read_text()) for path in sorted(folder.glob("*-seed*-*.json"))]
        row = [len(records), sum(r["wall_s"] for r in records),
               sum(r["train_wall_s"] for r in records)]
        totals = [a + b for a, b in zip(totals, row)]
        print(f"  {folder.name:<22} {row[0]:4d} {row[1]:8.1f} s {row[2]:8.1f} s")
    print(f"  {'all':<22} {totals[0]:4d} {totals[1]:8.1f} s {totals[2]:8.1f} s")


def reuse(folder: Path, env: dict) -> int:
    started = time.perf_counter()
    result = run(["dvc", "repro"], folder, env, check=False)
    total = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stdout[-2000:], result.stderr[-4000:], file=sys.stderr)
        return 1
    ran = re.findall(r"Running stage '([^']+)'", result.stdout)
    new_records = [line for line in run(["git", "status", "--porcelain", "--untracked-files=all",
                                         "results/runs"], folder, env).stdout.splitlines()]
    lock_same = run(["git", "diff", "--quiet", "dvc.lock"], folder, env, check=False).returncode == 0
    git_status = run(["git", "status", "--porcelain"], folder, env).stdout.strip()
    dvc_status = run(["dvc", "status"], folder, env, check=False).stdout.strip()
    print(f"dvc repro on the fresh clone: {total:.1f} s on {os.cpu_count()} cores (goal: at most 90 s)")
    print(f"  stages run: {', '.join(ran) or 'none'}")
    print(f"  fine-tuning runs computed: {len(new_records)} (records not in the commit; goal 0)")
    print(f"  dvc.lock: {'identical, hash for hash' if lock_same else 'CHANGED (git diff dvc.lock)'}")
    print(f"  git status: {'clean' if not git_status else git_status}")
    print(f"  dvc status: {dvc_status or '(empty)'}")
    ok = not new_records and lock_same and not git_status
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="clone into this folder and keep it")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the committed results, checkpoints and dvc.lock; time one dvc repro")
    parser.add_argument("--venv", action="store_true",
                        help="install the clone into its own venv with the README's command first")
    args = parser.parse_args()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mmpetl-bench-"))
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(folder)], check=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])}
    print(f"fresh clone: {folder} (HEAD {run(['git', 'rev-parse', '--short', 'HEAD'], folder, env).stdout.strip()})")
    if args.venv:
        env = make_venv(folder, env)
    return reuse(folder, env) if args.reuse else from_scratch(folder, env)


if __name__ == "__main__":
    sys.exit(main())
