"""params.yaml: loading, validation, and resolving one run's settings (+ ``--set`` overrides)."""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from harness.backbones import plan_encoders
from harness.checkpoints import checkpoint_sha256, pretrain_source
from harness.data.cards import load_card
from harness.errors import InputError
from harness.params_file import PARAMS_FILE, read_params, section
from harness.params_schema import (COMMAND_LINE, check_row, check_train, known_widths, parse_set_value,
                                   validate_params)
from harness.train import LOADER_FIELDS, SettingError, TrainSettings
from methods import ConfigError, get_method, load_methods


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    """Read ``path`` (YAML with YAML 1.2 floats: ``1e-3`` is a number), import the method modules
    it lists, and check the whole of it (``harness.params_schema``) before anything runs."""
    params = read_params(path)
    load_params_methods(params)
    validate_params(params)
    return params


def load_params_methods(params: dict) -> None:
    """Import the user's method modules listed under ``methods`` (importable names), so their
    methods are registered before any run is planned; a bad entry exits 2 naming it."""
    modules = params.get("methods") or []
    folder = str(Path(params["_file"]).resolve().parent)  # a module beside params.yaml imports
    if modules and folder not in sys.path:
        sys.path.insert(0, folder)
    if not isinstance(modules, list):
        raise InputError("methods must be a list of importable module names", file=params["_file"],
                         key="methods", expected="e.g. [my_methods.bitfit]", found=repr(modules))
    for index, module in enumerate(modules):
        try:
            load_methods([module])
        except ConfigError as error:
            raise InputError(str(error), file=params["_file"], key=f"methods[{index}]",
                             expected="an importable module that registers methods",
                             found=repr(module)) from error


def seeds_for(params: Mapping, dataset: str) -> list[int]:
    """The seeds of ``dataset``'s runs: ``seeds_by_dataset.<dataset>`` where params.yaml gives
    one (the planted tasks need more seeds than the study's datasets: docs/planted.md), else
    ``seeds``. Every reader of a dataset's seeds (sweep, tables, leaderboard, extract) asks here."""
    by_dataset = params.get("seeds_by_dataset") or {}
    key = f"seeds_by_dataset.{dataset}" if dataset in by_dataset else "seeds"
    seeds = by_dataset[dataset] if dataset in by_dataset else params.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise InputError("seeds must be a non-empty list of integers",
                         file=params.get("_file", PARAMS_FILE), key=key, expected="e.g. [0, 1, 2]",
                         found=repr(seeds))
    return list(seeds)


def parse_overrides(overrides: dict[str, str] | None, train_fields, method_fields,
                    method: str = "") -> tuple[dict, dict]:
    """``--set`` strings as YAML values, split into (train settings, method config fields); the
    values are checked where they are used (``params_schema.check_train`` / ``check_row``)."""
    train, settings = {}, {}
    for key, raw in (overrides or {}).items():
        if key in train_fields:
            train[key] = parse_set_value(raw)
        elif key in method_fields:
            settings[key] = parse_set_value(raw)
        else:
            where = f" or a {method} config field {sorted(method_fields)}" if method else ""
            raise InputError("unknown --set key", file=COMMAND_LINE, key=key,
                             expected=f"a train setting {sorted(train_fields)}{where}", found=key)
    return train, settings


def _field_defaults(cls) -> dict:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls)}


@dataclass
class RunPlan:
    """Everything one fine-tuning run needs, resolved from params.yaml and overrides."""
    profile: str
    dataset: str
    method: str
    variant: str
    seed: int
    train: TrainSettings
    row: dict
    method_overrides: dict
    backbone_kind: str
    backbone: dict
    data: dict
    pretrained: dict | None = None  # {source, path, sha256, skip}: the checkpoint the backbone starts from
    # {modality: {model, architecture, weights_sha256[, tokenizer_sha256]}}: the pretrained towers
    # the backbone block names (image_model / text_model), None when it names none
    encoders: dict | None = None

    def identity(self) -> dict:
        """What identifies the run (hashed into its key, with the code hash)."""
        return {"profile": self.profile, "dataset": self.dataset, "method": self.method,
                "variant": self.variant, "seed": self.seed, "row": self.row,
                "train": {name: value for name, value in dataclasses.asdict(self.train).items()
                          if name not in LOADER_FIELDS},  # pinned memory changes no number
                "method_overrides": self.method_overrides,
                "backbone_kind": self.backbone_kind, "backbone": self.backbone, "data": self.data,
                "pretrained": self.pretrained,
                **({"encoders": self.encoders} if self.encoders else {})}


def grid_row(method: str, variant: str = "paper", settings: dict | None = None) -> dict:
    """A grid row as params.yaml writes it: method, variant (omitted when paper), config fields."""
    row = {"method": method, **({"variant": variant} if variant != "paper" else {})}
    return {**row, **(settings or {})}


