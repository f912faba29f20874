"""Extraction benchmark: fine-tuning an after-the-last-layer method (Wander, insert=last) on cached
encoder features versus recomputing the frozen encoders every step, on the tiny two-tower
(Food-101) setup of params.yaml, measured side by side in one process.

    python scripts/bench_extract.py [--steps 30] [--threads 1] [--rounds 5] [--json]

What it does: generates the tiny Food-101 data in a temporary folder, builds the backbone and the
run exactly as ``mmpetl run --dataset food101 --method wander`` would (params.yaml ``profiles.tiny``,
``train.food101``; Wander down_dim 16, fused_length 16), extracts the train / test features once
(timed), then trains two identical copies for ``--steps`` optimiser steps each:

  (a) recompute: the full backbone forward every step (frozen ViT + BERT, then Wander + head),
      in train mode as ``harness.train.fine_tune`` runs it;
  (b) cached:    ``FromCache`` on the cached states (Wander + head only).

The steps alternate in ``--rounds`` blocks (a, b, a, b, ...) so that both paths see the same machine
state. Each path is timed twice: end to end (DataLoader + step: what fine-tuning costs) and compute
only (the same batches collated beforehand: the model step alone). Finally both paths' logits are
compared on a test batch with identical weights (eval mode; the cache stores fp16, so expect ~1e-3).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per path (default 30)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating blocks per path (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per path first (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--backbone-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profiles.tiny.two_tower setting (repeatable), e.g. "
                             "image_layers=6 --backbone-set text_layers=6")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def build(args, workdir: Path):
    """The tiny two-tower Wander run of params.yaml on freshly generated data."""
    from harness.backbones import build_backbone
    from harness.data import generate
    from harness.run import load_splits, task_for
    from harness.train import seed_everything
    from harness.settings import load_params, plan_run
    from methods import apply_method

    params = load_params(args.params)
    params["profile"] = "tiny"
    generate("food101", workdir / "food101", seed=params.get("data_seed", 0),
             **((params.get("generate") or {}).get("food101") or {}))
    plan = plan_run(params, "food101", "wander", seed=args.seed,
                    settings={"down_dim": 16, "fused_length": 16})
    plan.data = {**plan.data, "path": str(workdir / "food101")}
    for pair in args.backbone_set:
        key, _, value = pair.partition("=")
        plan.backbone = {**plan.backbone, key.strip(): yaml.safe_load(value)}
    data, splits, vocab = load_splits(plan)
    task_name, output_dim = task_for(data.info)
    seed_everything(plan.seed)
    backbone = build_backbone(plan.backbone_kind, plan.backbone, data.info, output_dim,
                              vocab_size=len(vocab) if vocab else None)
    apply_method(backbone, plan.method, plan.variant, **plan.method_overrides)
    return plan, data, splits, vocab, task_name, backbone


class Trainer:
    """The inner loop of harness.train.fine_tune (optimiser, loss, grad clip), one step at a time."""

    def __init__(self, model: nn.Module, task, dataset, settings, seed: int):
        self.model, self.task, self.settings = model, task, settings
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[settings.optimizer]
        self.optimizer = optimizer(self.trainable, lr=settings.lr, weight_decay=settings.weight_decay)
        self.loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(seed))
        self.batches = iter(())

    def next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def step(self, batch) -> float:
        self.model.train()
        loss = self.task.loss(self.model(batch).float(), batch["label"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.settings.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.trainable, self.settings.grad_clip)
        self.optimizer.step()
        return loss.item()


def side_by_side(trainers: dict[str, Trainer], steps: int, rounds: int, warmup: int,
                 pre_collated: bool) -> dict[str, float]:
    """Seconds per path for ``steps`` steps, run in alternating blocks."""
    fixed = {}
    if pre_collated:  # batches collated beforehand, reused in turn: the model step alone
        fixed = {name: [t.next_batch() for _ in range(min(steps, len(t.loader)))]
                 for name, t in trainers.items()}
    counters = dict.fromkeys(trainers, 0)

    def batch_for(name):
        if not pre_collated:
            return trainers[name].next_batch()
        counters[name] += 1
        return fixed[name][counters[name] % len(fixed[name])]

    for name, trainer in trainers.items():
        for _ in range(warmup):
            trainer.step(batch_for(name))
    seconds = dict.fromkeys(trainers, 0.0)
    blocks = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    for block in blocks:
        for name, trainer in trainers.items():
            started = time.perf_counter()
            for _ in range(block):
                trainer.step(batch_for(name))
            seconds[name] += time.perf_counter() - started
    return seconds


@torch.no_grad()
def logits_diff(backbone: nn.Module, cached_model: nn.Module, raw, cached, count: int) -> float:
    """Max |full forward - cached forward| on the first ``count`` test items, eval mode."""
    from torch.utils.data import default_collate

    backbone.eval()
    cached_model.eval()
    full = backbone(default_collate([raw[i] for i in range(count)]))
    fast = cached_model(default_collate([cached[i] for i in range(count)]))
    return (full - fast).abs().max().item()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from harness.features import cached_splits, split_hash, FromCache
    from harness.tasks.tasks import TASKS

    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        workdir = Path(tmp)
        plan, data, splits, vocab, task_name, backbone = build(args, workdir)
        settings = plan.train
        options = {k: v for k, v in plan.data.items() if k != "path"}
        options["vocab"] = sorted(vocab.index) if vocab else None
        hashes = {name: split_hash(data, name, **options) for name in ("train", "test")}
        use = {name: splits[name] for name in hashes}

        started = time.perf_counter()
        _, cached, info = cached_splits(backbone, use, workdir / "features", hashes,
                                        batch_size=64, progress=not args.no_progress)
        extract_s = time.perf_counter() - started
        started = time.perf_counter()
        _, _, again = cached_splits(backbone, use, workdir / "features", hashes,
                                    batch_size=64, progress=False)
        reload_s = time.perf_counter() - started
        cache_bytes = sum(Path(p["path"]).stat().st_size for p in info["splits"].values())

        recompute_model = copy.deepcopy(backbone)
        cached_backbone = copy.deepcopy(backbone)
        cached_model = FromCache(cached_backbone)
        count = min(64, len(splits["test"]))
        diff_init = logits_diff(cached_backbone, cached_model, splits["test"], cached["test"], count)

        task = TASKS[task_name]
        results = {}
        for label, pre in (("end_to_end", False), ("compute_only", True)):
            torch.manual_seed(args.seed)
            trainers = {"recompute": Trainer(recompute_model, task, splits["train"], settings, args.seed),
                        "cached": Trainer(cached_model, task, cached["train"], settings, args.seed)}
            seconds = side_by_side(trainers, args.steps, args.rounds, args.warmup, pre)
            results[label] = {name: args.steps / s for name, s in seconds.items()}
            results[label]["ratio"] = results[label]["cached"] / results[label]["recompute"]
        diff_trained = logits_diff(cached_backbone, cached_model, splits["test"], cached["test"], count)

    figures = {
        "setup": {"profile": "tiny", "backbone": "two_tower", "backbone_settings": plan.backbone,
                  "method": "wander", "method_config": plan.method_overrides,
                  "batch_size": settings.batch_size, "optimizer": settings.optimizer,
                  "steps_per_path": args.steps, "rounds": args.rounds, "warmup": args.warmup,
                  "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                  "train_items": len(splits["train"]), "test_items": len(splits["test"])},
        "extract": {"seconds": extract_s, "items": sum(len(c) for c in cached.values()),
                    "reuse_seconds": reload_s, "cache_mb": cache_bytes / 2**20,
                    "status": {n: s["status"] for n, s in info["splits"].items()},
                    "status_second_call": {n: s["status"] for n, s in again["splits"].items()}},
        "steps_per_s": results,
        "logits_max_abs_diff": {"init": diff_init, "after_training": diff_trained,
                                "items": count},
    }
    s, e = figures["setup"], figures["extract"]
    print(f"Extraction benchmark: tiny two-tower (Food-101){' (modified)' if args.backbone_set else ''}, "
          f"Wander insert=last "
          f"(down_dim 16, fused_length 16)")
    print(f"  torch threads: {s['torch_threads']} | torch {s['torch']} | batch {s['batch_size']} | "
          f"{s['optimizer']} | {s['train_items']} train items | {args.steps} steps per path in "
          f"{args.rounds} alternating blocks after {args.warmup} warm-up steps")
    print(f"  backbone settings: {plan.backbone}")
    print(f"  one-off extraction (train + test, {e['items']} items, fp16, {e['cache_mb']:.2f} MiB): "
          f"{e['seconds']:.3f} s; second call (hashes match, cache reused): {e['reuse_seconds']:.3f} s")
    for label, title in (("end_to_end", "end to end (DataLoader + step)"),
                         ("compute_only", "compute only (pre-collated batches)")):
        r = results[label]
        print(f"  {title}:")
        print(f"    (a) recompute frozen encoders each step: {r['recompute']:8.2f} steps/s")
        print(f"    (b) from cached features:                {r['cached']:8.2f} steps/s")
        print(f"    ratio cached / recompute:                {r['ratio']:8.2f} x")
    print(f"  logits max |full - cached| on {count} test items (same weights, eval mode): "
          f"at init {diff_init:.2e}, after cached training {diff_trained:.2e}")
    break_even = e["seconds"] / (1 / results["end_to_end"]["recompute"] - 1 / results["end_to_end"]["cached"])
    print(f"  extraction pays for itself after ~{break_even:.0f} training steps "
          f"(one tiny run: {plan.train.epochs} epochs x {-(-s['train_items'] // s['batch_size'])} steps)")
    print("  note: (a) runs the frozen towers in train mode (their dropout active, as fine_tune does); "
          "(b) uses states computed in eval mode")
    if args.json:
        print(json.dumps(figures, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
