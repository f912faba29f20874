"""Dispatch from a dataset name to its family's loader."""
from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from harness.errors import InputError, refusal

from ._common import LoadedDataset, LoaderOptions
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


# The keys of a params.yaml data block (data.<profile>.<dataset>) that are not loader options
BLOCK_KEYS = ("path", "format", "max_text_len", "in_memory")


def block_options(block: dict) -> dict:
    """The loader options of a params.yaml data block."""
    return {key: value for key, value in block.items() if key not in BLOCK_KEYS}


def load_block(name: str, block: dict) -> LoadedDataset:
    """Dataset ``name`` as its params.yaml data block says: path, format and loader options."""
    return load_dataset(name, block.get("path"), block.get("format"), **block_options(block))


def loader_options(card: Card) -> type[LoaderOptions]:
    """The options the loader of ``card``'s family takes (its ``Options``)."""
    return _module(card).Options


def check_options(card: Card, options: dict, format: str | None = None) -> None:
    """Raise pydantic's ValidationError unless ``options`` are options of ``card``'s loader, each
    of its type and range, and read by the ``format`` forced (if any) (``params_schema`` names the
    params.yaml key of the first problem)."""
    loader_options(card).model_validate(options, context={"card": card, "format": format})


def load_dataset(name: str, path=None, format: str | None = None, **options) -> LoadedDataset:
    """Load dataset `name` from `path` (default: the card's `path:`), detecting the format
    unless `format=` forces one. Options are family-specific (each family's ``Options``)."""
    card = load_card(name)
    try:
        check_options(card, options, format)
    except ValidationError as error:  # named as the card's: its family's loader takes the options
        raise refusal(error, card.file, model=loader_options(card)) from None
    return _module(card).load(card, resolve_path(card, path), format, **options)


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
