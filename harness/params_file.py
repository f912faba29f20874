"""Reading params.yaml without importing torch: the YAML 1.2 reader every command uses, the file
as a mapping (``read_params``; ``harness.settings.load_params`` then checks all of it) and one of
its sections by dotted key. The data@ stages read their few keys through here alone."""
from __future__ import annotations

import re
import typing
from pathlib import Path

import yaml

from harness.errors import InputError

PARAMS_FILE = "params.yaml"


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's floats and booleans: ``1e-3`` is a number (YAML 1.1, PyYAML's default,
    needs a dot and a signed exponent, ``1.0e-3``, and reads ``1e-3`` as a string), only true /
    false are booleans and only plain decimal, 0o and 0x numbers integers (YAML 1.1's yes / no /
    on / off and 1_000 are strings, which a boolean or integer setting then refuses); a key given
    twice in one mapping is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)
        first_line: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in first_line:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found the key {key!r} twice (first on line {first_line[key] + 1})",
                    key_node.start_mark)
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_YAML_1_1 = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int")
_Loader.yaml_implicit_resolvers = {  # a copy without YAML 1.1's booleans and integers
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in _YAML_1_1]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.2's integers: decimal (010 is ten), 0o octal, 0x hex; no 1_000, 0b1 or 1:30 (YAML 1.1)
_Loader.add_implicit_resolver("tag:yaml.org,2002:int",
                              re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                              list("-+0123456789"))


def _yaml_1_2_int(loader, node) -> int:
    text = loader.construct_scalar(node)
    base = {"0o": 8, "0x": 16}.get(text[:2])
    return int(text[2:], base) if base else int(text)  # PyYAML's own reads 010 as octal 8


_Loader.add_constructor("tag:yaml.org,2002:int", _yaml_1_2_int)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str):
    """A YAML document (a file's text, or a ``--set`` value) with YAML 1.2 floats."""
    return yaml.load(text, Loader=_Loader)


def read_params(path: str | Path = PARAMS_FILE) -> dict:
    """``path`` as a mapping, its name under ``_file``; not checked beyond being YAML and a mapping."""
    path = Path(path)
    if not path.is_file():
        raise InputError("parameters file not found (run from the project root or pass --params)",
                         file=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[:error.start].count(b"\n") + 1
        raise InputError("not UTF-8 text", file=str(path), key=f"line {line}",
                         expected="a UTF-8 YAML file", found=f"byte {error.object[error.start]:#04x}") from None
    try:
        params = parse_yaml(text)
    except yaml.YAMLError as error:
        raise InputError(f"malformed YAML: {error}", file=str(path)) from error
    if not isinstance(params, dict):
        raise InputError("parameters must be a mapping", file=str(path), expected="a mapping",
                         found=type(params).__name__)
    params["_file"] = str(path)
    return params


def section(params: dict, *keys: str) -> dict:
    """params[k1][k2]... as a dict, or an InputError naming the dotted key."""
    node = params
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            dotted = ".".join(keys[: depth + 1])
            known = sorted(k for k in node if not k.startswith("_")) if isinstance(node, dict) else []
            raise InputError("missing key", file=params["_file"], key=dotted,
                             expected=f"one of {known}" if known else "a mapping", found="nothing")
        node = node[key]
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise InputError("expected a mapping", file=params["_file"], key=".".join(keys),
                         expected="a mapping", found=repr(node))
    return node
