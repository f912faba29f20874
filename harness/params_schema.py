"""The typed schema of params.yaml: every key, its type and its range, checked for the WHOLE file
(every row of every dataset's grid, the search space, the run defaults) before a command does any
work, so a bad value in row 3 is refused before rows 1 and 2 run.

Add a new params key here: a field on the model of its section below (with its type and range),
or it is refused as an unknown key. A train setting is a field of ``harness.train.TrainSettings``
(its range in ``TRAIN_RULES``); a method setting is a field of the method's config dataclass.

Every refusal is an ``InputError`` naming its origin (the params file, or ``command line --set``
for an override), the key path (``grid.mosi[3].down_dim``), what was expected and what was found.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import string
import types
import typing
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, create_model

from harness.backbones import named_encoders
from harness.backbones.late_fusion import LateFusionConfig
from harness.backbones.mmt import MMTConfig
from harness.backbones.two_tower import PRESETS, TwoTowerConfig
from harness.data.cards import list_cards, load_card
from harness.data.load import check_options, loader_options
from harness.errors import InputError, key_path, refusal
from harness.params_file import parse_yaml
from harness.text import DEFAULT_MAX_TEXT_LEN
from harness.train import MAX_THREADS, TrainSettings
from methods import ConfigError, get_method, method_names

COMMAND_LINE = "command line --set"  # the origin of a --set value
SEED_MAX = 2**32 - 1  # numpy's seed range

Seed = Annotated[StrictInt, Field(ge=0, le=SEED_MAX)]
PositiveInt = Annotated[StrictInt, Field(gt=0)]
Number = Annotated[float, Field(allow_inf_nan=False)]  # strict: an int or a float, finite
PositiveNumber = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeNumber = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Profile = Literal["tiny", "paper"]

# The range of each train setting (a TrainSettings field without a rule here is checked by type).
TRAIN_RULES = {
    "optimizer": Literal["adam", "adamw"], "lr": PositiveNumber, "weight_decay": NonNegativeNumber,
    "step_size": PositiveInt, "gamma": Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)],
    "batch_size": PositiveInt, "epochs": PositiveInt, "grad_clip": NonNegativeNumber,
    "device": Literal["cpu", "cuda"], "amp": StrictBool, "feature_cache": StrictBool,
    "loader_workers": Annotated[StrictInt, Field(ge=0)], "pin_memory": StrictBool,
}


# --- YAML ------------------------------------------------------------------------------------

def parse_set_value(raw: str):
    """A ``--set`` value: YAML (``1e-4`` a number, ``[q, v]`` a list); the plain string when it
    is not YAML."""
    try:
        return parse_yaml(raw)
    except yaml.YAMLError:
        return raw


# --- the models ------------------------------------------------------------------------------

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _field_type(default) -> Any:
    """The strict type of a dataclass field from its default (YAML gives lists for tuples)."""
    if isinstance(default, bool):
        return StrictBool
    if isinstance(default, int):
        return StrictInt
    if isinstance(default, float):
        return Number
    if isinstance(default, str):
        return StrictStr
    if isinstance(default, tuple):
        return list[StrictStr]
    return Any


def _annotation_type(annotation, default) -> Any:
    """The strict type of a dataclass field: from its annotation where it is a plain type or
    ``X | None``, else from its default."""
    hints = {int: StrictInt, float: Number, str: StrictStr, bool: StrictBool}
    if isinstance(annotation, str):  # ``from __future__ import annotations``
        annotation = {"int": int, "float": float, "str": str, "bool": bool, "int | None": int | None,
                      "float | None": float | None, "str | None": str | None}.get(annotation)
    if annotation in hints:
        return hints[annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1 and members[0] in hints:
            return Optional[hints[members[0]]]
    return _field_type(default)


def _defaults(cls) -> dict:
    """The default of each field of the dataclass ``cls`` that has one."""
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


@functools.lru_cache(maxsize=None)
def _dataclass_model(cls, rules: tuple = ()) -> type[BaseModel]:
    """A model of the fields of the dataclass ``cls``, each typed after it (or ``rules``) and
    optional (left out: the dataclass default; ``null`` only where the field's type allows it)."""
    defaults, rules = _defaults(cls), dict(rules)
    fields = {f.name: (rules.get(f.name) or _annotation_type(f.type, defaults.get(f.name)), None)
              for f in dataclasses.fields(cls)}
    return create_model(f"{cls.__name__}Fields", __base__=_Section, **fields)


TrainBlock = _dataclass_model(TrainSettings, tuple(TRAIN_RULES.items()))


class Executor(_Section):
    kind: Literal["sequential", "process", "ray"] = "sequential"
    workers: Optional[PositiveInt] = None
    # the ray executor's (harness.ray_executor.RayOptions: its defaults and the GPU-fraction rule)
    cpus_per_trial: Optional[PositiveNumber] = None
    gpus_per_trial: Optional[PositiveNumber] = None
    runs_per_trial: Optional[PositiveInt] = None
    max_failures: Optional[Annotated[StrictInt, Field(ge=0)]] = None


class Search(_Section):
    dataset: StrictStr
    metric: StrictStr
    trials: PositiveInt
    batch: PositiveInt
    sampler: Literal["tpe", "random"]
    seed: Seed
    train_seed: Seed
    space: dict[StrictStr, dict[StrictStr, Annotated[list[Any], Field(min_length=1)]]]


class Pretrain(_Section):
    seed: Seed = 0
    use: dict[StrictStr, StrictStr] = {}
    checkpoints: dict[StrictStr, StrictStr] = {}
    share_vocab: dict[StrictStr, list[StrictStr]] = {}
    skip: dict[Profile, dict[StrictStr, list[StrictStr]]] = {}
    train: dict[StrictStr, TrainBlock] = {}
    profiles: dict[Profile, TrainBlock] = {}


class ProfileBlock(_Section):
    train: TrainBlock = TrainBlock()
    late_fusion: dict[StrictStr, Any] = {}
    two_tower: dict[StrictStr, Any] = {}
    mmt: dict[StrictStr, Any] = {}
    method_defaults: dict[StrictStr, dict[StrictStr, Any]] = {}


class DataBlock(BaseModel):
    """Where a dataset is read from; other keys are loader options (checked by the loader)."""
    model_config = ConfigDict(extra="allow", strict=True)
    path: StrictStr
    format: Optional[StrictStr] = None
    max_text_len: Optional[PositiveInt] = None
    in_memory: Optional[StrictBool] = None


Row = dict[StrictStr, Any]


class Params(_Section):
    profile: Profile
    datasets: Annotated[list[StrictStr], Field(min_length=1)]
    seeds: Annotated[list[Seed], Field(min_length=1)]
    # dataset -> its seeds, replacing ``seeds`` for it (``settings.seeds_for``)
    seeds_by_dataset: dict[StrictStr, Annotated[list[Seed], Field(min_length=1)]] = {}
    method: StrictStr = "all"
    methods: list[StrictStr] = []
    grid: Annotated[dict[StrictStr, Annotated[list[Row], Field(min_length=1)]], Field(min_length=1)]
    executor: Executor = Executor()
    data_seed: Seed = 0
    # harness.train.thread_count: at most MAX_THREADS
    threads: Union[Literal["auto"], Annotated[StrictInt, Field(gt=0, le=MAX_THREADS)]] = "auto"
    generate: dict[StrictStr, Optional[dict[StrictStr, Any]]] = {}
    search: Optional[Search] = None
    pretrain: Optional[Pretrain] = None
    train: dict[StrictStr, TrainBlock] = {}
    profiles: dict[Profile, ProfileBlock]
    data: dict[Profile, dict[StrictStr, DataBlock]]
    run_defaults: dict[StrictStr, dict[StrictStr, Row]] = {}


# --- errors ----------------------------------------------------------------------------------

def _validate(model: type[BaseModel], values, file: str, prefix: tuple = ()):
    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise refusal(error, file, prefix, model) from None


def _check_value(model: type[BaseModel], field: str, value, source: str, key: str) -> None:
    """One field's value against ``model``; a refusal names ``source`` and ``key``."""
    try:
        model.model_validate({field: value})
    except ValidationError as error:
        problem = refusal(error, source, model=model)
        raise InputError(str(problem).split(" [")[0], file=source, key=key,
                         expected=problem.expected, found=problem.found) from None


# --- method settings -------------------------------------------------------------------------

class _WidthProbe:
    """What a method's ``validate_for`` may ask before any data is read: the modalities and
    their widths. Anything else (sequence lengths, linears) raises AttributeError: those checks
    wait for the built backbone."""

    def __init__(self, widths: dict[str, int]):
        self.modalities = tuple(widths)
        self._widths = widths

    def hidden_size(self, modality: str) -> int:
        return self._widths[modality]


class Cards(dict):
    """Dataset cards, each read once per check (a card is a YAML file: reading it again for
    every grid row costs seconds)."""

    def __missing__(self, name: str):
        self[name] = card = load_card(name)
        return card


def known_widths(params: dict, card) -> dict[str, int] | None:
    """{modality: width} of the backbone a run on the dataset of ``card`` builds, where params.yaml fixes it
    (None where a pretrained tower named there decides, or the block is malformed: checked when
    the backbone is built)."""
    block = ((params.get("profiles") or {}).get(params.get("profile")) or {}).get(card.backbone) or {}
    if not isinstance(block, dict) or named_encoders(card.backbone, block):
        return None
    if card.backbone == "late_fusion":
        width = block.get("width", _defaults(LateFusionConfig)["width"])
        widths = {m: width for m in card.modalities}
    elif card.backbone == "two_tower":
        merged = {**PRESETS.get(block.get("preset", "tiny"), {}), **block}
        widths = {"image": merged.get("image_hidden"), "text": merged.get("text_hidden")}
    elif card.backbone == "mmt":
        factory = MMTConfig.paper if block.get("preset") == "paper" else MMTConfig.tiny
        width = block.get("width", factory().width)
        widths = {m: width for m in card.modalities}
    else:
        return None
    if not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths.values()):
        return None
    return widths