def plan_run(params: dict, dataset: str, method: str, variant: str = "paper", seed: int = 0,
             overrides: dict[str, str] | None = None, settings: dict | None = None) -> RunPlan:
    """``settings``: typed method config fields (a grid row); ``overrides``: ``--set`` strings for
    train settings or method config fields."""
    profile = params["profile"]
    card = load_card(dataset)  # an unknown dataset has no card
    spec = get_method(method)
    spec.variant(variant)
    file = params["_file"]
    dataset_train, profile_train = section(params, "train", dataset), section(params, "profiles", profile, "train")
    check_train(dataset_train, file, f"train.{dataset}")
    check_train(profile_train, file, f"profiles.{profile}.train")
    set_train, set_settings = parse_overrides(overrides, _field_defaults(TrainSettings),
                                              _field_defaults(spec.config_class), method)
    set_train = check_train(set_train, file, "train", command_line=tuple(set_train))
    train_values = {**dataset_train, **profile_train, **set_train}
    profile_defaults = section(params, "profiles", profile, "method_defaults").get(method) or {}
    row_settings = {**(settings or {}), **set_settings}
    typed = check_row(grid_row(method, variant, row_settings), file, method,
                      known_widths(params, card), command_line=tuple(set_settings),
                      defaults=profile_defaults,
                      defaults_where=f"profiles.{profile}.method_defaults.{method}")
    row_settings.update({key: typed[key] for key in set_settings})
    row = grid_row(method, variant, row_settings)
    method_overrides: dict = {**profile_defaults, **row_settings}
    train = TrainSettings(**train_values)
    try:
        train.validate()
    except SettingError as error:  # named where the value came from: --set, the profile, the dataset
        source, key = next(((source, key.format(error.field)) for values, source, key in (
            (set_train, COMMAND_LINE, "{}"), (profile_train, file, f"profiles.{profile}.train.{{}}"),
            (dataset_train, file, f"train.{dataset}.{{}}")) if error.field in values),
            (file, f"train.{dataset}.{error.field} (its default)"))
        raise InputError("invalid train setting", file=source, key=key, expected=error.expected,
                         found=repr(error.found)) from None
    data = dict(section(params, "data", profile, dataset))
    if "path" not in data:
        raise InputError("missing key", file=file, key=f"data.{profile}.{dataset}.path",
                         expected="a path", found="nothing")
    kind = card.backbone
    backbone = dict(section(params, "profiles", profile, kind))
    return RunPlan(profile, dataset, method, variant, seed, train, row, method_overrides, kind,
                   backbone, data, pretrained_plan(params, dataset, kind),
                   encoders_plan(params, kind, backbone))


def encoders_plan(params: dict, kind: str, backbone: dict) -> dict | None:
    """The pretrained towers ``profiles.<profile>.<kind>`` names, loaded (once per process) and
    checked, as {modality: {model, architecture, weights_sha256[, tokenizer_sha256]}}: in the run
    key, so two different checkpoints never share a record."""
    return plan_encoders(kind, backbone, f"profiles.{params['profile']}.{kind}", params["_file"])


def pretrained_plan(params: dict, dataset: str, kind: str) -> dict | None:
    """The checkpoint a run on ``dataset`` starts from (``pretrain.use``), with its sha256 (so a
    new checkpoint changes the run key) and the key prefixes not loaded from it."""
    pretrained = pretrained_for(params, dataset)
    if pretrained is None:
        return None
    skip = section(params, "pretrain", "skip", params["profile"]).get(kind, [])
    return {**pretrained, "sha256": checkpoint_sha256(pretrained["path"]), "skip": list(skip)}


def checkpoint_path(params: dict, source: str) -> str:
    """``pretrain.checkpoints.<source>`` with ``{profile}`` filled in."""
    paths = section(params, "pretrain", "checkpoints")
    if source not in paths:
        raise InputError("no checkpoint path for this pre-training source", file=params.get("_file"),
                         key=f"pretrain.checkpoints.{source}", expected="a path", found="nothing")
    return str(paths[source]).format(profile=params["profile"])


def pretrained_for(params: dict, dataset: str) -> dict | None:
    """{source, path} of the checkpoint a fine-tuning run on ``dataset`` starts from, or None
    (``pretrain.use`` maps fine-tuning datasets to sources)."""
    if "pretrain" not in params:
        return None
    use = section(params, "pretrain").get("use") or {}
    source = use.get(dataset)
    if source is None:
        return None
    pretrain_source(source, key=f"pretrain.use.{dataset}", file=params.get("_file"))
    return {"source": source, "path": checkpoint_path(params, source)}


def plan_to_dict(plan: RunPlan) -> dict:
    """A plan as plain values (what executors send to their workers)."""
    return dataclasses.asdict(plan)


def plan_from_dict(values: dict) -> RunPlan:
    return RunPlan(**{**values, "train": TrainSettings(**values["train"])})
