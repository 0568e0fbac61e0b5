"""User code given by import path (``package.module:function``): loss masks and debug hooks.
The one place medqa_loop imports code a config names."""

from __future__ import annotations

import importlib
from typing import Callable


def load_callable(spec: str, what: str) -> Callable:
    """Import ``package.module:function``; raise ValueError naming ``what`` and the spec."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r} is not an import path of the form package.module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {what} {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"{what} {spec!r} is not callable")
    return fn