def _fits(config, widths: dict[str, int] | None) -> None:
    """``config.validate_for`` on the backbone's widths, where they are known before running."""
    if widths is None:
        return
    try:
        config.validate_for(_WidthProbe(widths))
    except AttributeError:  # a check that needs the built backbone: done when it runs
        pass


def check_row(row: dict, file: str, where: str, widths: dict[str, int] | None = None,
              command_line: tuple[str, ...] = (), defaults: dict | None = None,
              defaults_where: str = "method_defaults") -> dict:
    """A grid row (``method``, ``variant``, config fields): the method and variant exist, each
    field has the config's type, and the config passes the method's own checks and fits
    ``widths`` (the backbone's, where known before running). ``where``: the row's key path;
    ``command_line``: the fields whose value came from ``--set``; ``defaults``: the profile's
    method defaults under the row, at ``defaults_where``. Returns the row's settings, those
    from --set as the config's types (1 -> 1.0 for a float)."""
    method, variant = row.get("method"), row.get("variant", "paper")
    if not isinstance(method, str) or method not in method_names():
        raise InputError("unknown method in a grid row", file=file, key=f"{where}.method",
                         expected=f"one of {method_names()}", found=repr(method))
    spec = get_method(method)
    if not isinstance(variant, str) or variant not in spec.variants:
        raise InputError(f"unknown variant of {method}", file=file, key=f"{where}.variant",
                         expected=f"one of {sorted(spec.variants)}", found=repr(variant))
    settings = {**(defaults or {}), **{k: v for k, v in row.items() if k not in ("method", "variant")}}

    def origin(field: str | None) -> tuple[str, str]:
        if field is None:  # the row as a whole
            return (", ".join(sorted({origin(f)[0] for f in settings} or {file})), where)
        if field in command_line:
            return COMMAND_LINE, field
        return file, f"{where}.{field}" if field in row else f"{defaults_where}.{field}"

    model = _dataclass_model(spec.config_class)
    for field, value in settings.items():
        source, key = origin(field)
        if field not in model.model_fields:
            raise InputError(f"unknown {method} setting", file=source, key=key,
                             expected=f"one of {sorted(model.model_fields)}", found=repr(field))
        _check_value(model, field, value, source, key)
    _blame(lambda values: _fits(spec.make_config(variant, **values), widths), settings, origin,
           ConfigError)
    typed = model.model_validate({f: settings[f] for f in command_line if f in settings})
    return {**settings, **typed.model_dump(exclude_unset=True)}


