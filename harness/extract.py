"""Stage ``extract@<dataset>`` (``mmpetl extract``): fill the feature cache (``harness.features``)
that fine-tuning will look for, with the backbone a run builds."""
from __future__ import annotations

import shutil
from pathlib import Path

from harness.features import FEATURES_DIR, cache_problems, cached_splits, plan_data_hashes
from harness.run import prepare
from harness.settings import plan_run, seeds_for
from methods import apply_method


def extract_dataset(params: dict, dataset: str, out_dir: str | Path = FEATURES_DIR,
                    batch_size: int = 64, progress: bool = True) -> dict:
    """Stage ``extract@<dataset>``: the feature cache fine-tuning will look for. The backbone is
    built by ``harness.run.prepare``, as fine-tuning builds it (its frozen encoders do not depend
    on the run's seed). Returns a JSON-able summary."""
    plan = plan_run(params, dataset, "linear", seed=seeds_for(params, dataset)[0])
    prepared = prepare(plan)
    backbone = prepared.backbone
    apply_method(backbone, "linear")  # freezes the encoders: the head alone trains
    problems = cache_problems(backbone)
    summary = {"dataset": dataset, "folder": str(Path(out_dir) / dataset)}
    if problems:
        return {**summary, "skipped": problems}
    backbone.to(plan.train.device)
    _, _, info = cached_splits(backbone, prepared.splits, Path(out_dir) / dataset,
                               plan_data_hashes(plan, prepared.data, prepared.vocab), batch_size,
                               progress)
    # The stage's output is the cache of the current encoders: caches of other encoders (older
    # code or settings) go, so the folder's DVC hash depends only on what computes it now.
    current = Path(info["folder"])
    removed = sorted(p.name for p in current.parent.iterdir() if p.is_dir() and p != current)
    for name in removed:
        shutil.rmtree(current.parent / name)
    return {**summary, **info, "removed": removed}
