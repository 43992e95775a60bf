"""Rule-based rewards named in config: ``package.module:function`` or ``path/to/file.py:function``."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from rlhf.errors import InputError

RewardFn = Callable[[list[str], list[str]], list[float]]


def load_reward_fn(spec: str) -> RewardFn:
    """The callable ``fn(documents, summaries) -> scores`` that ``spec`` names."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise InputError(f"reward.fn: {spec!r} must look like package.module:function or file.py:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise InputError(f"reward.fn: file not found: {target}")
        module_spec = importlib.util.spec_from_file_location(f"rlhf_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise InputError(f"reward.fn: cannot import {target!r}: {err}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"reward.fn: {target} has no function {name!r}")
    return fn
