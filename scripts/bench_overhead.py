"""Overhead benchmark (issue 16): each figure of the issue's table as a ratio of two things measured
side by side in one run (A, B, A, B, ...: both see the same machine state).

    python scripts/bench_overhead.py [--quick] [--reps N] [--threads N] [--json]

1. process:     ``mmpetl run`` (tiny MOSI, Wander d=16) as a whole process, vs a bare PyTorch loop
                (the same model, the same batches, optimiser steps and evaluation forwards, after
                imports); also the non-model time (process wall minus the bare loop).
2. trial:       a sweep trial after imports (``harness.run.execute``, a fresh run key each time), vs
                its bare loop; Wander and the linear probe.
3. sf_peak:     Wander SF forward + backward at paper-like sizes (3 x 50 tokens, width 768, d 64,
                R 8, batch 32) as a fraction of the fp32 matmul peak measured here (best of a
                2048^2 matmul); the einsum form SF had before, in the same run, for comparison.
4. cache:       one training step of a paper-size two-tower (ViT-B/16 + BERT-base sizes, random
                weights) with Wander, recomputing the frozen encoders vs reading the feature cache
                (``CachedFeatures`` + ``harness.train.batches``); the FLOP ratio of the two steps.
5. contention:  a sweep trial alone vs while one other busy process (a one-core spin loop) runs,
                under the thread policy (1 thread for tiny), and the same with 2 threads.

Everything runs in a temporary folder (generated data, feature caches, run records): the checkout
is not touched. Timings on a machine shared with other jobs are not final figures: rerun it on an
idle machine. ``--quick`` (fewer repetitions, smaller cache batch) finishes in about a minute;
the default in under five minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's harness, whatever is installed

from harness.data import generate  # noqa: E402
from harness.features import cached_splits, plan_data_hashes  # noqa: E402
from harness.run import execute, prepare  # noqa: E402
from harness.settings import load_params, plan_run  # noqa: E402
from harness.tasks.tasks import TASKS  # noqa: E402
from harness.train import batches, seed_everything  # noqa: E402
from methods import apply_method  # noqa: E402

DATASET = "mosi"
SETTINGS = {"wander": {"down_dim": 16}, "linear": {}}  # run_defaults: Wander d = 16 on MOSI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    parser.add_argument("--reps", type=int, help="A/B pairs per figure (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of sections 1-4 (default 1: the tiny policy)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    return parser.parse_args(argv)


# --- the study's tiny MOSI run, in a temporary folder --------------------------------------------
def workspace(folder: Path) -> Path:
    """params.yaml for a tiny MOSI run on data generated in ``folder`` (no pre-training checkpoint:
    the bench measures overhead, not results); returns its path."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    generate(DATASET, folder / DATASET, seed=params.get("data_seed", 0),
             **(params["generate"][DATASET] or {}))
    params["data"]["tiny"][DATASET]["path"] = str(folder / DATASET)
    params["pretrain"]["use"] = {}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def plan_for(params: dict, method: str, seed: int):
    return plan_run(params, DATASET, method, seed=seed, settings=SETTINGS[method])


