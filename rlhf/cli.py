"""Running a job from the command line: parse config, save it, turn input errors into one line."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from rlhf.config.core import CliArgs, ConfigError, save_config, to_dict
from rlhf.config.sections import ModelConfig, StoreConfig, TrackingConfig
from rlhf.errors import InputError
from rlhf.metrics import flatten
from rlhf.tracking import TrackedRun


class JobConfig(Protocol):
    """What ``run_main`` needs of a job's config: a dataclass tree that says where the run writes."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def output_dir(self) -> str: ...


class TrainingJobConfig(JobConfig, Protocol):
    """A job that trains (sft, reward, dpo, ppo, online): it names its experiment trackers."""

    @property
    def tracking(self) -> TrackingConfig: ...


T = TypeVar("T", bound=JobConfig)

# Exceptions that mean "the input is wrong", as opposed to a bug: shown without a traceback.
USER_ERRORS = (ConfigError, InputError, FileNotFoundError)


def run_main(run: Callable[..., Any], args: CliArgs[T], prog: str) -> Any:
    """Save the resolved config, then call ``run(config)``, or ``run(config, resume=True)`` when
    ``--resume`` was given (only jobs that checkpoint accept it).

    Input errors exit with status 2 and one line on stderr.
    """
    # The one logging setup: rlhf's diagnostics at INFO, other libraries' at WARNING.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rlhf").setLevel(logging.INFO)
    save_config(without_secrets(args.config), Path(args.config.output_dir) / "config.yaml")
    try:
        prepare_models(args.config)
        return run(args.config, resume=True) if args.resume else run(args.config)
    except USER_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def prepare_models(config: Any) -> None:
    """Resolve every model the config names, here in the driver before any worker starts: a local
    folder becomes an absolute path (Ray Train workers run in another folder), a packaged model is
    converted once (``rlhf.models.offline``) instead of by each Ray actor at once, and a model that
    cannot be had is one line and exit 2 rather than an actor's traceback."""
    from rlhf.models.offline import resolve_name_or_path

    for value in _sections(config):
        if not isinstance(value, ModelConfig):
            continue
        if Path(value.name_or_path).exists():
            value.name_or_path = os.path.abspath(value.name_or_path)
        else:
            resolve_name_or_path(value.name_or_path)


def without_secrets(config: T) -> T:
    """A copy of ``config`` fit to save: a literal password in a ``store.url`` becomes ``***``
    (``rlhf.store.redact_url``); the run itself keeps the real one."""
    from rlhf.store import redact_url

    saved = copy.deepcopy(config)
    for value in _sections(saved):
        if isinstance(value, StoreConfig):
            value.url = redact_url(value.url)
    return saved


def tracked_run(config: TrainingJobConfig) -> TrackedRun:
    """What the trackers of a run of ``config`` log: its ``tracking`` section, and the config as
    output_dir/config.yaml records it (secrets redacted) as flat dotted parameters."""
    return TrackedRun(config.tracking, flatten(to_dict(without_secrets(config))))


def _sections(config: Any) -> list[Any]:
    """``config`` and every dataclass section below it."""
    if not dataclasses.is_dataclass(config):
        return []
    found = [config]
    for f in dataclasses.fields(config):
        found += _sections(getattr(config, f.name))
    return found
