"""Rule-based rewards for ``reward.fn``: the built-ins and the loader that resolves a
``package.module:function`` or ``file.py:function`` spec.

Each reward is ``fn(documents, summaries) -> scores``; the built-ins are named like any other
function, e.g. ``reward.fn=rlhf.ppo.rewards:brevity``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from rlhf.errors import InputError

RewardFn = Callable[[list[str], list[str]], list[float]]


# ------------------------------------------------------------------------------ built-ins


def brevity(documents: list[str], summaries: list[str]) -> list[float]:
    """Minus the summary length in characters / 20: a known target for smoke tests and demos
    (a policy learns it by ending summaries earlier)."""
    return [-len(summary) / 20 for summary in summaries]


def document_overlap(documents: list[str], summaries: list[str]) -> list[float]:
    """Share of summary words found in the document: a cheap faithfulness proxy (0 to 1)."""
    scores = []
    for document, summary in zip(documents, summaries):
        words = summary.lower().split()
        vocabulary = set(document.lower().split())
        scores.append(sum(w in vocabulary for w in words) / len(words) if words else 0.0)
    return scores


# ------------------------------------------------------------------------------ loader


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
        if module_spec is None or module_spec.loader is None:
            raise InputError(f"reward.fn: cannot load {target} as a Python module")
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
