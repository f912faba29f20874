"""Run records -> cells: load ``results/runs/<dataset>/*.json``, check them, and select the
records a table reads.

Selection rules (``collect``):
- a record belongs to the cell (dataset, grid row) when its ``row`` equals the grid row exactly
  (``row_key``: canonical JSON of the dict) and its ``dataset`` matches;
- with ``params``: only records of ``params.profile`` and of their dataset's seeds count
  (``settings.seeds_for``: ``seeds_by_dataset.<dataset>``, else ``seeds``);
  a record whose resolved settings differ from what params.yaml would give now (data,
  backbone, the train keys params.yaml sets except ``device``, the pre-training source of
  ``pretrain.use``, method settings) is *stale*:
  it is not used, and a row that has only stale records says so;
- several current records for the same (dataset, row, seed) (e.g. the code changed and the run
  was recomputed under a new key): the one whose ``code_hash`` equals the current code's is
  used, otherwise the one with the smallest key; the table header lists each such case.
  (Records carry no timestamp, so "the newest" cannot be told apart from file contents.)
- the records a cell pools (one per seed) must share their inputs, the data's tree hash, the
  pre-training checkpoint's sha256, the code (``code_hash``) and the compute packages
  (``packages``) (``require_same_inputs``): a cell mixing records computed from other data,
  another checkpoint or other code is an error naming both files, not a statistic. (A sweep
  computes every seed of a row under one code and sets the records of other code aside, and a
  Ray node of other code refuses: no legitimate cell mixes them.)
- a whole row made by other code or compute packages than the current ones (record
  ``code_hash`` / ``packages`` vs what this checkout gives) is used as it is, next to current
  rows; the table header names such rows (``Selection.other_code``).
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from harness.data.cards import load_card
from harness.errors import InputError
from harness.params_schema import task_metric_names
from harness.records import compute_versions, read_run_record
from harness.settings import seeds_for
from methods.base import ConfigError

def row_key(row: Mapping) -> str:
    """Canonical text of a grid row (sorted keys), the identity of a table row's runs."""
    return json.dumps(dict(row), sort_keys=True, separators=(", ", ": "))


def main_metric(dataset: str) -> str:
    """The ``main_metric`` of ``dataset``'s card, one of the metrics its task records
    (``params_schema.task_metric_names``): a typo would rank and compare nothing, silently."""
    card = load_card(dataset)
    metrics = task_metric_names(card)
    if card.main_metric not in metrics:
        raise InputError("the dataset card's main metric is not a metric its task records",
                         file=card.file, key="main_metric", expected=f"one of {sorted(metrics)}",
                         found=repr(card.main_metric) if card.main_metric else "missing")
    return card.main_metric


def load_records(records_dir) -> list[dict]:
    """Every ``<records_dir>/<dataset>/*.json`` record, checked (``records.read_run_record``);
    a missing folder is an error (a mistyped ``--runs`` must not render empty tables), an empty
    one gives []. Names starting with a dot (temporaries, ``.stale``) are not records."""
    root = Path(records_dir)
    if not root.exists():
        raise InputError("records folder not found", file=str(root), key="--runs",
                         expected="a folder of <dataset>/*.json run records", found="missing")
    if not root.is_dir():
        raise InputError("records folder is not a folder", file=str(root), key="--runs",
                         expected="a folder of <dataset>/*.json run records", found="a file")
    found = []
    for path in sorted(root.glob("*/*.json")):
        if path.name.startswith(".") or path.parent.name.startswith("."):
            continue
        record = read_run_record(path)
        if record["dataset"] != path.parent.name:
            raise InputError("run record is in the wrong dataset folder", file=str(path),
                             key="dataset", expected=path.parent.name, found=record["dataset"])
        if record["row"].get("method") != record["method"]:
            raise InputError("run record row does not name its method", file=str(path),
                             key="row.method", expected=record["method"],
                             found=record["row"].get("method"))
        record["_path"] = str(path)
        found.append(record)
    return found