def _blame(check, settings: dict, origin, errors) -> None:
    """``check(settings)``; where it raises one of ``errors``, an InputError at ``origin`` of the
    one field whose value fails ``check`` alone, else of the whole (``origin(None)``): a valid
    whole never fails, and a single bad value is named by its own key."""
    try:
        check(settings)
        return
    except errors as error:
        problem = error
    for field, value in settings.items():
        try:
            check({field: value})
        except errors as alone:
            source, key = origin(field)
            raise InputError(str(alone).strip('"'), file=source, key=key) from None
    source, key = origin(None)
    raise InputError(str(problem).strip('"'), file=source, key=key) from None


def resolved_row(row: dict, defaults: dict | None = None) -> tuple:
    """What a row runs: method, variant and the full config (defaults filled in), for spotting
    two rows that are the same run."""
    spec = get_method(row["method"])
    settings = {**(defaults or {}), **{k: v for k, v in row.items() if k not in ("method", "variant")}}
    config = spec.make_config(row.get("variant", "paper"), **settings)
    return row["method"], row.get("variant", "paper"), repr(sorted(config.to_dict().items()))


# --- the whole file --------------------------------------------------------------------------

def validate_params(params: dict) -> None:
    """Check the whole of ``params`` (as ``settings.load_params`` read it, ``_file`` its path)
    before anything runs; the first problem raises an InputError naming it."""
    file = params.get("_file", "params.yaml")
    checked = _validate(Params, {k: v for k, v in params.items() if k != "_file"}, file)
    cards = Cards()
    _check_names(checked, file, cards)
    _check_datasets(checked, file, cards)
    _check_backbones(checked, file)
    _check_grid(params, checked, file, cards)
    _check_data(checked, file, cards)
    if checked.search is not None:
        check_search(params, file, cards)
    for method, per_dataset in checked.run_defaults.items():
        for dataset, settings in per_dataset.items():
            _check_with_defaults(params, checked, {"method": method, **settings}, cards[dataset],
                                 file, f"run_defaults.{method}.{dataset}")


