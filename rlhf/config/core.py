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
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# A config tree is a dataclass: its fields are what the file, the overrides and --help name.
T = TypeVar("T", bound="DataclassInstance")

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
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    must_exist: bool = False,
) -> Any:
    """A documented config field with optional bounds; a set of choices is a ``Literal`` or ``Enum``
    field type, so the code that dispatches on it and the config share one definition.

    ``must_exist`` checks that a path exists, unless the value is empty or looks like a hub
    name (``owner/name`` with no file suffix), since those are resolved later by their loaders.
    """
    meta = {"help": help, "gt": gt, "ge": ge, "le": le, "must_exist": must_exist}
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


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """The first member type of ``tp`` that ``value`` converts to (null only when it allows it)."""
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        with contextlib.suppress(ConfigError):
            return _coerce(value, arg, key)
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")


def _coerce_choice(value: Any, tp: Any, key: str) -> Any:
    """A ``Literal`` value or an ``Enum`` member."""
    if get_origin(tp) is Literal:
        for allowed in get_args(tp):  # by type too: YAML's true must not pass as the choice 1
            if value == allowed and type(value) is type(allowed):
                return allowed
    else:
        with contextlib.suppress(ValueError):
            return tp(value)
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")


def _coerce_container(value: Any, tp: Any, key: str) -> Any:
    """A list/tuple or dict, item by item; a dataclass section from a mapping."""
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        ktp, vtp = get_args(tp) or (Any, Any)
        return {_coerce(k, ktp, key): _coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"expected a list, got {value!r}")
    (item_tp,) = get_args(tp)[:1] or (Any,)
    items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """bool, int, float, str or Path; YAML's loose typing is tightened (no bool as int)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and number and isinstance(value, int):
        return value
    if tp is float:
        if number:
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
    if tp is str and (isinstance(value, str) or number):
        return str(value)
    if tp is Path:
        return Path(str(value))
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp not in expected:
        raise ConfigError(key, f"unsupported field type {tp!r}")
    raise ConfigError(key, f"expected {expected[tp]}, got {value!r}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML-parsed value to ``tp`` or raise a ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return _coerce_choice(value, tp, key)
    if origin in (list, tuple, Sequence, dict) or dataclasses.is_dataclass(tp):
        return _coerce_container(value, tp, key)
    return _coerce_scalar(value, tp, key)


def _build(cls: type[T], values: dict[str, Any], prefix: str) -> T:
    """An instance of ``cls`` from its defaults with ``values`` applied."""
    return _apply(cls(), values, prefix)


def _apply(instance: T, values: dict[str, Any], prefix: str) -> T:
    """A copy of ``instance`` with ``values`` applied; nested sections merge field by field.

    Merging into the current instance (not the class defaults) keeps a job's own defaults for
    a section, e.g. ``model.lr=...`` must not reset the job's choice of ``model.name_or_path``.
    A section whose defaults depend on what the user set defines ``with_given(given)``: it gets
    the names of the fields given here (from the file or the command line) and returns the
    section to use.
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
        if dataclasses.is_dataclass(current) and not isinstance(current, type) and isinstance(value, dict):
            changes[name] = _apply(current, value, key)
        else:
            changes[name] = _coerce(value, hints[name], key)
    updated = dataclasses.replace(instance, **changes)
    with_given = getattr(updated, "with_given", None)
    return with_given(frozenset(values)) if callable(with_given) else updated


# ---------------------------------------------------------------- validation


def _check_field(f: dataclasses.Field, value: Any, key: str) -> None:
    meta = f.metadata
    if value is None:
        return
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


def to_dict(cfg: Any) -> Any:
    """A config (or any value in it) as plain YAML-safe data (enums by value, paths as strings)."""

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


def default_config(cls: type[T]) -> T:
    """What a run of ``cls`` with no file and no overrides resolves to (before validation)."""
    return _build(cls, {}, "")


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML; a run's outputs always carry it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


@dataclasses.dataclass(frozen=True)
class KeyHelp:
    """One leaf key as ``--help`` shows it: the value a run with no overrides resolves, and its doc."""

    key: str
    default: Any  # plain YAML data, exactly what output_dir/config.yaml records
    doc: str
    when_set: str = ""  # a section that is null by default: the key's value applies once it is set

    def line(self) -> str:
        text = yaml.safe_dump(self.default, default_flow_style=True).strip().removesuffix("...").strip()
        return f"  {self.key} = {text}" + (f"   (once {self.when_set} is set)" if self.when_set else "")


def _optional_section(tp: Any) -> type | None:
    """The dataclass in ``Section | None``, else None."""
    if get_origin(tp) in (Union, types.UnionType):
        sections = [a for a in get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        return sections[0] if sections else None
    return None


def describe(cfg: Any, prefix: str = "", when_set: str = "") -> list[KeyHelp]:
    """Every leaf key of ``cfg`` (a job's default instance), for ``--help`` and the docs.

    Reading the instance, not the class, shows each job's own defaults for a shared section.
    A section that is null by default is shown as null, followed by its keys' values once set.
    """
    rows: list[KeyHelp] = []
    hints = get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(value, key + ".", when_set))
            continue
        rows.append(KeyHelp(key, to_dict(value), f.metadata.get("help", ""), when_set))
        section = _optional_section(hints[f.name])
        if value is None and section is not None:
            rows.extend(describe(section(), key + ".", when_set or key))
    return rows


def help_text(cls: type, prog: str, resumable: bool) -> str:
    flags = "[--config FILE.yaml]" + (" [--resume]" if resumable else "")
    lines = [
        f"usage: {prog} {flags} [key=value ...]",
        "",
        *(["--resume continues from the last checkpoint under output_dir.", ""] if resumable else []),
        "Every key below can be set in the YAML file or overridden as key=value; the value shown is",
        "what a run with no overrides uses (and records in output_dir/config.yaml).",
        "",
    ]
    for row in describe(default_config(cls)):
        lines.append(row.line())
        if row.doc:
            lines.append(f"      {row.doc}")
    return "\n".join(lines)


@dataclasses.dataclass
class CliArgs(typing.Generic[T]):
    """What a job's command line asked for: the resolved config and run flags."""

    config: T
    resume: bool


def parse_cli(
    cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None, resumable: bool = False
) -> CliArgs[T]:
    """Parse ``[--config FILE] [--resume] [--help] key=value ...`` for a job.

    ``--resume`` is accepted only by jobs that checkpoint (``resumable``). Config errors print one
    line (``error: key: message``) and exit with status 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0])
    flags = "--config FILE, " + ("--resume, " if resumable else "") + "--help"
    config_file = None
    resume = False
    overrides: list[str] = []
    it = iter(argv)
    try:
        for arg in it:
            if arg in ("-h", "--help"):
                print(help_text(cls, prog, resumable))
                raise SystemExit(0)
            if arg == "--resume" and resumable:
                resume = True
            elif arg == "--config":
                config_file = next(it, None)
                if config_file is None:
                    raise ConfigError("--config", "needs a YAML file path")
            elif arg.startswith("--config="):
                config_file = arg.split("=", 1)[1]
            elif arg.startswith("-"):
                raise ConfigError(arg, f"unknown flag; allowed: {flags}")
            else:
                overrides.append(arg)
        cfg = load_config(cls, config_file, overrides)
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return CliArgs(config=cfg, resume=resume)