class BareLoop:
    """The run's model, batches and schedule with nothing else: per epoch the training batches
    (optimiser step, StepLR, gradient clipping) and the validation forwards; the initial and
    final test / validation forwards as ``harness.train.fine_tune`` does."""

    def __init__(self, plan, cache_dir: Path):
        prepared = prepare(plan)
        backbone = prepared.backbone
        apply_method(backbone, plan.method, plan.variant, **plan.method_overrides)
        self.model, splits, _ = cached_splits(
            backbone, prepared.splits, cache_dir, plan_data_hashes(plan, prepared.data, prepared.vocab),
            batch_size=max(plan.train.batch_size, 64), progress=False)
        self.task, self.settings, self.seed = TASKS[prepared.task_name], plan.train, plan.seed
        size = max(plan.train.batch_size, 64)
        self.train_batches = list(batches(splits["train"], plan.train.batch_size, plan.seed))
        self.valid = list(batches(splits["valid"], size))
        self.test = list(batches(splits["test"], size))
        self.steps = len(self.train_batches) * plan.train.epochs

    def __call__(self) -> float:
        s, model = self.settings, self.model
        seed_everything(self.seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[s.optimizer](
            trainable, lr=s.lr, weight_decay=s.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, s.step_size, s.gamma)
        started = time.perf_counter()
        self.forwards(self.test)
        for _ in range(s.epochs):
            model.train()
            for batch in self.train_batches:
                loss = self.task.loss(model(batch).float(), batch["label"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if s.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, s.grad_clip)
                optimizer.step()
            scheduler.step()
            self.forwards(self.valid)
        self.forwards(self.test)
        self.forwards(self.valid)
        return time.perf_counter() - started

    @torch.no_grad()
    def forwards(self, batches_: list) -> None:
        self.model.eval()
        for batch in batches_:
            self.model(batch)


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- 1. the whole process ---------------------------------------------------------------------------
def bench_process(params_path: Path, folder: Path, reps: int, threads: int) -> dict:
    params = load_params(params_path)
    loop = BareLoop(plan_for(params, "wander", 0), folder / "datasets" / "features" / DATASET)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}

    def process(seed: int) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "harness.cli", "run", "--dataset", DATASET,
                        "--method", "wander", "--seed", str(seed), "--params", str(params_path),
                        "--out", str(folder / "runs"), "--json"],
                       cwd=folder, env=env, check=True, capture_output=True)
        return time.perf_counter() - started

    process(10_000)  # untimed: fills the feature cache the timed runs reuse
    walls, bare = [], []
    for rep in range(reps):
        walls.append(process(10_001 + rep))  # a new seed: a new run key, computed
        bare.append(loop())
    wall, model = median(walls), median(bare)
    return {"process_s": wall, "bare_loop_s": model, "steps": loop.steps,
            "process_ms_per_step": 1e3 * wall / loop.steps,
            "bare_ms_per_step": 1e3 * model / loop.steps, "ratio": wall / model,
            "non_model_s": wall - model, "goal": "ratio <= 3, non-model time <= 1 s"}


# --- 2. a sweep trial after imports ---------------------------------------------------------------
def bench_trial(params_path: Path, folder: Path, reps: int) -> dict:
    params = load_params(params_path)
    found = {}
    for method in SETTINGS:
        loop = BareLoop(plan_for(params, method, 0), folder / "datasets" / "features" / DATASET)
        trial, bare = [], []
        for rep in range(reps + 1):  # the first pair untimed (warm caches, lazy imports)
            plan = plan_for(params, method, 20_000 + rep)
            started = time.perf_counter()
            execute(plan, folder / "trials", progress=False)
            elapsed, model = time.perf_counter() - started, loop()
            if rep:
                trial.append(elapsed)
                bare.append(model)
        found[method] = {"trial_s": median(trial), "bare_loop_s": median(bare),
                         "ratio": median(trial) / median(bare)}
    return {**found, "goal": "ratio <= 1.1"}


# --- 3. Wander SF against the matmul peak ---------------------------------------------------------
def matmul_peak(size: int = 2048, repeats: int = 3) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