def _check_names(checked: Params, file: str, cards: Cards) -> None:
    """Every dataset named in the file has a card (``datasets/<name>.yaml``)."""
    named = [(f"datasets[{i}]", name) for i, name in enumerate(checked.datasets)]
    named += [(f"{where}.{name}", name) for where, block in (
        ("grid", checked.grid), ("train", checked.train), ("generate", checked.generate),
        *((f"data.{p}", blocks) for p, blocks in checked.data.items())) for name in block]
    named += [(f"run_defaults.{m}.{name}", name) for m, block in checked.run_defaults.items()
              for name in block]
    named += [(f"seeds_by_dataset.{name}", name) for name in checked.seeds_by_dataset]
    if checked.search is not None:
        named.append(("search.dataset", checked.search.dataset))
    if checked.pretrain is not None:
        named += [(f"pretrain.use.{name}", name) for name in checked.pretrain.use]
        named += [(f"pretrain.use.{name}", source) for name, source in checked.pretrain.use.items()]
    for key, name in named:
        try:
            cards[name]
        except InputError:
            raise InputError("unknown dataset (no card in datasets/)", file=file, key=key,
                             expected=f"one of {list_cards()}", found=repr(name)) from None


# What each backbone block (profiles.<p>.<kind>) may set: its config's fields but those the data
# fix, and the preset it starts from; the config's own checks give the ranges.
BACKBONE_BLOCKS = {
    "late_fusion": (LateFusionConfig, ("input_dims", "seq_lens", "output_dim"), None),
    "two_tower": (TwoTowerConfig, ("num_classes",), tuple(PRESETS)),
    "mmt": (MMTConfig, ("experts", "expert_dims"), ("tiny", "paper")),
}


