"""Dispatch from a dataset name to its family's loader."""
from __future__ import annotations

import inspect

from pathlib import Path

from harness.errors import InputError

from ._common import LoadedDataset
from .cards import Card, load_card, project_root


def _module(card: Card):
    from . import food101, msrvtt, sentiment
    fam = {"sentiment": sentiment, "food101": food101, "video": msrvtt}.get(card.family)
    if fam is None:
        raise InputError("card names an unknown family", file=card.file, key="family",
                         expected=["sentiment", "food101", "video"], found=card.family)
    return fam


def resolve_path(card: Card, path=None, generated: bool = False) -> Path:
    """`path` if given; else the card's `generated_path:` (generated=True) or `path:`,
    relative to the project root."""
    if path is not None:
        return Path(path)
    if generated:
        gp = card.get("generated_path") or str(Path(card.path).parent / "generated")
        p = Path(gp)
        return p if p.is_absolute() else project_root() / p
    return card.resolve_path(None)


def load_dataset(name: str, path=None, format: str | None = None, **options) -> LoadedDataset:
    """Load dataset `name` from `path` (default: the card's `path:`), detecting the format
    unless `format=` forces one. Options are family-specific (see harness.data docs)."""
    card = load_card(name)
    mod = _module(card)
    p = resolve_path(card, path)
    params = inspect.signature(mod.load).parameters
    allowed = [k for k, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InputError(f"unknown loader option for {name}", file=card.file, key="options",
                         expected=allowed, found=unknown)
    return mod.load(card, p, format, **options)


def detect_format(name: str, path=None) -> str:
    """The format that load_dataset would read at `path` (no data is read)."""
    card = load_card(name)
    mod = _module(card)
    fmt, target = mod.locate(card, resolve_path(card, path), None)
    if fmt is None:  # a single pickle given directly: content decides
        from ._common import load_pickle
        from .sentiment import _infer_format
        data = load_pickle(target)
        if not isinstance(data, dict):
            raise InputError("pickle is not a dict of splits", file=str(target), key="(root)",
                             expected="dict", found=type(data).__name__)
        fmt = _infer_format(card, Path(target), data)
    return fmt
