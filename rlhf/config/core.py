"""Typed config trees: documented dataclasses, YAML files and dotted command-line overrides.

A job's config is a tree of dataclasses. Every field is declared with :func:`option`, which
keeps its one default and its one doc string together (``--help`` and the docs read the same
text). Values come from, in order: the defaults, ``--config FILE.yaml``, then ``a.b.c=value``
overrides. Anything wrong raises :class:`ConfigError` naming the dotted key and what is allowed;
:func:`parse_cli` turns that into one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

# Suffixes that mark a string as a local file rather than a hub name.
LOCAL_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".pdf", ".yaml", ".yml", ".py")


class ConfigError(ValueError):
    """A config value is wrong; ``key`` is the dotted path of the field at fault."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = None,
    choices: Sequence[Any] | None = None,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    must_exist: bool = False,
) -> Any:
    """A documented config field with optional bounds.

    ``must_exist`` checks that a path exists, unless the value is empty or looks like a hub
    name (``owner/name`` with no file suffix), since those are resolved later by their loaders.
    """
    meta = {"help": help, "choices": choices, "gt": gt, "ge": ge, "le": le, "must_exist": must_exist}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def looks_like_local_path(value: str) -> bool:
    """True when ``value`` names a file on disk rather than a hub id such as ``org/model``.

    Hub ids have exactly one slash, so ``runs/reward/model`` is a local path.
    """
    if value.startswith(("/", "./", "../", "~")) or value.endswith(LOCAL_FILE_SUFFIXES):
        return True
    if value.count("/") >= 2:
        return True
    return os.path.exists(value)


# ---------------------------------------------------------------- type coercion


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML-parsed value to ``tp`` or raise a ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}") from None
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        ktp, vtp = get_args(tp) or (Any, Any)
        return {_coerce(k, ktp, key): _coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    if tp is Path:
        return Path(str(value))
    raise ConfigError(key, f"unsupported field type {tp!r}")


def _build(cls: type[T], values: dict[str, Any], prefix: str) -> T:
    """An instance of ``cls`` from its defaults with ``values`` applied."""
    return _apply(cls(), values, prefix)


def _apply(instance: T, values: dict[str, Any], prefix: str) -> T:
    """A copy of ``instance`` with ``values`` applied; nested sections merge field by field.

    Merging into the current instance (not the class defaults) keeps a job's own defaults for
    a section, e.g. ``model.lr=...`` must not reset the job's choice of ``model.name_or_path``.
    """
    cls = type(instance)
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    changes = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in names:
            raise ConfigError(key, f"unknown key; {cls.__name__} has: {', '.join(sorted(names))}")
        current = getattr(instance, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[name] = _apply(current, value, key)
        else:
            changes[name] = _coerce(value, hints[name], key)
    return dataclasses.replace(instance, **changes)


# ---------------------------------------------------------------- validation


def _check_field(f: dataclasses.Field, value: Any, key: str) -> None:
    meta = f.metadata
    if value is None:
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(key, f"must be one of {allowed}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("gt") is not None and not value > meta["gt"]:
            raise ConfigError(key, f"must be > {meta['gt']}, got {value!r}")
        if meta.get("ge") is not None and not value >= meta["ge"]:
            raise ConfigError(key, f"must be >= {meta['ge']}, got {value!r}")
        if meta.get("le") is not None and not value <= meta["le"]:
            raise ConfigError(key, f"must be <= {meta['le']}, got {value!r}")
    if meta.get("must_exist") and isinstance(value, (str, Path)) and str(value):
        text = os.path.expanduser(str(value))
        if looks_like_local_path(text) and not os.path.exists(text):
            raise ConfigError(key, f"file not found: {value} (give an existing path)")


def validate(cfg: Any, prefix: str = "") -> None:
    """Check bounds and paths of every field, then each dataclass's own ``validate()``.

    A section's ``validate(self)`` method checks relations between its fields and raises
    ConfigError with the field name; the prefix is added here.
    """
    for f in dataclasses.fields(cfg):
        key = f"{prefix}{f.name}"
        value = getattr(cfg, f.name)
        _check_field(f, value, key)
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    validate(item, f"{key}[{i}].")
    own = getattr(cfg, "validate", None)
    if callable(own):
        try:
            own()
        except ConfigError as err:
            raise ConfigError(prefix + err.key, err.message) from None


# ---------------------------------------------------------------- merging sources


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"{part} is not a section")
        node = child
    node[parts[-1]] = value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-safe data (enums by value, paths as strings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def load_config(
    cls: type[T], config_file: str | None = None, overrides: Sequence[str] = ()
) -> T:
    """Build and validate ``cls`` from defaults, an optional YAML file and dotted overrides."""
    tree: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError("--config", f"file not found: {config_file}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError("--config", f"{config_file} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError("--config", f"{config_file} must hold a mapping of keys")
        tree = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "overrides look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    cfg = _build(cls, tree, "")
    validate(cfg)
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML; a run's outputs always carry it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf field, for ``--help`` and the docs."""
    rows: list[tuple[str, str, str]] = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        default_text = yaml.safe_dump(to_dict_value(default), default_flow_style=True).strip()
        default_text = default_text.removesuffix("...").strip()
        rows.append((key, default_text, f.metadata.get("help", "")))
    return rows


def to_dict_value(value: Any) -> Any:
    return to_dict(value) if dataclasses.is_dataclass(value) else _plain_scalar(value)


def _plain_scalar(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


def help_text(cls: type, prog: str) -> str:
    lines = [
        f"usage: {prog} [--config FILE.yaml] [--resume] [key=value ...]",
        "",
        "Every key below can be set in the YAML file or overridden as key=value.",
        "",
    ]
    for key, default, doc in describe(cls):
        lines.append(f"  {key} = {default}")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)


@dataclasses.dataclass
class CliArgs(typing.Generic[T]):
    """What a job's command line asked for: the resolved config and run flags."""

    config: T
    resume: bool


def parse_cli(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> CliArgs[T]:
    """Parse ``[--config FILE] [--resume] [--help] key=value ...`` for a job.

    Config errors print one line (``error: key: message``) and exit with status 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0])
    config_file = None
    resume = False
    overrides: list[str] = []
    it = iter(argv)
    try:
        for arg in it:
            if arg in ("-h", "--help"):
                print(help_text(cls, prog))
                raise SystemExit(0)
            if arg == "--resume":
                resume = True
            elif arg == "--config":
                config_file = next(it, None)
                if config_file is None:
                    raise ConfigError("--config", "needs a YAML file path")
            elif arg.startswith("--config="):
                config_file = arg.split("=", 1)[1]
            elif arg.startswith("-"):
                raise ConfigError(arg, "unknown flag; allowed: --config FILE, --resume, --help")
            else:
                overrides.append(arg)
        cfg = load_config(cls, config_file, overrides)
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return CliArgs(config=cfg, resume=resume)