def _backbone_config(kind: str, block: dict):
    """The backbone config ``block`` makes, on placeholder data (its checks raise ValueError)."""
    settings = dict(block)
    if kind == "late_fusion":
        return LateFusionConfig(**settings)
    preset = settings.pop("preset", "tiny")
    if kind == "two_tower":
        return TwoTowerConfig.preset(preset, **settings)
    return (MMTConfig.paper if preset == "paper" else MMTConfig.tiny)(**settings)


def _layer_weights(layers: int, width: int, ffn: int) -> int:
    """The weight matrices of ``layers`` transformer layers: q, k, v, o and fc1, fc2."""
    return layers * (4 * width * width + 2 * width * ffn)


def _parameter_floor(kind: str, config) -> tuple[int, str]:
    """A lower bound on the parameters of the backbone ``config`` makes (its transformer
    layers' weight matrices; no bias, norm or projection from the data's inputs), and what it
    counted."""
    c = config
    if kind == "late_fusion":
        return (2 * _layer_weights(c.depth, c.width, 4 * c.width),
                f"at least 2 modalities x {c.depth} layers of width {c.width}")
    if kind == "two_tower":
        return (_layer_weights(c.image_layers, c.image_hidden, c.image_intermediate or 4 * c.image_hidden)
                + _layer_weights(c.text_layers, c.text_hidden, c.text_intermediate or 4 * c.text_hidden)
                + _layer_weights(c.fusion_layers, c.fusion_dim, 4 * c.fusion_dim),
                f"{c.image_layers} image layers of width {c.image_hidden}, {c.text_layers} text "
                f"layers of width {c.text_hidden}, {c.fusion_layers} fusion layers of width {c.fusion_dim}")
    return (_layer_weights(c.depth, c.width, c.ffn_multiplier * c.width),
            f"{c.depth} video layers of width {c.width}, the text tower not counted")


