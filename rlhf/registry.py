"""Model registry: numbered Hugging Face folders (v0001, v0002, ...), each with its metrics.

It versions policies (PPO publishes them, Serve reads them) and reward models (the online loop
publishes each accepted reward update). It lives outside ``rlhf.ppo`` because Serve needs it and
nothing else from there.

A version is written under a temporary name and renamed into place only when complete, so a
reader never sees half a model. ``CURRENT`` names the current version (the one Serve answers with
and the online loop continues from): publishing makes the new version current, a rollback an
earlier one; it is replaced atomically (temp file + rename). Without it the newest is current.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from rlhf.errors import InputError

VERSION = re.compile(r"^v(\d{4,})$")
METRICS_FILE = "metrics.json"
CURRENT_FILE = "CURRENT"


def _version_number(name: str) -> int:
    """The number of a version folder name (v0007 -> 7)."""
    match = VERSION.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a version folder name (v0001, v0002, ...)")
    return int(match.group(1))


class UnknownVersionError(InputError):
    """A version that is not a complete folder of the registry."""

    def __init__(self, version: str, known: list[str]):
        self.version = version
        super().__init__(f"version: {version!r} is not in the registry; published versions: "
                         f"{', '.join(known) or 'none'}")


class PolicyRegistry:
    """A directory of published model versions (policies or reward models).

    ``root`` is made absolute here, so every version folder it hands out can be opened by a Ray
    worker, which runs in another working directory (a relative ``runs/...`` failed there as a
    hub name)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()

    def versions(self) -> list[str]:
        """Complete versions, oldest first."""
        if not self.root.is_dir():
            return []
        names = [p.name for p in self.root.iterdir() if VERSION.match(p.name) and p.is_dir()]
        return sorted(names, key=_version_number)

    def latest(self) -> Path | None:
        versions = self.versions()
        return self.root / versions[-1] if versions else None

    def current(self) -> Path | None:
        """The version ``CURRENT`` names (e.g. after a rollback), else the newest; None when empty."""
        try:
            name = (self.root / CURRENT_FILE).read_text().strip()
        except FileNotFoundError:
            name = ""
        return self.root / name if name in self.versions() else self.latest()

    def set_current(self, version: str) -> Path:
        """Make ``version`` current (a rollback, or a publish); readers see the old or the new name."""
        if version not in self.versions():
            raise UnknownVersionError(version, self.versions())
        staging = self.root / f".{CURRENT_FILE}-{os.getpid()}-{threading.get_ident()}"
        staging.write_text(version + "\n")
        staging.replace(self.root / CURRENT_FILE)
        return self.root / version

    def metrics(self, version: str) -> dict:
        """What ``version`` was published with (empty when it has no metrics file)."""
        path = self.root / version / METRICS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def publish(self, write_model: Callable[[Path], None], metrics: dict) -> Path:
        """Write a new version with ``write_model(folder)`` plus its metrics and make it current;
        returns its folder."""
        versions = self.versions()
        number = _version_number(versions[-1]) + 1 if versions else 1
        final = self.root / f"v{number:04d}"
        staging = self.root / f".staging-{final.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write_model(staging)
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        staging.rename(final)
        self.set_current(final.name)
        return final
