"""One error type for every kind of bad input, so the CLI can exit 2 with a precise message; and
``refusal``, pydantic's first problem with a checked section (params.yaml, loader options) as one."""
from __future__ import annotations

import types
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError


class InputError(Exception):
    """Bad input: names where (file), what (key), what was expected and what was found."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 expected: object = None, found: object = None):
        self.message, self.file, self.key, self.expected, self.found = message, file, key, expected, found
        parts = []
        if file is not None:
            parts.append(f"file {file}")
        if key is not None:
            parts.append(f"key {key!r}")
        where = f" [{', '.join(parts)}]" if parts else ""
        detail = ""
        if expected is not None or found is not None:
            detail = f": expected {expected}, found {found}"
        super().__init__(f"{message}{where}{detail}")


def key_path(parts) -> str:
    """``("grid", "mosi", 3, "down_dim")`` -> ``grid.mosi[3].down_dim``."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


TYPE_NAMES = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
              "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
              "model_type": "a mapping"}


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The keys of the section at ``loc[:-1]`` under ``model`` (None where it is a free mapping)."""
    node: Any = model
    for part in loc[:-1]:
        node = _child(_unwrap(node), part)
        if node is None:
            return None
    node = _unwrap(node)
    return sorted(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else None


def _child(annotation, part):
    """The annotation of ``part`` under ``annotation``: a model's field, a mapping's value or a
    list's item; None where there is none."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and part in annotation.model_fields:
        return annotation.model_fields[part].annotation
    if typing.get_origin(annotation) in (dict, list):
        return typing.get_args(annotation)[-1]
    return None


def _unwrap(annotation):
    """``X`` of ``Annotated[X, ...]`` and ``X | None``."""
    while True:
        if typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def refusal(error: ValidationError, file: str, prefix: tuple = (), model=None) -> InputError:
    """The first problem pydantic found, as an InputError (the count of the others in the
    message)."""
    problems = error.errors()
    first = problems[0]
    # a union's members each add a problem, at the value's location plus the member's tag
    # (``threads.literal['auto']``, ``threads.constrained-int``): one value, several ways to be right
    tag = _union_tag_index(model, first["loc"])
    if tag is not None:
        members = [p for p in problems if p["loc"][:tag] == first["loc"][:tag] and len(p["loc"]) > tag]
        whole = [p["input"] for p in members if len(p["loc"]) == tag + 1] or [first["input"]]
        more = f" (and {len(problems) - len(members)} more problems)" if len(problems) > len(members) else ""
        return InputError(f"bad value{more}", file=file, key=key_path(prefix + tuple(first["loc"][:tag])),
                          expected=" or ".join(dict.fromkeys(map(_expected, members))), found=repr(whole[0]))
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    if first["loc"][-1:] == ("[key]",):  # a mapping's key, not its value
        return InputError(f"bad key{more}", file=file, key=key_path(prefix + tuple(first["loc"][:-1])),
                          expected=_expected(first), found=repr(first["input"]))
    key = key_path(prefix + tuple(first["loc"]))
    if first["type"] == "extra_forbidden":
        known = _known_keys(model, first["loc"])
        return InputError(f"unknown key{more}", file=file, key=key,
                          expected=f"one of {known}" if known else "a key this section has",
                          found=repr(first["loc"][-1]))
    if first["type"] == "missing":
        return InputError(f"missing key{more}", file=file, key=key, expected="a value",
                          found="nothing")
    return InputError(f"bad value{more}", file=file, key=key, expected=_expected(first),
                      found=repr(first["input"]))


def _expected(problem: dict) -> str:
    """What pydantic's ``problem`` says the value should have been."""
    if problem["type"] == "too_short":
        return "a non-empty list" if isinstance(problem["input"], list) else "a non-empty mapping"
    return TYPE_NAMES.get(problem["type"]) or problem["msg"].removeprefix(
        "Input should be ").removeprefix("Value error, ")


def _union_tag_index(model, loc: tuple) -> int | None:
    """The index in ``loc`` of the first tag pydantic gives a member of a union (not a key: the
    annotation there under ``model`` is a union of two or more types), else None."""
    node: Any = model
    for index, part in enumerate(loc):
        node = _unwrap(node)
        if typing.get_origin(node) in (typing.Union, types.UnionType):
            return index
        node = _child(node, part)
        if node is None:
            return None
    return None