def _fits_memory(kind: str, config) -> None:
    """Raise ValueError where the backbone's parameters alone (float32) exceed this machine's
    memory: a settings mistake (a width of 10^6) that the allocator would otherwise report."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): not checked
        return
    count, counted = _parameter_floor(kind, config)
    if 4 * count > memory:
        raise ValueError(f"the backbone's parameters alone exceed this machine's memory: expected "
                         f"at most {memory / 2**30:,.1f} GiB (its memory), found an estimated "
                         f"{count:,} parameters ({counted}) = {4 * count / 2**30:,.0f} GiB as float32")


@functools.lru_cache(maxsize=None)
def _backbone_model(kind: str) -> type[BaseModel]:
    config, fixed, presets = BACKBONE_BLOCKS[kind]
    fields = {name: spec for name, spec in _dataclass_model(config).model_fields.items()
              if name not in fixed}
    fields = {name: (spec.annotation, None) for name, spec in fields.items()}
    if presets:
        fields["preset"] = (Optional[Literal[presets]], None)
    return create_model(f"{kind}_block", __base__=_Section, **fields)


def _check_backbones(checked: Params, file: str) -> None:
    """Each backbone block: known keys of the right types, passing the backbone config's own
    checks (unless a pretrained tower named there brings sizes of its own)."""
    for profile, blocks in checked.profiles.items():
        for kind in BACKBONE_BLOCKS:
            block, where = getattr(blocks, kind), f"profiles.{profile}.{kind}"
            _validate(_backbone_model(kind), block, file, prefix=tuple(where.split(".")))
            if named_encoders(kind, block):
                continue
            preset = {"preset": block["preset"]} if "preset" in block else {}
            _blame(lambda values: _fits_memory(kind, _backbone_config(kind, {**preset, **values})),
                   {k: v for k, v in block.items() if k != "preset"},
                   lambda name: (file, where if name is None else f"{where}.{name}"),
                   (ValueError, KeyError))


def _check_datasets(checked: Params, file: str, cards: Cards) -> None:
    if checked.method != "all" and checked.method not in method_names():
        raise InputError("unknown method", file=file, key="method",
                         expected=f"'all' or one of {method_names()}", found=repr(checked.method))
    _no_duplicates(checked.seeds, file, "seeds")
    for dataset, seeds in checked.seeds_by_dataset.items():
        _no_duplicates(seeds, file, f"seeds_by_dataset.{dataset}")
    _no_duplicates(checked.datasets, file, "datasets")
    profile = checked.profile
    for index, dataset in enumerate(checked.datasets):
        cards[dataset]  # an unknown dataset has no card
        for section, where in ((checked.grid, "grid"), (checked.train, "train"),
                               (checked.data.get(profile, {}), f"data.{profile}")):
            if dataset not in section:
                raise InputError(f"datasets[{index}] = {dataset} has no entry under {where}",
                                 file=file, key=f"{where}.{dataset}", expected="an entry",
                                 found="nothing")
    if profile not in checked.profiles:
        raise InputError("the profile has no block", file=file, key=f"profiles.{profile}",
                         expected="a mapping", found="nothing")
    if checked.pretrain is not None:
        for dataset, source in checked.pretrain.use.items():
            if source not in checked.pretrain.checkpoints:
                raise InputError("a pre-training source without a checkpoint path", file=file,
                                 key=f"pretrain.use.{dataset}",
                                 expected=f"one of pretrain.checkpoints {sorted(checked.pretrain.checkpoints)}",
                                 found=repr(source))
        for source, path in checked.pretrain.checkpoints.items():
            _check_checkpoint_path(path, file, f"pretrain.checkpoints.{source}")
    for method in checked.profiles[profile].method_defaults:
        if method not in method_names():
            raise InputError("unknown method", file=file,
                             key=f"profiles.{profile}.method_defaults.{method}",
                             expected=f"one of {method_names()}", found=repr(method))


def _check_checkpoint_path(path: str, file: str, key: str) -> None:
    """A checkpoint path's only placeholder is ``{profile}`` (``settings.checkpoint_path``
    formats it with the profile's name alone)."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(path) if name is not None}
        path.format(profile="tiny")
    except (ValueError, KeyError, IndexError, AttributeError):
        fields = None
    if fields is None or fields - {"profile"}:
        raise InputError("a checkpoint path with a placeholder other than {profile}", file=file,
                         key=key, expected="a path whose only placeholder is {profile} (the "
                         "profile's name; {{ and }} for literal braces)", found=repr(path))


def _no_duplicates(values: list, file: str, key: str) -> None:
    seen: dict = {}
    for index, value in enumerate(values):
        if value in seen:
            raise InputError("duplicate entry", file=file, key=f"{key}[{index}]",
                             expected=f"each value once ({key}[{seen[value]}] is the same)",
                             found=repr(value))
        seen[value] = index


def _check_with_defaults(params: dict, checked: Params, row: dict, card, file: str,
                         where: str) -> None:
    defaults = checked.profiles[checked.profile].method_defaults.get(row.get("method")) or {}
    check_row(row, file, where, known_widths(params, card), defaults=defaults,
              defaults_where=f"profiles.{checked.profile}.method_defaults.{row.get('method')}")


def _check_grid(params: dict, checked: Params, file: str, cards: Cards) -> None:
    """Every row of every dataset's grid, and no two rows that are the same run."""
    all_defaults = checked.profiles[checked.profile].method_defaults
    for dataset, rows in checked.grid.items():
        seen: dict[tuple, int] = {}
        for index, row in enumerate(rows):
            where = f"grid.{dataset}[{index}]"
            _check_with_defaults(params, checked, row, cards[dataset], file, where)
            same = resolved_row(row, all_defaults.get(row["method"]))
            if same in seen:
                raise InputError("duplicate grid rows (the same run twice)", file=file, key=where,
                                 expected=f"rows that differ; grid.{dataset}[{seen[same]}] is the "
                                          "same method, variant and settings", found=repr(row))
            seen[same] = index


