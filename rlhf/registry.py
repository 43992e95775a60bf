"""Model registry: numbered Hugging Face folders (v0001, v0002, ...), each with its metrics.

It versions policies (PPO publishes them, Serve reads them) and reward models (the online loop
publishes each accepted reward update). It lives outside ``rlhf.ppo`` because Serve needs it and
nothing else from there.

A version is written under a temporary name and renamed into place only when complete, so a
reader never sees half a model; the newest complete version is the current one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

VERSION = re.compile(r"^v(\d{4,})$")
METRICS_FILE = "metrics.json"


class PolicyRegistry:
    """A directory of published model versions (policies or reward models)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def versions(self) -> list[str]:
        """Complete versions, oldest first."""
        if not self.root.is_dir():
            return []
        names = [p.name for p in self.root.iterdir() if VERSION.match(p.name) and p.is_dir()]
        return sorted(names, key=lambda n: int(VERSION.match(n).group(1)))

    def latest(self) -> Path | None:
        versions = self.versions()
        return self.root / versions[-1] if versions else None

    def publish(self, write_model: Callable[[Path], None], metrics: dict) -> Path:
        """Write a new version with ``write_model(folder)`` plus its metrics; returns its folder."""
        versions = self.versions()
        number = int(VERSION.match(versions[-1]).group(1)) + 1 if versions else 1
        final = self.root / f"v{number:04d}"
        staging = self.root / f".staging-{final.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write_model(staging)
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        staging.rename(final)
        return final
