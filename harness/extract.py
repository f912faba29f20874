"""Stage ``extract@<dataset>`` (``mmpetl extract``): fill the feature cache (``harness.features``)
that fine-tuning will look for, with the backbone a run builds, and write what it holds to
``<out>/<dataset>.json``, the stage's DVC output.

Why the output is that identity and not the feature files: the features are the frozen encoders'
float32 outputs stored in fp16, and their last bits depend on the CPU's math kernels (MKL and
oneDNN take other code paths on other CPUs). A hash of them would differ between two machines that
reuse the same committed study, and ``dvc.lock`` with it. The identity (the encoder hash, each
split's data hash and size) is the same wherever the same inputs are; the cache files carry their
own content hash, which every read checks, and a run computes a missing or stale cache itself."""
from __future__ import annotations

import shutil
from pathlib import Path

from harness.features import FEATURES_DIR, cache_problems, cached_splits, plan_data_hashes
from harness.records import write_json_atomic
from harness.run import prepare
from harness.settings import plan_run, seeds_for
from methods import apply_method


def identity_path(out_dir: str | Path, dataset: str) -> Path:
    """Where the extract stage writes what ``dataset``'s cache holds: ``<out_dir>/<dataset>.json``."""
    return Path(out_dir) / f"{dataset}.json"


def extract_dataset(params: dict, dataset: str, out_dir: str | Path = FEATURES_DIR,
                    batch_size: int = 64, progress: bool = True) -> dict:
    """Stage ``extract@<dataset>``: the feature cache fine-tuning will look for. The backbone is
    built by ``harness.run.prepare``, as fine-tuning builds it (its frozen encoders do not depend
    on the run's seed). Writes the cache's identity (``identity_path``) and returns a JSON-able
    summary: the identity, with each split's status, and the caches removed."""
    plan = plan_run(params, dataset, "linear", seed=seeds_for(params, dataset)[0])
    prepared = prepare(plan)
    backbone = prepared.backbone
    apply_method(backbone, "linear")  # freezes the encoders: the head alone trains
    problems = cache_problems(backbone)
    if problems:
        identity = {"dataset": dataset, "skipped": problems}
        write_json_atomic(identity_path(out_dir, dataset), identity)
        return identity
    backbone.to(plan.train.device)
    data_hashes = plan_data_hashes(plan, prepared.data, prepared.vocab)
    _, _, info = cached_splits(backbone, prepared.splits, Path(out_dir) / dataset, data_hashes,
                               batch_size, progress)
    # The cache of the current encoders stays: caches of other encoders (older code or settings) go
    current = Path(info["folder"])
    removed = sorted(p.name for p in current.parent.iterdir() if p.is_dir() and p != current)
    for name in removed:
        shutil.rmtree(current.parent / name)
    identity = {"dataset": dataset, "encoder_hash": info["encoder_hash"], "folder": current.name,
                "splits": {name: {"file": Path(split["path"]).name, "n": split["n"],
                                  "data_hash": data_hashes[name]}
                           for name, split in info["splits"].items()}}
    write_json_atomic(identity_path(out_dir, dataset), identity)
    splits = {name: {**split, "status": info["splits"][name]["status"]}
              for name, split in identity["splits"].items()}
    return {**identity, "folder": str(current), "splits": splits, "removed": removed}
