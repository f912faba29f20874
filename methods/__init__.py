"""PETL methods, one module each, behind one registry. Depends on torch only."""
from methods.base import Backbone, ConfigError, LinearSite, MethodConfig, PromptProvider, Variant, count_parameters
from methods.registry import (apply_method, get_method, load_entry_points, load_methods, method_names,
                              method_origin, method_sources, register)

import importlib as _importlib
import pkgutil as _pkgutil

# Every module of this package but the contract is a method module; importing it registers its
# methods. Adding a method is adding its file: this list finds it (no edit here).
BUILT_IN = tuple(sorted(m.name for m in _pkgutil.iter_modules(__path__)
                        if m.name not in ("base", "registry") and not m.name.startswith("_")))
for _name in BUILT_IN:
    try:
        _importlib.import_module(f"methods.{_name}")
    except Exception as _error:  # every command imports this package: name the file that broke it
        raise ConfigError(f"method module methods.{_name} (in {__path__[0]}) could not be "
                          f"imported: {type(_error).__name__}: {_error}") from _error
# Methods of other installed distributions (entry-point group ``mmpetl.methods``); a user's own
# modules are imported from params.yaml ``methods`` (``load_methods``, by harness.settings)
load_entry_points()

__all__ = ["Backbone", "ConfigError", "LinearSite", "MethodConfig", "PromptProvider", "Variant",
           "apply_method", "count_parameters", "get_method", "load_methods", "method_names",
           "method_origin", "method_sources", "register"]
