"""Wall time of one finetune grid under each executor, side by side in one run.

    python scripts/bench_parallel.py [--rows 8] [--workers 2]

Builds a grid of tiny MOSI trials (generated data in a temporary folder), runs it with the
sequential, process and ray executors into separate empty record folders, checks that the three
give identical metrics, and prints the wall times and the ratios sequential / process and
sequential / ray (target >= 1.6x on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16, help="trials in the grid (>= 8)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from harness.data import generate
    from harness.settings import load_params
    from harness.sweep import sweep

    folder = Path(tempfile.mkdtemp(prefix="mmpetl-parallel-"))
    generate("mosi", folder / "mosi", seed=0, n_train=256, interaction_scope="pooled")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    rows = [{"method": "lora", "rank": r} for r in (2, 4, 8, 16)]
    rows += [{"method": "adapter", "down_dim": d} for d in (4, 8, 16, 32)]
    rows += [{"method": m} for m in ("ptuning", "maple", "pmf", "full")]
    rows += [{"method": "wander", "down_dim": d} for d in (8, 16, 32, 64)]
    params.update(datasets=["mosi"], seeds=[0], grid={"mosi": rows[: args.rows]})
    params["data"]["tiny"]["mosi"]["path"] = str(folder / "mosi")
    params["pretrain"]["use"] = {}
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    loaded = load_params(folder / "params.yaml")

    times, metrics = {}, {}
    for executor in ("sequential", "process", "ray"):
        out = folder / f"runs-{executor}"
        started = time.perf_counter()
        summary = sweep(loaded, executor, 1 if executor == "sequential" else args.workers, out)
        times[executor] = time.perf_counter() - started
        metrics[executor] = sorted(json.dumps([json.loads(p.read_text())["row"],
                                               json.loads(p.read_text())["metrics"]], sort_keys=True)
                                   for p in out.glob("mosi/*.json"))
        print(f"{executor:<10} {summary['computed']} trials in {times[executor]:6.1f} s", flush=True)
    same = metrics["sequential"] == metrics["process"] == metrics["ray"]
    print(f"identical metrics across executors: {same}")
    print(f"speed-up sequential / process: {times['sequential'] / times['process']:.2f}x")
    print(f"speed-up sequential / ray:     {times['sequential'] / times['ray']:.2f}x  "
          f"(workers {args.workers}; target >= 1.6x on 2 cores)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
