"""Overhead benchmark (issue 16): each figure of the issue's table as a ratio of two things measured
side by side in one run (A, B, A, B, ...: both see the same machine state).

    python scripts/bench_overhead.py [--quick] [--reps N] [--threads N] [--only SECTION ...] [--json]

1. process:     ``mmpetl run`` (tiny MOSI, Wander d=16) as a whole process, vs a bare process: a
                fresh ``python`` that imports torch, loads the same model and batches (unpickling
                imports the model's classes) and runs the same loop (the same batches, optimiser
                steps, StepLR and evaluation forwards) with the update ``mmpetl`` uses
                (``harness.optim``: torch.optim's would add its ``torch._dynamo`` import). Also the
                non-model time: the process wall minus the loop alone (in this process, after
                imports), and, for reference, ``python -c pass`` and ``python -c "import torch"``.
2. trial:       a sweep trial after imports (``harness.run.execute``, a fresh run key each time), vs
                its bare loop; Wander and the linear probe.
3. sf_peak:     Wander SF forward + backward at paper-like sizes (3 x 50 tokens, width 768, d 64,
                R 8, batch 32) as a fraction of the fp32 matmul peak measured here (best of a
                2048^2 matmul); the einsum form SF had before, and SF's matmuls alone (each
                modality's term and its backward, without the product over modalities), in the
                same run, for comparison.
                FLOPs are those of Eq. 13 written plainly (the einsum form's matmuls, forward and
                backward, counted by FlopCounterMode), whatever ``fuse`` itself runs.
4. cache:       one training step of a paper-size two-tower (ViT-B/16 + BERT-base sizes, random
                weights) with Wander, recomputing the frozen encoders vs reading the feature cache
                (``CachedFeatures`` + ``harness.train.batches``); the FLOP ratio of the two steps.
5. contention:  a sweep trial alone vs while one other busy process (a one-core spin loop) runs,
                under the thread policy (1 thread for tiny), and the same with 2 threads.
6. attention:   ``harness.backbones.layers.short_cpu_attention`` (explicit matmuls, keys padded
                to 16), which ``Attention`` runs on CPU for fewer than 16 keys, vs
                ``F.scaled_dot_product_attention``, forward + backward, batch 32: the planted
                tasks' 12 tokens of width 64, 8 heads (MOSI and IEMOCAP have 16 and keep SDPA),
                and 15 tokens of width 768, 12 heads;
                and, where ``Attention`` keeps SDPA, 33 tokens of width 128, 4 heads (the tiny
                two-tower fusion); the largest difference of the outputs.

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

_STARTED = time.perf_counter()  # the bare process (section 1) times its own torch import
import torch  # noqa: E402

_TORCH_IMPORTED = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's harness, whatever is installed
# The harness is imported inside the functions that use it: the bare process (``--bare-process``)
# runs this file and must import no more than torch and the model's own classes.

DATASET = "mosi"
SETTINGS = {"wander": {"down_dim": 16}, "linear": {}}  # run_defaults: Wander d = 16 on MOSI
SECTIONS = ("process", "trial", "sf_peak", "cache", "contention", "attention")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    parser.add_argument("--reps", type=int, help="A/B pairs per figure (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of sections 1-4 (default 1: the tiny policy)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--bare-process", metavar="FILE", help=argparse.SUPPRESS)  # section 1's child
    return parser.parse_args(argv)


# --- the study's tiny MOSI run, in a temporary folder --------------------------------------------
def workspace(folder: Path) -> Path:
    """params.yaml for a tiny MOSI run on data generated in ``folder`` (no pre-training checkpoint:
    the bench measures overhead, not results); returns its path."""
    import yaml

    from harness.data import generate

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    generate(DATASET, folder / DATASET, seed=params.get("data_seed", 0),
             **(params["generate"][DATASET] or {}))
    params["data"]["tiny"][DATASET]["path"] = str(folder / DATASET)
    params["pretrain"]["use"] = {}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def plan_for(params: dict, method: str, seed: int):
    from harness.settings import plan_run

    return plan_run(params, DATASET, method, seed=seed, settings=SETTINGS[method])


class BareLoop:
    """The run's model, batches and schedule with nothing else: per epoch that epoch's training
    batches, the run's own (the same seeded order, cut before timing; the run cuts them as it
    goes), with the optimiser step, StepLR and gradient clipping, and the validation forwards; the initial and
    final test / validation forwards as ``harness.train.fine_tune`` does. Picklable with what
    torch and the model's classes need only (the bare process of section 1 loads it)."""

    def __init__(self, plan, cache_dir: Path):
        from harness.features import cached_splits, plan_data_hashes
        from harness.run import prepare
        from harness.tasks.tasks import TASKS
        from harness.train import batches
        from methods import apply_method

        prepared = prepare(plan)
        backbone = prepared.backbone
        apply_method(backbone, plan.method, plan.variant, **plan.method_overrides)
        self.model, splits, _ = cached_splits(
            backbone, prepared.splits, cache_dir, plan_data_hashes(plan, prepared.data, prepared.vocab),
            batch_size=max(plan.train.batch_size, 64), progress=False)
        s = plan.train
        self.loss, self.seed = TASKS[prepared.task_name].loss, plan.seed
        self.schedule = {"lr": s.lr, "weight_decay": s.weight_decay, "adamw": s.optimizer == "adamw",
                         "step_size": s.step_size, "gamma": s.gamma, "epochs": s.epochs,
                         "grad_clip": s.grad_clip}
        size = max(s.batch_size, 64)
        train = batches(splits["train"], s.batch_size, plan.seed)  # a new order every pass, as in the run
        self.epoch_batches = [list(train) for _ in range(s.epochs)]  # the run's steps, cut before timing
        self.valid = list(batches(splits["valid"], size))
        self.test = list(batches(splits["test"], size))
        self.steps = sum(map(len, self.epoch_batches))

    def __call__(self) -> float:
        from harness.optim import Adam, StepLR

        s, model = self.schedule, self.model
        torch.manual_seed(self.seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = Adam(trainable, lr=s["lr"], weight_decay=s["weight_decay"],
                         decoupled_weight_decay=s["adamw"])
        scheduler = StepLR(optimizer, s["step_size"], s["gamma"])
        started = time.perf_counter()
        self.forwards(self.test)
        for train_batches in self.epoch_batches:
            model.train()
            for batch in train_batches:
                loss = self.loss(model(batch).float(), batch["label"])
                optimizer.zero_grad()
                loss.backward()
                if s["grad_clip"] > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, s["grad_clip"])
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
    from harness.settings import load_params

    params = load_params(params_path)
    loop = BareLoop(plan_for(params, "wander", 0), folder / "datasets" / "features" / DATASET)
    loop_file = folder / "bare-loop.pt"
    torch.save(loop, loop_file)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}

    def wall(*command: str) -> tuple[float, str]:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, *command], cwd=folder, env=env, check=True,
                              capture_output=True, text=True)
        return time.perf_counter() - started, done.stdout

    def mmpetl(seed: int) -> float:  # a new seed: a new run key, computed
        return wall("-m", "harness.cli", "run", "--dataset", DATASET, "--method", "wander",
                    "--seed", str(seed), "--params", str(params_path), "--out",
                    str(folder / "runs"), "--json")[0]

    mmpetl(10_000)  # untimed: fills the feature cache the timed runs reuse
    times = {name: [] for name in ("process", "bare_process", "bare_loop", "python", "import_torch")}
    parts = {name: [] for name in ("bare_import_torch", "bare_load_model", "bare_steps")}
    for rep in range(reps):
        times["process"].append(mmpetl(10_001 + rep))
        elapsed, report = wall(str(Path(__file__).resolve()), "--bare-process", str(loop_file))
        times["bare_process"].append(elapsed)
        for name, value in json.loads(report).items():
            parts[f"bare_{name}"].append(value)
        times["bare_loop"].append(loop())
        times["python"].append(wall("-c", "pass")[0])
        times["import_torch"].append(wall("-c", "import torch")[0])
    found = {f"{name}_s": median(values) for name, values in {**times, **parts}.items()}
    process, bare_process, model = found["process_s"], found["bare_process_s"], found["bare_loop_s"]
    return {**found, "steps": loop.steps, "ratio": process / bare_process,
            "ratio_vs_loop_alone": process / model, "non_model_s": process - model,
            "beyond_bare_process_s": process - bare_process,
            "goal": "ratio <= 3, non-model time <= 1 s"}