def _get(mapping, *keys):
    node = mapping
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def stale_reasons(record: Mapping, params: Mapping) -> list[str]:
    """How a record's resolved settings differ from what params.yaml gives now ([] = current).
    Only fields present on both sides are compared."""
    profile, dataset = params.get("profile"), record["dataset"]
    reasons = []

    def check(name, expected, found):
        if expected != found:
            reasons.append(f"{name}: record {found!r} != params.yaml {expected!r}")

    data = _get(params, "data", profile, dataset)
    if isinstance(data, Mapping) and isinstance(record.get("data"), Mapping):
        check("data", dict(data), record["data"])
    kind = record.get("backbone_kind")
    backbone = _get(params, "profiles", profile, kind) if kind else None
    if isinstance(backbone, Mapping) and isinstance(record.get("backbone"), Mapping):
        check(f"profiles.{profile}.{kind}", dict(backbone), record["backbone"])
    if isinstance(record.get("train"), Mapping):
        train = {**(_get(params, "train", dataset) or {}),
                 **(_get(params, "profiles", profile, "train") or {})}
        for key, value in sorted(train.items()):
            if key != "device":
                check(f"train.{key}", value, record["train"].get(key))
    use = _get(params, "pretrain", "use")
    if isinstance(use, Mapping) and "pretrained" in record:
        pretrained = record["pretrained"]
        found = pretrained.get("source") if isinstance(pretrained, Mapping) else None
        check("pretrain.use", use.get(dataset), found)
    if isinstance(record.get("method_overrides"), Mapping):
        defaults = _get(params, "profiles", profile, "method_defaults", record["method"]) or {}
        settings = {k: v for k, v in record["row"].items() if k not in ("method", "variant")}
        check("method settings", {**defaults, **settings}, record["method_overrides"])
    return reasons


@dataclass
class Selection:
    """The records a rendering reads, by (dataset, row key) then seed."""
    records_dir: str
    profile: str | None
    # dataset -> the seeds params.yaml runs it with, for every dataset params.yaml names or a
    # record holds (None: without params, every seed counts)
    seeds: dict[str, list[int]] | None
    current: dict = field(default_factory=dict)        # (dataset, key) -> {seed: record}
    stale: dict = field(default_factory=dict)          # (dataset, key) -> [(record, reasons)]
    ignored: Counter = field(default_factory=Counter)  # why records were left out -> count
    duplicates: list = field(default_factory=list)     # notes on resolved duplicates
    other_code: set = field(default_factory=set)       # (dataset, key) made by non-current code

    def cells(self) -> dict:
        return self.current

    def get(self, dataset: str, row: Mapping) -> dict:
        return self.current.get((dataset, row_key(row)), {})

    def stale_for(self, dataset: str, row: Mapping) -> list:
        return self.stale.get((dataset, row_key(row)), [])

    def seeds_of(self, dataset: str) -> list[int] | None:
        """The seeds whose records count for ``dataset`` (None: every seed)."""
        return None if self.seeds is None else self.seeds.get(dataset)


def seeds_text(per_dataset: Mapping) -> str:
    """``0, 1, 2`` when every dataset has the same seeds, else one entry per dataset
    (``mosi 0, 1, 2; planted_cross 0, 1, ...``)."""
    texts = {dataset: ", ".join(map(str, seeds)) for dataset, seeds in per_dataset.items()}
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return "; ".join(f"{dataset} {text}" for dataset, text in texts.items())


def _current_code_hash(method: str) -> str | None:
    """The code identity a run of ``method`` has now (``run.run_code_hash``); None for a method
    that is no longer registered (none of its records is current)."""
    from harness.run import run_code_hash

    try:
        return run_code_hash(method)
    except ConfigError:
        return None


