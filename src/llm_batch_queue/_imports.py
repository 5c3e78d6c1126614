"""Loading `pkg.module:attribute` named on a command line (`--app`, `--responder`)."""

from __future__ import annotations

import importlib
import os
import sys

from llm_batch_queue.errors import ConfigError


def load_attribute(spec: str, option: str, what: str) -> object:
    """The attribute `spec` names, imported as `python -m` would: the user's own package in
    the working directory must be importable without PYTHONPATH (a console script's sys.path
    lacks the cwd). ConfigError naming `option` if it cannot be had."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{option} must look like pkg.module:{what}, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{option} {spec}: cannot import {module_name!r}: {exc}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"{option} {spec}: {module_name} has no {attribute!r}") from None