def bare_process(loop_file: str) -> dict:
    """Section 1's bare process: load the pickled ``BareLoop`` (the model, batches and schedule)
    and run it once; its import of torch, the load and the loop, in seconds."""
    loaded = time.perf_counter()
    loop = torch.load(loop_file, weights_only=False)
    load_s = time.perf_counter() - loaded
    return {"import_torch": _TORCH_IMPORTED - _STARTED, "load_model": load_s, "steps": loop()}


# --- 2. a sweep trial after imports ---------------------------------------------------------------
def bench_trial(params_path: Path, folder: Path, reps: int) -> dict:
    from harness import records

    with records.inputs_fixed():  # as in a sweep's worker: data and code hashed once per sweep
        return _bench_trial(params_path, folder, reps)


def _bench_trial(params_path: Path, folder: Path, reps: int) -> dict:
    from harness.run import execute
    from harness.settings import load_params

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

    def matmuls_alone():  # fuse()'s matmuls and their backward, without the product over modalities
        terms = [torch.bmm(module.w_t[m].sum(0).expand(batch, -1, -1), x) @ module.w_h[m].sum(0).T.contiguous()
                 for m, x in zip(names, xs)]
        torch.autograd.backward(terms, [upstream] * len(terms))

    def einsum():  # the form SF had before (issue 16)
        terms = [torch.einsum("tl,bld,hd->bth", module.w_t[m].sum(0), x, module.w_h[m].sum(0))
                 for m, x in zip(names, xs)]
        math.prod(terms[1:], start=terms[0]).backward(upstream)

    counter = FlopCounterMode(display=False)
    with counter:  # the useful FLOPs: Eq. 13's matmuls, not what an implementation adds
        einsum()
    flops = counter.get_total_flops()
    steps = {"two_matmuls": two_matmuls, "matmuls_alone": matmuls_alone, "einsum": einsum}
    times = {name: [] for name in steps}
    peaks = []
    for _ in range(reps + 1):
        for name, step in steps.items():
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
    from harness.optim import Adam
    from harness.tasks.tasks import TASKS
    from harness.train import batches
    from methods import apply_method

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
    optimizers = {name: Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                             weight_decay=1e-2, decoupled_weight_decay=True)  # AdamW's defaults
                  for name, (model, _) in paths.items()}

    def step(name: str) -> None:
        model, data = paths[name]
        model.train()
        for batch in batches(data, batch_size, seed=0):
            loss = task.loss(model(batch).float(), batch["label"])
            optimizers[name].zero_grad()
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
    from harness.run import execute
    from harness.settings import load_params

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


