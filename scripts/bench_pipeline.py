"""Time `dvc repro` stage by stage on a fresh clone of this repository (the README's main job).

    python scripts/bench_pipeline.py [--keep DIR]

Clones HEAD into a temporary folder and removes the committed results and dvc.lock there (a
clone that keeps them finds the fine-tuning records already made and skips those stages), then
runs every stage of dvc.yaml in order with `dvc repro --single-item <stage>` (inputs come from the
stages before it) and prints the wall time of each, then the total. The budget for the tiny
profile is 10 minutes (goal 5).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="clone into this folder and keep it")
    args = parser.parse_args()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mmpetl-bench-"))
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(folder)], check=True)
    shutil.rmtree(folder / "results", ignore_errors=True)
    (folder / "dvc.lock").unlink(missing_ok=True)
    stages = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=folder, check=True,
                            capture_output=True, text=True).stdout.split()
    print(f"fresh clone: {folder}\n{len(stages)} stages")
    timings, started = [], time.perf_counter()
    for stage in stages:
        t0 = time.perf_counter()
        result = subprocess.run(["dvc", "repro", "--single-item", stage], cwd=folder,
                                capture_output=True, text=True)
        timings.append((stage, time.perf_counter() - t0))
        print(f"  {stage:<22} {timings[-1][1]:7.1f} s", flush=True)
        if result.returncode != 0:
            print(result.stdout[-2000:], result.stderr[-4000:], file=sys.stderr)
            return 1
    total = time.perf_counter() - started
    print(f"  {'total':<22} {total:7.1f} s ({total / 60:.1f} min; budget 10 min, goal 5)")
    status = subprocess.run(["dvc", "status"], cwd=folder, capture_output=True, text=True).stdout
    print("dvc status after the run:", status.strip() or "(empty)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