def _check_data(checked: Params, file: str, cards: Cards) -> None:
    for profile, blocks in checked.data.items():
        for dataset, block in blocks.items():
            check_data_block(cards[dataset], block.format, block.model_extra or {}, file,
                             ("data", profile, dataset))
            if profile in checked.profiles:
                _check_data_fits_backbone(checked, profile, dataset, block, cards[dataset], file)


def _check_data_fits_backbone(checked: Params, profile: str, dataset: str, block: DataBlock, card,
                              file: str) -> None:
    """The data block's image size and text length against the backbone block of the same
    profile that the dataset's runs build: two_tower takes images of its ``image_size`` and at
    most ``max_text_len`` tokens, mmt's text BERT at most ``max_position_embeddings`` (sizes a
    pretrained tower named there brings are checked when it is loaded)."""
    where, backbone = f"data.{profile}.{dataset}", f"profiles.{profile}.{card.backbone}"
    settings = getattr(checked.profiles[profile], card.backbone, {})
    named = named_encoders(card.backbone, settings)
    preset = settings.get("preset", "tiny")
    text_len = block.max_text_len or DEFAULT_MAX_TEXT_LEN
    text_key = f"{where}.max_text_len" + ("" if block.max_text_len else " (its default)")

    def origin(name: str, value, given: bool) -> str:
        return f"{backbone}.{name} = {value}" + ("" if given else f" (preset {preset})")

    if card.backbone == "two_tower":
        merged = {**PRESETS[preset], **settings}
        size, image_size = merged["image_size"], (block.model_extra or {}).get("image_size")
        if "image" not in named and image_size is not None and image_size != size:
            raise InputError("images of another size than the backbone's", file=file,
                             key=f"{where}.image_size", found=image_size,
                             expected=origin("image_size", size, "image_size" in settings))
        limit, given = merged["max_text_len"], "max_text_len" in settings
        if text_len > limit:
            raise InputError("a text length beyond the backbone's", file=file, key=text_key,
                             expected=f"at most {origin('max_text_len', limit, given)}", found=text_len)
    elif card.backbone == "mmt" and "text" not in named and card.text_field is not None:
        factory = MMTConfig.paper if preset == "paper" else MMTConfig.tiny
        given = settings.get("text") or {}
        limit = {**factory().text, **given}.get("max_position_embeddings")
        if limit is None:  # BertConfig's default
            from transformers import BertConfig
            limit = BertConfig().max_position_embeddings
        if isinstance(limit, int) and text_len > limit:
            given = "max_position_embeddings" in given
            raise InputError("a text length beyond the text tower's positions", file=file,
                             key=text_key, found=text_len,
                             expected=f"at most {origin('text.max_position_embeddings', limit, given)}")


def check_data_block(card, format: str | None, options: dict, file: str, where: tuple) -> None:
    """A data block (``where``: ``("data", profile, dataset)``): its ``format`` one of the card's,
    its other keys options of the dataset's loader, of their types and ranges (a split scheme or
    an expert the card names, the mmin-only options only where that format is read)."""
    if format is not None and format not in card.formats:
        raise InputError(f"unknown format for {card.name}", file=file, key=key_path(where + ("format",)),
                         expected=f"one of {list(card.formats)}", found=repr(format))
    try:
        check_options(card, options, format)
    except ValidationError as error:
        problem = refusal(error, file, where, loader_options(card))
        if error.errors()[0]["type"] == "extra_forbidden":
            known = sorted(DataBlock.model_fields) + sorted(loader_options(card).model_fields)
            problem = InputError(f"unknown key for {card.name}'s loader", file=file,
                                 key=problem.key, expected=f"one of {known}", found=problem.found)
        raise problem from None
    if isinstance(options.get("experts"), list):  # MMTConfig takes each expert once
        _no_duplicates(options["experts"], file, key_path(where + ("experts",)))


