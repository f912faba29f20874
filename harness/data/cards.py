"""Dataset cards: `datasets/<name>.yaml`, the one place for what a dataset is: source, licence,
family (which loaders and generator read it), backbone (what its runs build), task, modalities,
the field holding raw text, layouts per format, splits, dims, the generator's defaults, optional
checksums, default path. Adding a dataset of an existing family is its card and its params.yaml
entries (docs/architecture.md).

The cards directory is `$MMPETL_DATASETS_DIR` when set, else `<project root>/datasets`
(the project root is the directory above the `harness` package), else `./datasets`.
A card's relative `path:` is resolved against the directory that holds `datasets/`.
"""
from __future__ import annotations

import copy
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.errors import InputError

_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_SHA = re.compile(r"^[0-9a-fA-F]{64}$")
TASKS = ("regression", "classification", "retrieval")
REQUIRED = {"name": str, "title": str, "family": str, "backbone": str, "source": str,
            "licence": str, "task": str, "modalities": list, "splits": list, "path": str,
            "formats": dict}
GENERATOR_SIZES = ("n_train", "n_valid", "n_test", "seq_len")


def cards_dir() -> Path:
    env = os.environ.get("MMPETL_DATASETS_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2] / "datasets"
    if here.is_dir():
        return here
    return Path.cwd() / "datasets"


def project_root() -> Path:
    return cards_dir().resolve().parent


@dataclass(frozen=True)
class Card:
    name: str
    title: str
    family: str
    backbone: str
    task: str
    modalities: tuple
    splits: tuple
    formats: dict
    path: str
    file: str
    checksums: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    text_field: str | None = None   # the item field of raw text to tokenise, None: no raw text
    generator_defaults: dict = field(default_factory=dict)  # generate.defaults: sizes, seq_len
    main_metric: str | None = None  # the metric key the leaderboards rank by (results/metrics.json)

    @property
    def format_names(self) -> list[str]:
        return list(self.formats)

    def fmt(self, name: str) -> dict:
        if name not in self.formats:
            raise InputError(f"unknown format for dataset {self.name}", file=self.file,
                             key="format", expected=self.format_names, found=name)
        return self.formats[name]

    def resolve_path(self, path: str | os.PathLike | None = None) -> Path:
        p = Path(path if path is not None else self.path)
        if not p.is_absolute() and path is None:
            p = project_root() / p
        return p

    def get(self, key, default=None):
        return self.raw.get(key, default)


def list_cards() -> list[str]:
    """Names of all dataset cards (sorted)."""
    d = cards_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.yaml") if _NAME.match(p.stem))


def load_card(name: str) -> Card:
    """Load and validate `datasets/<name>.yaml`; any problem -> InputError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError("invalid dataset name", file=str(cards_dir()), key="dataset",
                         expected="a card name like 'mosi'", found=repr(name))
    f = cards_dir() / f"{name}.yaml"
    if not f.is_file():
        raise InputError("unknown dataset (no card)", file=str(f), key="dataset",
                         expected=list_cards(), found=name)
    try:
        raw = copy.deepcopy(_parsed(f.read_text(encoding="utf-8")))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError("card is not valid YAML", file=str(f), key="(whole file)",
                         expected="a YAML mapping", found=str(e).splitlines()[0]) from None
    return validate_card(raw, str(f), name)


@functools.lru_cache(maxsize=64)
def _parsed(text: str):
    """A card's YAML, parsed once per text (a run reads its card several times, and the
    pure-Python YAML parser takes about 0.1 s a card)."""
    return yaml.safe_load(text)


def validate_card(raw, file: str, name: str | None = None) -> Card:
    if not isinstance(raw, dict):
        raise InputError("card is not a mapping", file=file, key="(root)",
                         expected="a YAML mapping", found=type(raw).__name__)
    for key, typ in REQUIRED.items():
        if key not in raw:
            raise InputError("card lacks a required field", file=file, key=key,
                             expected=typ.__name__, found="missing")
        if not isinstance(raw[key], typ):
            raise InputError("card field has the wrong type", file=file, key=key,
                             expected=typ.__name__, found=type(raw[key]).__name__)
    if name is not None and raw["name"] != name:
        raise InputError("card name differs from its file name", file=file, key="name",
                         expected=name, found=raw["name"])
    if raw["task"] not in TASKS:
        raise InputError("unknown task", file=file, key="task", expected=list(TASKS),
                         found=raw["task"])
    for key in ("modalities", "splits"):
        if not raw[key] or not all(isinstance(m, str) for m in raw[key]):
            raise InputError("card list must hold names", file=file, key=key,
                             expected="a non-empty list of strings", found=raw[key])
    if not raw["formats"]:
        raise InputError("card lists no format", file=file, key="formats",
                         expected="at least one format", found="{}")
    for fname, spec in raw["formats"].items():
        if not isinstance(spec, dict):
            raise InputError("format spec must be a mapping", file=file,
                             key=f"formats.{fname}", expected="mapping",
                             found=type(spec).__name__)
    experts = raw.get("experts")
    if raw["task"] == "retrieval":
        if not isinstance(experts, dict) or not experts:
            raise InputError("retrieval card lacks experts", file=file, key="experts",
                             expected="mapping expert -> {dim, required}", found=experts)
        for e, spec in experts.items():
            if not isinstance(spec, dict) or not isinstance(spec.get("dim"), int):
                raise InputError("expert spec needs an integer dim", file=file,
                                 key=f"experts.{e}", expected="{dim: int, required: bool}",
                                 found=spec)
    checksums = raw.get("checksums") or {}
    if not isinstance(checksums, dict):
        raise InputError("checksums must be a mapping", file=file, key="checksums",
                         expected="{relative/file: sha256}", found=type(checksums).__name__)
    for rel, sha in checksums.items():
        if not isinstance(sha, str) or not _SHA.match(sha):
            raise InputError("checksum is not a sha256 hex digest", file=file,
                             key=f"checksums.{rel}", expected="64 hex digits", found=sha)
    text_field = raw.get("text_field")
    if text_field is not None and not isinstance(text_field, str):
        raise InputError("text_field must be an item field name", file=file, key="text_field",
                         expected="a string or nothing", found=repr(text_field))
    main_metric = raw.get("main_metric")
    if main_metric is not None and (not isinstance(main_metric, str) or not main_metric):
        raise InputError("main_metric must be a metric key of the records", file=file,
                         key="main_metric", expected="e.g. acc2_non0", found=repr(main_metric))
    defaults = (raw.get("generate") or {}).get("defaults") or {}
    if not isinstance(defaults, dict) or not all(
            k in GENERATOR_SIZES and isinstance(v, int) for k, v in defaults.items()):
        raise InputError("generate.defaults must map sizes to integers", file=file,
                         key="generate.defaults", expected=f"{{{', '.join(GENERATOR_SIZES)}: int}}",
                         found=repr(defaults))
    return Card(name=raw["name"], title=raw["title"], family=raw["family"],
                backbone=raw["backbone"], task=raw["task"], modalities=tuple(raw["modalities"]),
                splits=tuple(raw["splits"]), formats=dict(raw["formats"]), path=raw["path"],
                file=file, checksums=dict(checksums), raw=raw, text_field=text_field,
                generator_defaults=dict(defaults), main_metric=main_metric)
