"""The bridge between configs and ``ssl_models``: what each method declares and accepts.

A method's ``method.*`` and ``model.*`` keys are its constructor's keyword arguments, read from
its signature (names, type hints, defaults); everything else the platform needs to know about
it (data kind, objective vs derived arguments, online metric, ...) is its ``spec``
(:func:`method_spec`), so adding a method to ``ssl_models.METHODS`` needs no change in the
platform. The arguments in :data:`DERIVED` come from the data instead (the corpus's channels,
the tokenizer's vocabulary, ...). Imports ``ssl_models`` but not Ray, so the CLI checks a
config before Ray starts.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from typing import Any

import ssl_models
from ssl_models.distributed import has_batchnorm
from ssl_models.spec import MethodSpec
from ssl_platform.config import ConfigError, ExperimentConfig, check_data_kind, check_method
from ssl_platform.views import image_views

# Constructor arguments the platform fills in from the data, and where a user changes them.
DERIVED = {
    "in_channels": "the corpus (data.channels for data.path images)",
    "image_size": "data.image_size",
    "vocab_size": "the tokenizer trained on the corpus (data.vocab_size)",
    "max_len": "data.max_len",
    "sample_rate": "data.sample_rate",
}


def method_spec(name: str) -> MethodSpec:
    """The declaration of method ``name`` (``ssl_models.METHODS[name].spec``), checked complete:
    an unknown name or an incomplete spec is a ConfigError naming the method and what is missing."""
    cls = ssl_models.METHODS.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, list(ssl_models.METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"method.name={name!r}: unknown method{hint}; expected one of "
                          f"{', '.join(ssl_models.METHODS)}")
    problems = ssl_models.spec_problems(cls)
    if not problems and (unknown := sorted(set(cls.spec.derived) - set(DERIVED))):
        problems.append(f"spec.derived names {', '.join(unknown)}, which the platform cannot derive from the data "
                        f"(it derives {', '.join(DERIVED)})")
    if problems:
        raise ConfigError(f"method {name} ({cls.__name__}) declares itself incompletely: {'; '.join(problems)}")
    return cls.spec


def method_specs() -> dict[str, MethodSpec]:
    """Every registered method's spec, by name (each checked as :func:`method_spec` does)."""
    return {name: method_spec(name) for name in ssl_models.METHODS}


def method_params(name: str) -> dict[str, tuple[Any, Any]]:
    """Constructor parameter -> (type hint, default) of ``ssl_models.METHODS[name]``."""
    cls = ssl_models.METHODS[name]
    hints = typing.get_type_hints(cls.__init__)
    params = inspect.signature(cls.__init__).parameters
    return {p: (hints.get(p, Any), params[p].default) for p in params if p != "self"}


# Image channels of the built-in corpora (a data.path corpus has data.channels).
BUILTIN_CHANNELS = {"digits": 1, "digit-captions": 1, "digits-m": 3, "digits-m-captions": 3}


def expected_derived(cfg: ExperimentConfig) -> dict[str, Any]:
    """The data-derived constructor arguments as the config predicts them (the tokenizer may
    end up with a smaller vocabulary than asked on a small corpus; training uses the real one)."""
    d = cfg.data
    values = {
        "in_channels": d.channels if d.path else BUILTIN_CHANNELS.get(d.corpus, 3),
        "image_size": d.image_size, "vocab_size": d.vocab_size, "max_len": d.max_len, "sample_rate": d.sample_rate,
    }
    return {k: v for k, v in values.items() if k in method_spec(cfg.method.name).derived}


def architecture(cfg: ExperimentConfig) -> dict[str, Any]:
    """The method's ``model.*`` settings with the constructor's defaults filled in."""
    spec = method_spec(cfg.method.name)
    defaults = {k: default for k, (_, default) in method_params(cfg.method.name).items()
                if k not in spec.objective_keys and k not in DERIVED}
    return {**defaults, **cfg.model}


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check ``method.*`` / ``model.*`` against the method's constructor, then build the method
    once on the CPU so that the constructor's own checks (a width not divisible by the heads,
    a non-positive temperature) also fail here, before Ray starts. Raises ConfigError."""
    spec = method_spec(cfg.method.name)
    check_data_kind(cfg, spec.data_kind)
    if spec.views:
        image_views(cfg, spec.views)  # every view can be built at data.image_size with the data.* overrides
    check_method(cfg, method_params(cfg.method.name), DERIVED, spec.objective_keys)
    method = build(cfg, **expected_derived(cfg))
    if cfg.scaling.sync_batchnorm and not has_batchnorm(method):
        raise ConfigError(f"scaling.sync_batchnorm=true: {spec.display_name} has no BatchNorm layer with this "
                          f"model.* setting, so there are no statistics to share; remove the key")
    return cfg


def build(cfg: ExperimentConfig, **derived: Any):
    """The method of ``cfg``, with the data-derived arguments given; a constructor's own
    ValueError (a width not divisible by the heads, ...) becomes a ConfigError."""
    try:
        return ssl_models.build_method(cfg.method.name, **cfg.method_kwargs(**derived))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"method {cfg.method.name}: {e}") from None
