"""PETL methods, one module each, behind one registry. Depends on torch and peft only."""
from methods.base import Backbone, ConfigError, LinearSite, MethodConfig, PromptProvider, Variant, count_parameters
from methods.registry import apply_method, get_method, method_names, register

# Importing a method module registers it.
from methods import adapter, aurora, full, lora, maple, pmf, ptuning, uniadapter, wander  # noqa: F401,E402

__all__ = ["Backbone", "ConfigError", "LinearSite", "MethodConfig", "PromptProvider", "Variant",
           "apply_method", "count_parameters", "get_method", "method_names", "register"]