# --- 6. CPU attention vs SDPA --------------------------------------------------------------------
ATTENTION_SIZES = {"tokens_12_width_64": (12, 64, 8), "tokens_15_width_768": (15, 768, 12),
                   "tokens_33_width_128_sdpa_kept": (33, 128, 4)}


def bench_attention(reps: int, batch: int = 32) -> dict:
    import torch.nn.functional as F

    from harness.backbones.layers import Attention, short_cpu_attention

    found = {}
    for name, (length, width, heads) in ATTENTION_SIZES.items():
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, length, width, requires_grad=True) for _ in range(3))
        upstream = torch.randn(batch, length, width)
        mask = torch.rand(batch, length) > 0.2
        mask[:, 0] = True

        def sdpa():
            def split(t):
                return t.view(batch, length, heads, width // heads).transpose(1, 2)
            return F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask[:, None, None, :]
                                                  ).transpose(1, 2).reshape(batch, length, width)

        def ours():
            return short_cpu_attention(q, k, v, mask, heads, 0.0, Attention.SHORT).reshape(batch, length, width)

        times = {"sdpa": [], "ours": []}
        for _ in range(reps + 1):  # the first pair untimed
            for label, attend in (("sdpa", sdpa), ("ours", ours)):
                started = time.perf_counter()
                for _ in range(20):
                    attend().backward(upstream)
                times[label].append((time.perf_counter() - started) / 20)
        with torch.no_grad():
            difference = (ours() - sdpa()).abs().max().item()
        best = {label: min(values[1:]) for label, values in times.items()}
        found[name] = {"sdpa_ms": 1e3 * best["sdpa"], "ours_ms": 1e3 * best["ours"],
                       "speedup": best["sdpa"] / best["ours"], "max_abs_difference": difference}
    return {**found, "goal": "speedup > 1 below 16 tokens (where Attention uses it); no gain at 33"}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.bare_process:
        print(json.dumps(bare_process(args.bare_process)))
        return 0
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
                    ("contention", lambda: bench_contention(params_path, folder, reps)),
                    ("attention", lambda: bench_attention(reps)))
        for name, run in sections:
            if args.only and name not in args.only:
                continue
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