def check_search(params: dict, file: str | None = None, cards: Cards | None = None) -> None:
    """The ``search`` section: its types and ranges, a metric the dataset's task reports, and a
    space of known config fields whose every choice is a valid setting."""
    file = file or params.get("_file", "params.yaml")
    if "search" not in params:
        raise InputError("missing key", file=file, key="search", expected="a mapping", found="nothing")
    search = _validate(Search, params["search"], file, prefix=("search",))
    card = (cards if cards is not None else Cards())[search.dataset]
    metrics = task_metric_names(card)
    if search.metric not in metrics:
        raise InputError(f"unknown metric for {search.dataset}", file=file, key="search.metric",
                         expected=f"one of {sorted(metrics)}", found=repr(search.metric))
    widths = known_widths(params, card)
    for method, space in search.space.items():
        if method not in method_names():
            raise InputError("unknown method in the search space", file=file,
                             key=f"search.space.{method}", expected=f"one of {method_names()}",
                             found=repr(method))
        if not space:  # every trial would be the same run: a front of one point, 8 times
            raise InputError("a search space with no field", file=file, key=f"search.space.{method}",
                             expected="at least one config field and its choices, e.g. {rank: [4, 8]}",
                             found="{}")
        for field, choices in space.items():
            repeated = sorted({repr(c) for c in choices if choices.count(c) > 1})
            if repeated:
                raise InputError("a choice given twice", file=file, key=f"search.space.{method}.{field}",
                                 expected="each choice once", found=f"{', '.join(repeated)} twice")
            for index, choice in enumerate(choices):
                check_row({"method": method, field: choice}, file, f"search.space.{method}", widths)


def task_metric_names(card) -> set[str]:
    """The metric keys a run on the dataset of ``card`` records: those of the tasks its card's task can be
    (a classification card is 4 x binary, 4-class or n-class, decided by its labels), computed
    on a small fixed sample by the tasks' own metric functions."""
    import torch

    from harness.tasks.tasks import TASKS

    card_tasks = {"regression": ("regression",), "retrieval": ("retrieval",),
                  "classification": ("emotion_binary", "emotion4", "classification")}
    samples = {  # (output, label) shapes each task's evaluate takes
        "regression": (torch.tensor([[-1.5], [0.5], [2.0], [-0.2]]), torch.tensor([-1.0, 1.0, 2.5, 0.3])),
        "emotion_binary": (torch.linspace(-1, 1, 32).view(4, 8), torch.tensor([[0, 1, 0, 1]] * 2 + [[1, 0, 1, 0]] * 2)),
        "emotion4": (torch.linspace(-1, 1, 16).view(4, 4), torch.tensor([0, 1, 2, 3])),
        "classification": (torch.linspace(-1, 1, 16).view(4, 4), torch.tensor([0, 1, 2, 3])),
        "retrieval": (torch.eye(4) + 0.1 * torch.arange(16.0).view(4, 4), torch.arange(4)),
    }
    names: set[str] = set()
    for task in card_tasks.get(card.task, ()):
        names |= set(TASKS[task].evaluate(*samples[task]))
    return names


def check_train(values: dict, file: str, where: str, command_line: tuple[str, ...] = ()) -> dict:
    """Train settings (``where``: their key path; ``command_line``: those given by ``--set``);
    returns them, those from --set as TrainSettings' types (1 -> 1.0 for a float)."""
    for key, value in values.items():
        source, path = (COMMAND_LINE, key) if key in command_line else (file, f"{where}.{key}")
        if key not in TrainBlock.model_fields:
            raise InputError("unknown train setting", file=source, key=path,
                             expected=f"one of {sorted(TrainBlock.model_fields)}", found=repr(key))
        _check_value(TrainBlock, key, value, source, path)
    typed = TrainBlock.model_validate({k: values[k] for k in command_line if k in values})
    return {**values, **typed.model_dump(exclude_unset=True)}
