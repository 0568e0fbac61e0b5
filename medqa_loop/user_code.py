"""User code given by import path (``package.module:function``): loss masks and debug hooks.

The one place medqa_loop imports code a config names, and only where that code is about to be
called (a mask as training tokenizes, hooks as a debugger with ``debug.pause_at`` is built).
Reading a config, validating it, or reading the one saved beside an adapter checks the *form* of
an import path only (check_import_path): nothing in a config runs because the config was read.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

from medqa_loop.config import ConfigError


def check_import_path(spec: str, key: str) -> tuple[str, str]:
    """(module, function) of ``package.module:function``, by its form alone: imports nothing.
    Raises ConfigError naming the config ``key`` otherwise."""
    module_name, sep, attr = spec.partition(":")
    if not (sep and attr.isidentifier() and all(part.isidentifier() for part in module_name.split("."))):
        raise ConfigError(f"config key '{key}': {spec!r} is not an import path of the form package.module:function")
    return module_name, attr


def load_callable(spec: str, key: str, params: tuple[str, ...]) -> Callable:
    """Import ``spec`` (config ``key``) and check, before it is ever called, that it is callable
    with ``params`` as its positional arguments (the names the caller passes, for the message).
    Every failure is a ConfigError naming the key and the spec; an import error keeps its cause."""
    module_name, attr = check_import_path(spec, key)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module runs as it is imported: it can fail in any way
        raise ConfigError(f"config key '{key}': cannot import {spec!r}: {type(e).__name__}: {e}") from e
    try:
        fn = getattr(module, attr)
    except AttributeError as e:
        raise ConfigError(f"config key '{key}': cannot import {spec!r}: module {module_name!r} has no {attr!r}") from e
    if not callable(fn):
        raise ConfigError(f"config key '{key}': {spec!r} is not callable (a {type(fn).__name__})")
    try:
        signature = inspect.signature(fn)
    except ValueError:  # some built-ins publish no signature: nothing to check them against
        return fn
    try:
        signature.bind(*params)
    except TypeError as e:
        raise ConfigError(
            f"config key '{key}': {spec!r} takes {attr}{signature} but is called as "
            f"{attr}({', '.join(params)}): {e}"
        ) from None
    return fn
