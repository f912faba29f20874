"""The method registry: ``@register`` adds a method; ``apply_method`` attaches one to a backbone;
``method_sources`` names the code a method's runs depend on (its part of a run key)."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable

from torch import nn

from methods.base import (ConfigError, MethodConfig, MethodSpec, UnknownName, Variant, freeze,
                          trainable_head)

_REGISTRY: dict[str, MethodSpec] = {}
# Where each method from outside the package came from: {name: {"source": ..., "module": ...}}
_ORIGINS: dict[str, dict] = {}
# Method and variant names: they make up record file names and the leaderboards' row names as
# they are (``harness.records.row_slug``)
NAME = re.compile(r"[a-z][a-z0-9_]*")
ENTRY_POINTS = "mmpetl.methods"  # the entry-point group of methods in other distributions
# The modules loaded from params.yaml ``methods``, for worker processes that start afresh
ENV_MODULES = "MMPETL_METHODS"


def register(name: str, *, config: type, variants: dict[str, Variant], summary: str,
             modalities: str = "any") -> Callable:
    """Decorator for ``apply(backbone, config) -> None`` (the variant is in the config: its
    ``Variant.defaults``).

    ``apply`` receives a fully frozen backbone, adds its modules (their parameters trainable) and
    may unfreeze backbone parameters it trains; the head is made trainable afterwards.
    """
    for what, text in [("method", name)] + [("variant", v) for v in variants]:
        if not isinstance(text, str) or not NAME.fullmatch(text):
            raise ConfigError(f"{what} name {text!r}: use lowercase letters, digits and "
                              "underscores, a letter first (e.g. my_method2)")

    taken = {key: other for other, spec in _REGISTRY.items() if other != name
             for key in result_names(other, spec.variants)}
    clash = sorted(result_names(name, variants) & set(taken))
    if clash:  # e.g. a method "wander_code": the name of Wander's released-code results
        raise ConfigError(f"method {name!r}: its results would be named {clash[0]!r}, as those "
                          f"of method {taken[clash[0]]!r} already are; choose another name")

    def decorate(apply_fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = MethodSpec(name, config, variants, apply_fn, summary, modalities)
        return apply_fn

    return decorate


def result_names(name: str, variants) -> set[str]:
    """The names a method's results go under (``results/metrics.json``, row slugs): the method's,
    and ``<method>_<variant>`` for each variant but ``paper``."""
    return {name} | {f"{name}_{variant}" for variant in variants if variant != "paper"}


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


def _import_registering(module: str, source: str) -> None:
    """Import ``module``; each method it registers is recorded as coming from ``source``."""
    before = set(_REGISTRY)
    importlib.import_module(module)
    for name in sorted(set(_REGISTRY) - before):
        _ORIGINS[name] = {"source": source, "module": module}


def load_methods(modules, source: str = "params.yaml methods") -> None:
    """Import each module of ``modules`` (importable names: a user's module or package that
    registers methods with ``@register``); an import error is a ``ConfigError`` naming the module.
    The names are kept in the environment (``ENV_MODULES``) for worker processes."""
    for module in modules:
        if not isinstance(module, str) or not module:
            raise ConfigError(f"a method module must be an importable name, found {module!r}")
        try:
            _import_registering(module, source)
        except Exception as error:
            raise ConfigError(f"method module {module!r} could not be imported: "
                              f"{type(error).__name__}: {error}") from error
        known = [m for m in os.environ.get(ENV_MODULES, "").split(",") if m]
        if module not in known:
            os.environ[ENV_MODULES] = ",".join(known + [module])


def load_env_methods() -> None:
    """In a worker process: import the method modules its parent loaded (``ENV_MODULES``)."""
    load_methods([m for m in os.environ.get(ENV_MODULES, "").split(",") if m])


def load_entry_points() -> None:
    """Import every ``mmpetl.methods`` entry point (``name = "module"`` or ``"module:attr"``) of
    the installed distributions; a failing one is a ``ConfigError`` naming it."""
    for point in metadata.entry_points(group=ENTRY_POINTS):
        try:
            _import_registering(point.module, f"entry point {point.name} "
                                              f"({point.dist.name if point.dist else '?'})")
            if point.attr:
                point.load()
        except Exception as error:
            raise ConfigError(f"entry point {point.name!r} of group {ENTRY_POINTS!r} "
                              f"({point.value}) could not be loaded: "
                              f"{type(error).__name__}: {error}") from error


def method_origin(name: str) -> dict:
    """Where method ``name`` comes from: {"source": "built-in" | "params.yaml methods" |
    "entry point ...", "module": ..., "file": its module's source file}."""
    spec = get_method(name)
    module = spec.apply_fn.__module__
    origin = _ORIGINS.get(name) or {"source": "built-in" if module.startswith("methods.")
                                    else "imported", "module": module}
    found = sys.modules.get(module)
    return {**origin, "module": module, "file": getattr(found, "__file__", None)}


__all__ = ["register", "method_names", "method_sources", "module_sources", "load_methods",
           "load_env_methods", "load_entry_points", "method_origin", "ENTRY_POINTS", "get_method",
           "apply_method", "ConfigError", "UnknownName"]