def bench_sf(reps: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from methods.wander import Wander, WanderConfig

    batch, length, width, d, rank = 32, 50, 768, 64, 8
    names = ("text", "audio", "vision")
    torch.manual_seed(0)
    module = Wander({m: width for m in names}, {m: length for m in names}, width,
                    WanderConfig(down_dim=d, rank_h=rank, rank_t=rank), "gelu")
    xs = [torch.randn(batch, length, d, requires_grad=True) for _ in names]
    upstream = torch.randn(batch, d, width)

    def two_matmuls():
        module.fuse(xs).backward(upstream)

    def einsum():  # the form SF had before (issue 16)
        terms = [torch.einsum("tl,bld,hd->bth", module.w_t[m].sum(0), x, module.w_h[m].sum(0))
                 for m, x in zip(names, xs)]
        math.prod(terms[1:], start=terms[0]).backward(upstream)

    counter = FlopCounterMode(display=False)
    with counter:
        two_matmuls()
    flops = counter.get_total_flops()
    times = {"two_matmuls": [], "einsum": []}
    peaks = []
    for _ in range(reps + 1):
        for name, step in (("two_matmuls", two_matmuls), ("einsum", einsum)):
            started = time.perf_counter()
            for _ in range(3):
                step()
            times[name].append((time.perf_counter() - started) / 3)
        peaks.append(matmul_peak())
    peak = max(peaks)
    best = {name: min(values) for name, values in times.items()}
    return {"flops": flops, "peak_gflops": peak / 1e9,
            **{f"{name}_s": value for name, value in best.items()},
            **{f"{name}_fraction_of_peak": flops / value / peak for name, value in best.items()},
            "goal": "two_matmuls_fraction_of_peak >= 0.6"}


# --- 4. feature cache at paper size ---------------------------------------------------------------
def bench_cache(folder: Path, reps: int, batch_size: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from harness.backbones.two_tower import TwoTowerBackbone, TwoTowerConfig
    from harness.features import CachedFeatures, FromCache, extract_features

    torch.manual_seed(0)
    backbone = TwoTowerBackbone(TwoTowerConfig.paper(num_classes=101, dropout=0.0))
    apply_method(backbone, "wander", down_dim=64)
    example = backbone.example_batch(2 * batch_size, seed=1)
    items = [{**{k: v[i] for k, v in example.items()}, "label": torch.tensor(i % 101),
              "index": torch.tensor(i)} for i in range(2 * batch_size)]
    cache = CachedFeatures(extract_features(backbone, items, folder / "paper-cache.h5", "bench",
                                            batch_size=batch_size, progress=False).path)
    task = TASKS["classification"]
    paths = {"recompute": (backbone, items), "cached": (FromCache(backbone), cache)}
    optimizers = {name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
                  for name, (model, _) in paths.items()}

    def step(name: str) -> None:
        model, data = paths[name]
        model.train()
        for batch in batches(data, batch_size, seed=0):
            loss = task.loss(model(batch).float(), batch["label"])
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            return

    flops = {}
    for name in paths:
        counter = FlopCounterMode(display=False)
        with counter:
            step(name)
        flops[name] = counter.get_total_flops()
    times = {name: [] for name in paths}
    for _ in range(reps):
        for name in paths:
            started = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - started)
    step_s = {name: median(values) for name, values in times.items()}
    return {"batch": batch_size, **{f"{name}_step_s": value for name, value in step_s.items()},
            "ratio": step_s["recompute"] / step_s["cached"],
            "flop_ratio": flops["recompute"] / flops["cached"],
            "goal": "ratio at the FLOP ratio (the cached loop adds nothing of its own)"}


# --- 5. contention --------------------------------------------------------------------------------
def bench_contention(params_path: Path, folder: Path, reps: int) -> dict:
    params = load_params(params_path)
    found, seed = {}, 30_000
    execute(plan_for(params, "wander", seed), folder / "contention", progress=False)  # warm
    for threads in (1, 2):
        torch.set_num_threads(threads)
        alone, busy = [], []
        for _ in range(reps):
            for times in (alone, busy):
                seed += 1
                spinner = (subprocess.Popen([sys.executable, "-c", "while True: pass"])
                           if times is busy else None)
                try:
                    started = time.perf_counter()
                    execute(plan_for(params, "wander", seed), folder / "contention", progress=False)
                    times.append(time.perf_counter() - started)
                finally:
                    if spinner is not None:
                        spinner.kill()
                        spinner.wait()
        found[f"threads_{threads}"] = {"alone_s": median(alone), "one_busy_process_s": median(busy),
                                       "slowdown": median(busy) / median(alone)}
    return {**found, "goal": "slowdown <= 1.3 under the thread policy (threads_1 for tiny)"}


def main(argv=None) -> int:
    args = parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    started = time.perf_counter()
    report = {"torch": torch.__version__, "cpus": os.cpu_count(), "threads": args.threads,
              "reps": reps, "load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        folder = Path(tmp)
        os.chdir(folder)  # feature caches (datasets/features) and records land here
        params_path = workspace(folder)
        torch.set_num_threads(args.threads)
        sections = (("process", lambda: bench_process(params_path, folder, reps, args.threads)),
                    ("trial", lambda: bench_trial(params_path, folder, reps)),
                    ("sf_peak", lambda: bench_sf(reps)),
                    ("cache", lambda: bench_cache(folder, reps, 4 if args.quick else 8)),
                    ("contention", lambda: bench_contention(params_path, folder, reps)))
        for name, run in sections:
            began = time.perf_counter()
            torch.set_num_threads(args.threads)
            report[name] = {**run(), "section_s": time.perf_counter() - began}
            print(f"{name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in _flat(report[name])), flush=True)
    report["total_s"] = time.perf_counter() - started
    report["load_average_at_end"] = os.getloadavg()
    print(f"total {report['total_s']:.0f} s; load average {report['load_average_at_start'][0]:.1f} "
          f"at start, {report['load_average_at_end'][0]:.1f} at end (above {os.cpu_count()}: "
          f"other jobs shared the machine, so these are not final figures)")
    if args.json:
        print(json.dumps(report))
    return 0


def _flat(document: dict, prefix: str = ""):
    for key, value in document.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


if __name__ == "__main__":
    sys.exit(main())