def collect(records_dir, params: Mapping | None = None) -> Selection:
    records = load_records(records_dir)
    profile = params.get("profile") if params else None
    seeds = None
    if params and params.get("seeds"):
        named = {*(params.get("datasets") or []), *(params.get("grid") or {}),
                 *(params.get("seeds_by_dataset") or {}), *(r["dataset"] for r in records)}
        seeds = {dataset: sorted(seeds_for(params, dataset)) for dataset in sorted(named)}
    if profile is None:
        profiles = sorted({str(r.get("profile")) for r in records})
        if len(profiles) > 1:
            raise InputError("run records of several profiles; pass params.yaml to choose one",
                             file=str(records_dir), key="profile", expected="one profile",
                             found=profiles)
    selection = Selection(str(records_dir), profile, seeds)
    candidates = defaultdict(list)
    for record in records:
        if profile is not None and record.get("profile") != profile:
            selection.ignored[f"profile {record.get('profile')!r} (params.yaml: {profile!r})"] += 1
            continue
        if seeds is not None and record["seed"] not in seeds[record["dataset"]]:
            selection.ignored[f"seed {record['seed']} not among params.yaml seeds of "
                              f"{record['dataset']}"] += 1
            continue
        cell = (record["dataset"], row_key(record["row"]))
        reasons = stale_reasons(record, params) if params else []
        if reasons:
            selection.stale.setdefault(cell, []).append((record, reasons))
            selection.ignored["stale vs params.yaml"] += 1
            continue
        candidates[(cell, record["seed"])].append(record)
    current_codes = {method: _current_code_hash(method)  # once a method, not once a (cell, seed)
                     for method in {group[0]["method"] for group in candidates.values()}}
    for (cell, seed), group in sorted(candidates.items()):
        current_code = current_codes[group[0]["method"]]
        chosen = sorted(group, key=lambda r: (r.get("code_hash") != current_code,
                                              str(r.get("key", r["_path"]))))[0]
        if len(group) > 1:
            selection.ignored["duplicate (dataset, row, seed)"] += len(group) - 1
            selection.duplicates.append(
                f"{cell[0]} {cell[1]} seed {seed}: {len(group)} records, using "
                f"{Path(chosen['_path']).name}"
                + (" (current code hash)" if chosen.get("code_hash") == current_code
                   else " (smallest key; none has the current code hash)"))
        selection.current.setdefault(cell, {})[seed] = chosen
    packages = compute_versions()
    for cell, by_seed in selection.current.items():
        require_same_inputs(cell, list(by_seed.values()))
        record = next(iter(by_seed.values()))
        current = {"code_hash": current_codes[record["method"]], "packages": packages}
        if any(record.get(key, value) != value for key, value in current.items()):
            selection.other_code.add(cell)  # a record without the field: not known to differ
    return selection


def inputs_of(record: Mapping) -> dict:
    """What a record was computed from beyond its settings: the data's tree hash, the
    pre-training checkpoint's sha256, the pretrained towers' identities, the code and the compute
    packages' versions."""
    return {"data_hash": record.get("data_hash"),
            "checkpoint sha256": _get(record, "pretrained", "sha256"),
            "encoders": record.get("encoders"),
            "code_hash": record.get("code_hash"),
            "packages": record.get("packages")}


def _shown(value, other) -> str:
    """``value`` in an error message: a mapping's entries that differ from ``other``'s, else its
    first 16 characters."""
    if isinstance(value, Mapping) and isinstance(other, Mapping):
        return ", ".join(f"{k} {value.get(k)}" for k in sorted({*value, *other})
                         if value.get(k) != other.get(k))
    return str(value)[:16]


def require_same_inputs(cell: tuple, records: list) -> None:
    """A cell's statistics pool its seeds' records, so they must share their inputs
    (``inputs_of``): records of other data, another checkpoint or other code in one cell are an
    error naming both files, never averaged together and never silently dropped."""
    first = records[0]
    for other in records[1:]:
        for name, value in inputs_of(first).items():
            found = inputs_of(other)[name]
            if found != value:
                raise InputError(
                    f"run records of one cell ({cell[0]}, {cell[1]}) were computed from different "
                    f"inputs; keep one version's records (move the others out of the records "
                    f"folder) or rerun the sweep on one", file=other["_path"], key=name,
                    expected=f"{_shown(value, found)} (as {Path(first['_path']).name})",
                    found=_shown(found, value))
