"""The method registry: ``@register`` adds a method; ``apply_method`` attaches one to a backbone;
``method_sources`` names the code a method's runs depend on (its part of a run key)."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Callable

from torch import nn

from methods.base import (ConfigError, MethodConfig, MethodSpec, UnknownName, Variant, freeze,
                          trainable_head)

_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, *, config: type, variants: dict[str, Variant], summary: str,
             modalities: str = "any") -> Callable:
    """Decorator for ``apply(backbone, config) -> None`` (the variant is in the config: its
    ``Variant.defaults``).

    ``apply`` receives a fully frozen backbone, adds its modules (their parameters trainable) and
    may unfreeze backbone parameters it trains; the head is made trainable afterwards.
    """

    def decorate(apply_fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = MethodSpec(name, config, variants, apply_fn, summary, modalities)
        return apply_fn

    return decorate


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise UnknownName(f"unknown method {name!r}; known methods: {method_names()}")
    return _REGISTRY[name]


def apply_method(backbone: nn.Module, name: str, variant: str = "paper",
                 **overrides) -> MethodConfig:
    """Freeze ``backbone``, attach method ``name`` (``variant``, config ``overrides``) and return the
    resolved config. Raises UnknownName (a ConfigError and a KeyError) for unknown names,
    ConfigError for invalid configs."""
    spec = get_method(name)
    config = spec.make_config(variant, **overrides)
    config.validate_for(backbone)
    freeze(backbone)
    spec.apply_fn(backbone, config)
    trainable_head(backbone)
    return config


# Every method's shared contract: part of every method's code identity (editing them recomputes
# every run). The package's ``__init__`` only re-exports and discovers modules: not part of it.
CONTRACT = ("methods.base", "methods.registry")
_IMPORTS: dict[tuple, list[str]] = {}


def _module_file(module: str) -> Path | None:
    """The ``.py`` source of ``module`` (imported or importable), or None (not Python source)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError, AttributeError):
        return None
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and origin.endswith(".py") else None


def _imports(module: str, path: Path) -> list[tuple[str, str]]:
    """(module, name) of every import in ``module``'s source ``path``, inside functions too:
    ``import a.b`` gives ("a.b", ""), ``from a import b`` gives ("a", "b") (``b`` may be a module
    or a name). Memoised on the file's size and modification time."""
    stat = path.stat()
    signature = (str(path), stat.st_size, stat.st_mtime_ns)
    if signature not in _IMPORTS:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_bytes())):
            if isinstance(node, ast.Import):
                found.update((alias.name, "") for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: max(0, len(package.split(".")) - node.level + 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found.update((base, alias.name) for alias in node.names)
        _IMPORTS[signature] = sorted(found)
    return _IMPORTS[signature]


def module_sources(roots) -> dict[str, Path]:
    """{module: source file} of ``roots``, the ``CONTRACT`` and every module they import, directly
    or not, within the ``methods`` package or a root's own top-level package (a user's method
    package); the ``methods`` package's ``__init__`` excluded (re-exports and discovery only)."""
    roots = sorted(roots)
    allowed = {"methods"} | {root.split(".")[0] for root in roots}
    found: dict[str, Path] = {}
    todo = list(CONTRACT) + roots
    while todo:
        module = todo.pop()
        if module in found or module == "methods":
            continue
        path = _module_file(module)
        if path is None:
            continue
        found[module] = path
        for base, name in _imports(module, path):
            if base.split(".")[0] in allowed:
                child = f"{base}.{name}" if base and name else base or name
                todo.append(child if name and _module_file(child) is not None else base or name)
    return dict(sorted(found.items()))


def method_sources(name: str) -> dict[str, Path]:
    """{module: source file} of the code a run of method ``name`` executes from its own side: the
    modules of its ``apply`` and its config class, what they import (``module_sources``) and the
    shared contract. A run key hashes these and the harness code, not the other methods."""
    spec = get_method(name)
    return module_sources({spec.apply_fn.__module__, spec.config_class.__module__})


__all__ = ["register", "method_names", "method_sources", "module_sources", "get_method", "apply_method", "ConfigError", "UnknownName"]
