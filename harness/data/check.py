"""check_data: validate a dataset on disk and report what was found (writes nothing)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ._common import verify_checksums
from .cards import load_card
from .load import _module, load_dataset, resolve_path


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return x


def check_data(dataset: str, path=None, format: str | None = None, **options) -> dict:
    """Validate `dataset` at `path` (default: the card's path) and return a JSON-able report:
    dataset, path, format, files, splits (sizes, lengths), modalities (dims, lengths),
    labels (range / classes), nonfinite counts, audio_neg_inf_fixed, and per family:
    images read (food101), experts present / absent / NaN-filled and
    missing_experts_per_video (msrvtt, howto100m), checksums verified.
    Raises harness.errors.InputError (file, key, expected, found) when the data is unusable.
    Reads only; never writes."""
    card = load_card(dataset)
    ld = load_dataset(dataset, path, format, **options)
    report = dict(ld.report)
    deep = _module(card).deep_check(ld)
    for k, v in deep.items():
        if k == "nonfinite" and isinstance(report.get("nonfinite"), dict):
            report["nonfinite"] = {**report["nonfinite"], **v}
        else:
            report[k] = v
    base = resolve_path(card, path)
    if card.checksums:
        report["checksums"] = verify_checksums(card.checksums, base, card.file)
    else:
        report["checksums"] = "none listed in the card"
    report["info"] = ld.info
    report["warnings"] = [*report.get("warnings", []), *_constant_labels(ld), *_shared_ids(ld),
                          *_beyond_fp16(ld)]
    report["ok"] = True
    return _jsonable(report)


def _constant_labels(ld) -> list[str]:
    """Splits whose labels are all one value, or of one sample (usable, but a correlation, a
    binary accuracy or an F1 on them is undefined: a run records NaN), as warnings. Splits that
    hold no labels (a retrieval task's) are not looked at."""
    found = []
    for name, split in ld.splits.items():
        labels = getattr(split, "labels", None)
        if labels is None:
            continue
        labels = np.asarray(labels)
        if len(labels) and (labels == labels[0]).all():
            what = "one sample only" if len(labels) == 1 else f"every label is {labels[0].tolist()}"
            found.append(f"{name}: {what}: the metrics that compare labels (correlation, binary "
                         "accuracy, F1) are undefined on it (NaN)")
    return found


SPLIT_PAIRS = {("train", "valid"): "valid metrics would measure samples the model trained on",
               ("train", "test"): "test metrics would measure samples the model trained on",
               ("valid", "test"): "test metrics would measure samples the model was selected on"}


def _shared_ids(ld) -> list[str]:
    """Sample ids repeated within a split, and ids found in two splits (leakage), as warnings;
    splits that name no ids are not looked at."""
    ids = {name: [str(i) for i in split.ids] for name, split in ld.splits.items()
           if getattr(split, "ids", None) is not None}
    found = []
    for name, names in ids.items():
        repeated = sorted(i for i, count in Counter(names).items() if count > 1)
        if repeated:
            found.append(f"{name}: {len(names) - len(set(names))} repeated sample id(s), e.g. "
                         f"{repeated[:3]}")
    for (one, other), effect in SPLIT_PAIRS.items():
        shared = sorted(set(ids.get(one, ())) & set(ids.get(other, ())))
        if shared:
            found.append(f"{one} and {other} share {len(shared)} sample id(s), e.g. {shared[:3]}: "
                         f"{effect}")
    return found


FP16_MAX = float(np.finfo(np.float16).max)  # the feature cache stores encoder outputs in float16


def _beyond_fp16(ld) -> list[str]:
    """Input features beyond float16's range, as warnings: encoder outputs of such inputs usually
    overflow the feature cache's float16 and a cached run then stops."""
    found = []
    for name, split in ld.splits.items():
        for key, values in (getattr(split, "arrays", None) or {}).items():
            values = np.asarray(values)
            if key == "label" or not np.issubdtype(values.dtype, np.floating):
                continue
            magnitude = np.abs(values)
            magnitude[~np.isfinite(magnitude)] = 0  # non-finite values: the report's "nonfinite"
            peak = magnitude.max(initial=0.0)
            if peak > FP16_MAX:
                row = int(np.nonzero(magnitude > FP16_MAX)[0][0])
                sample = split.ids[row] if getattr(split, "ids", None) is not None else f"item {row}"
                found.append(f"{name}: {key} reaches |x| = {peak:.3g} (first at sample "
                             f"{sample}), beyond float16's {FP16_MAX:g}: a run's feature cache "
                             "would overflow")
    return found
