"""Load summarization data from local files or the hub into the canonical Arrow tables.

A source is read into raw rows (dicts, nested where the source nests), its *layout* is detected
from the column names, and the layout's row function turns each raw row into canonical fields.
The same row function serves hub rows and file rows, so the offline tests cover the hub path too.

Bad rows are skipped and counted by reason, with one warning per reason naming the file and the
first row indices (0-based: the line number in JSONL, the row number in Parquet/CSV/hub data), or
raise :class:`DataError` in strict mode. Nothing is dropped without being counted.

``cfg.split`` is applied to hub datasets only (it is ``load_dataset``'s ``split=``). A local
file is read whole, whatever its ``split`` column says: the default ``split="train"`` would
otherwise drop every row of files such as the validation comparisons.
"""

from __future__ import annotations

import enum
import json
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from rlhf.config.core import looks_like_local_path
from rlhf.config.sections import DataSourceConfig, DocumentPart
from rlhf.data.holdout import in_holdout
from rlhf.data.schemas import Schema
from rlhf.errors import InputError

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

# Policy samples in summarize_from_feedback sometimes run past the end-of-text token into
# unrelated text; everything from the token on is generation junk.
ENDOFTEXT = "<|endoftext|>"
EXAMPLES_PER_REASON = 5


class DataError(InputError):
    """A source cannot be loaded: unreadable, unknown layout, or a bad row in strict mode."""


class DataWarning(UserWarning):
    """Rows were skipped while loading; the message names the file, reason and first rows."""


class SkipReason(str, enum.Enum):
    """Why a row was left out. The value is the wording used in warnings and reports."""

    INVALID_UTF8 = "invalid UTF-8"
    INVALID_JSON = "invalid JSON"
    MISSING_FIELD = "missing field"
    WRONG_TYPE = "wrong type"
    EMPTY_TEXT = "empty text"
    EMPTY_SUMMARY = "empty summary"
    IDENTICAL_SUMMARIES = "identical summaries"
    BAD_CHOICE = "choice not 0 or 1"
    BELOW_MIN_RATING = "below min_rating"
    DUPLICATE_PROMPT = "duplicate prompt"
    OTHER_PART = "in the other part of the document split"

    @property
    def is_filter(self) -> bool:
        """Filters drop good rows on purpose: counted, but not warned about nor fatal in strict."""
        return self in (SkipReason.BELOW_MIN_RATING, SkipReason.DUPLICATE_PROMPT, SkipReason.OTHER_PART)


@dataclass(frozen=True)
class SkippedRow:
    """One skipped row, kept as an example so a user can find it in the file."""

    file: str
    row: int
    reason: SkipReason
    detail: str = ""


@dataclass
class SkipReport:
    """Skipped rows counted by reason, the first few of each, and rows repaired in place."""

    counts: Counter[SkipReason] = field(default_factory=Counter)
    examples: list[SkippedRow] = field(default_factory=list)
    cut_at_endoftext: int = 0  # summaries cut at <|endoftext|>: a fix, the row is kept

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, skipped: SkippedRow) -> None:
        """Count a skipped row; keep it as an example if its reason has few so far."""
        self.counts[skipped.reason] += 1
        if self.counts[skipped.reason] <= EXAMPLES_PER_REASON:
            self.examples.append(skipped)

    def merge(self, other: SkipReport) -> SkipReport:
        """A new report covering both, e.g. for a dataset built from several files."""
        merged = SkipReport(cut_at_endoftext=self.cut_at_endoftext + other.cut_at_endoftext)
        for example in self.examples + other.examples:
            if sum(e.reason is example.reason for e in merged.examples) < EXAMPLES_PER_REASON:
                merged.examples.append(example)
        merged.counts = self.counts + other.counts
        return merged

    def describe(self, reason: SkipReason) -> str:
        """``3 row(s): empty summary (rows 41, 42, 44)``: the count and where to look."""
        rows = [str(e.row) for e in self.examples if e.reason is reason]
        more = ", ..." if self.counts[reason] > len(rows) else ""
        return f"{self.counts[reason]} row(s): {reason.value} (rows {', '.join(rows)}{more})"


@dataclass(frozen=True)
class LoadResult:
    """A canonical table plus what was skipped on the way and how the source was read."""

    table: pa.Table
    skipped: SkipReport
    schema: Schema
    layout: str  # name of the detected layout
    columns: dict[str, str]  # layout field -> source column it was read from


class _BadRow(Exception):
    """Raised by row functions; the loader turns it into a skip (or a DataError in strict)."""

    def __init__(self, reason: SkipReason, detail: str = ""):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------- layouts

RowFn = Callable[[Mapping[str, Any], Mapping[str, str]], dict[str, Any]]


@dataclass(frozen=True)
class Layout:
    """A known source layout: the columns that identify it and how one row becomes canonical.

    ``fields`` maps each field the row function reads to the source column names accepted for
    it, first present wins; ``cfg.columns`` overrides any of them. Every layout also yields
    prompts, since each has the document.
    """

    name: str
    provides: Schema
    fields: Mapping[str, tuple[str, ...]]
    read: RowFn
    optional: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    rated: bool = False  # rows carry a rating that cfg.min_rating filters on

    def supports(self, schema: Schema) -> bool:
        return schema in (self.provides, Schema.PROMPTS)


def _get(mapping: Any, key: str, path: str) -> Any:
    """``mapping[key]``, or a missing-field skip naming the dotted ``path``."""
    if not isinstance(mapping, Mapping):
        raise _BadRow(SkipReason.WRONG_TYPE, f"{path.rsplit('.', 1)[0]} is not an object")
    value = mapping.get(key)
    if value is None:
        raise _BadRow(SkipReason.MISSING_FIELD, path)
    return value


def _document(info: Any) -> tuple[str, Any]:
    """(kind, text) of a summarize_from_feedback ``info``: a Reddit post or a CNN/DM article.

    Hub rows carry both keys with one of them null, so test for null rather than presence.
    """
    for kind in ("post", "article"):
        if isinstance(info, Mapping) and info.get(kind) is not None:
            return kind, info[kind]
    raise _BadRow(SkipReason.MISSING_FIELD, "info.post or info.article")


def _read_sff_comparison(row: Mapping[str, Any], cols: Mapping[str, str]) -> dict[str, Any]:
    """openai/summarize_from_feedback ``comparisons``: one document, two summaries, a choice."""
    kind, text = _document(_get(row, cols["info"], "info"))
    summaries = _get(row, cols["summaries"], "summaries")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise _BadRow(SkipReason.WRONG_TYPE, "summaries is not a list of two")
    record = {"original_text": text, "choice": row.get(cols["choice"]), "source": kind}
    for i, summary in enumerate(summaries):
        record[f"summary_{i}"] = _get(summary, "text", f"summaries[{i}].text")
        record[f"policy_{i}"] = summary.get("policy")
    return record


def _read_sff_axis(row: Mapping[str, Any], cols: Mapping[str, str]) -> dict[str, Any]:
    """openai/summarize_from_feedback ``axis``: one summary with 1-7 ratings on four axes."""
    _, text = _document(_get(row, cols["info"], "info"))
    summary = _get(row, cols["summary"], "summary")
    axes = summary.get("axes") if isinstance(summary, Mapping) else None
    return {
        "original_text": text,
        "summary": _get(summary, "text", "summary.text"),
        "rating": axes.get("overall") if isinstance(axes, Mapping) else None,
    }


def _read_flat(row: Mapping[str, Any], cols: Mapping[str, str]) -> dict[str, Any]:
    """Flat layouts: each canonical field is one column of the row."""
    return {name: row.get(col) for name, col in cols.items()}


def _read_flat_comparison(row: Mapping[str, Any], cols: Mapping[str, str]) -> dict[str, Any]:
    """Flat comparisons; the flattened TL;DR sample keeps both policies in one list."""
    record = _read_flat(row, cols)
    policies = record.pop("policies", None)
    if isinstance(policies, list) and len(policies) == 2:
        record.setdefault("policy_0", policies[0])
        record.setdefault("policy_1", policies[1])
    return record


# Document columns, by source: canonical, the seed's misspelling, TL;DR posts, papers/news.
_DOCUMENT = ("original_text", "orignal_text", "post", "article")

LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "summarize_from_feedback comparisons",
        Schema.PREFERENCE,
        {"info": ("info",), "summaries": ("summaries",), "choice": ("choice",)},
        _read_sff_comparison,
    ),
    Layout(
        "summarize_from_feedback axis",
        Schema.SFT,
        {"info": ("info",), "summary": ("summary",)},
        _read_sff_axis,
        rated=True,
    ),
    Layout(
        "flat comparisons",
        Schema.PREFERENCE,
        {
            "original_text": _DOCUMENT,
            "summary_0": ("summary_0",),
            "summary_1": ("summary_1",),
            "choice": ("choice",),
        },
        _read_flat_comparison,
        optional={
            "source": ("source",),
            "policy_0": ("policy_0",),
            "policy_1": ("policy_1",),
            "policies": ("policies",),
        },
    ),
    # TL;DR posts (post, summary), arXiv/ACL papers (article, abstract), the seed (sum_text).
    Layout(
        "document/summary pairs",
        Schema.SFT,
        {"original_text": _DOCUMENT, "summary": ("summary", "sum_text", "abstract")},
        _read_flat,
    ),
    Layout("documents", Schema.PROMPTS, {"original_text": _DOCUMENT}, _read_flat),
)


def _resolve(
    wanted: Mapping[str, tuple[str, ...]], present: list[str], mapping: Mapping[str, str]
) -> dict[str, str]:
    """Field -> source column for each field found; ``mapping`` (cfg.columns) wins."""
    resolved = {}
    for name, aliases in wanted.items():
        column = mapping.get(name) or next((a for a in aliases if a in present), None)
        if column in present:
            resolved[name] = column
    return resolved


def detect_layout(
    present: list[str], mapping: Mapping[str, str], schema: Schema | None
) -> tuple[Layout, dict[str, str]]:
    """The first registered layout whose fields are all present and that can give ``schema``.

    Returns the layout and the source column read for each of its fields.
    """
    missing = sorted(set(mapping.values()) - set(present))
    if missing:
        raise DataError(f"columns mapping names {missing}, not in the source; columns: {present}")
    matches = []
    for layout in LAYOUTS:
        cols = _resolve(layout.fields, present, mapping)
        if len(cols) == len(layout.fields):
            matches.append((layout, cols | _resolve(layout.optional, present, mapping)))
    for layout, cols in matches:
        if schema is None or layout.supports(schema):
            _check_mapping_used(layout, mapping)
            return layout, cols
    if matches:
        assert schema is not None  # with no schema asked for, the first match was returned above
        layout = matches[0][0]
        gives = " or ".join(dict.fromkeys([layout.provides.value, Schema.PROMPTS.value]))
        raise DataError(
            f"{layout.name} data has no {schema.value} rows: load it as {gives}, "
            "or map the missing columns with `columns`"
        )
    raise DataError(
        f"unknown layout: columns {present}; add a `columns` mapping from canonical names to "
        "these, e.g. columns: {original_text: <document column>, summary: <summary column>} "
        "(CLI: --columns original_text=...,summary=...)"
    )


def _check_mapping_used(layout: Layout, mapping: Mapping[str, str]) -> None:
    """A mapping key the layout never reads is a typo; say so rather than ignore it."""
    known = {*layout.fields, *layout.optional}
    unused = sorted(set(mapping) - known)
    if unused:
        raise DataError(f"columns mapping keys {unused} are not fields of {layout.name}: {sorted(known)}")


# ---------------------------------------------------------------- raw rows

RawRows = Iterable[tuple[int, Mapping[str, Any] | _BadRow]]


@dataclass(frozen=True)
class _Source:
    """Raw rows of one source, with the column names layout detection looks at."""

    label: str
    columns: list[str]
    rows: RawRows


def _parse_line(line: bytes) -> Mapping[str, Any] | _BadRow:
    """Decode one JSON line on its own, so a bad byte or bracket costs only its own row."""
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        return _BadRow(SkipReason.INVALID_UTF8, str(err))
    except json.JSONDecodeError as err:
        return _BadRow(SkipReason.INVALID_JSON, str(err))
    if not isinstance(value, dict):
        return _BadRow(SkipReason.WRONG_TYPE, f"a JSON {type(value).__name__}, not an object")
    return value


def _from_rows(label: str, rows: Sequence[tuple[int, Mapping[str, Any] | _BadRow]]) -> _Source:
    """A source whose columns are the union of its rows' keys, in first-seen order."""
    columns = dict.fromkeys(k for _, r in rows if not isinstance(r, _BadRow) for k in r)
    if not columns:  # nothing to detect a layout from: say why rather than "unknown layout"
        first = next(((i, r) for i, r in rows if isinstance(r, _BadRow)), None)
        why = f": row {first[0]}: {first[1].reason.value} ({first[1].detail})" if first else ""
        raise DataError(f"{label}: no readable rows{why}")
    return _Source(label, list(columns), rows)


def _open_jsonl(path: Path) -> _Source:
    """JSON lines, read as bytes and decoded per line; blank lines are not rows."""
    lines = path.read_bytes().split(b"\n")
    return _from_rows(str(path), [(i, _parse_line(ln)) for i, ln in enumerate(lines) if ln.strip()])


def _open_json(path: Path) -> _Source:
    """A JSON array of rows, or JSON lines: summarize_from_feedback's ``*.json`` are lines."""
    data = path.read_bytes()
    if not data.lstrip().startswith(b"["):
        return _open_jsonl(path)
    try:
        items = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    rows = [
        (i, r if isinstance(r, dict) else _BadRow(SkipReason.WRONG_TYPE, "not an object"))
        for i, r in enumerate(items)
    ]
    return _from_rows(str(path), rows)


def _from_table(label: str, table: pa.Table) -> _Source:
    return _Source(label, table.column_names, enumerate(table.to_pylist()))


def _open_parquet(path: Path) -> _Source:
    import pyarrow.parquet as pq

    return _from_table(str(path), pq.read_table(path))


def _open_csv(path: Path) -> _Source:
    """CSV; quoted values may span lines, as multi-paragraph posts do.

    Without ``newlines_in_values`` pyarrow's parallel reader may cut a large file into blocks
    inside such a value.
    """
    import pyarrow.csv as pcsv

    try:
        table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(newlines_in_values=True))
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}: cannot read CSV: {err}") from None
    return _from_table(str(path), table)


def _open_hub(cfg: DataSourceConfig) -> _Source:
    """A hub dataset through ``datasets``; its rows nest exactly as the JSON release does."""
    import datasets

    label = f"{cfg.path} ({cfg.hub_config or 'default'}, split {cfg.split})"
    try:
        dataset = datasets.load_dataset(cfg.path, cfg.hub_config or None, split=cfg.split)
    except Exception as err:  # the hub client raises a dozen types; all mean "cannot load"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"cannot load hub dataset {label}: {first_line} "
            "(offline? HF_HUB_OFFLINE=1 needs it in the local cache; or pass a local file)"
        ) from None
    return _Source(label, list(dataset.column_names), enumerate(dataset))


_FILE_READERS: dict[str, Callable[[Path], _Source]] = {
    "jsonl": _open_jsonl,
    "json": _open_json,
    "parquet": _open_parquet,
    "csv": _open_csv,
}


def _open(cfg: DataSourceConfig) -> _Source:
    """Raw rows of ``cfg.path``: a local file by suffix (or cfg.format), else a hub name."""
    is_hub = cfg.format == "hub" or (cfg.format == "auto" and not looks_like_local_path(cfg.path))
    if is_hub:
        return _open_hub(cfg)
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {cfg.path}")
    fmt = path.suffix.lstrip(".").lower() if cfg.format == "auto" else cfg.format
    if fmt not in _FILE_READERS:
        raise DataError(f"{cfg.path}: unknown file type; set format to one of {sorted(_FILE_READERS)}")
    return _FILE_READERS[fmt](path)


# ---------------------------------------------------------------- canonical rows


def _text(record: Mapping[str, Any], name: str) -> str:
    """A text field; a list of sentences (the seed's abstracts) is joined with spaces."""
    value = record.get(name)
    if value is None:
        raise _BadRow(SkipReason.MISSING_FIELD, name)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = " ".join(value)
    if not isinstance(value, str):
        raise _BadRow(SkipReason.WRONG_TYPE, f"{name} is {type(value).__name__}, not text")
    return value


def _nonempty(text: str, reason: SkipReason, name: str) -> str:
    if not text.strip():
        raise _BadRow(reason, name)
    return text


def _choice(value: Any) -> int:
    """0 or 1; bools and "1" strings are rejected rather than guessed at."""
    if type(value) is not int or value not in (0, 1):
        raise _BadRow(SkipReason.BAD_CHOICE, f"choice is {value!r}")
    return value


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _canonical(record: Mapping[str, Any], schema: Schema) -> tuple[dict[str, Any], int]:
    """The schema's columns of one record, checked; also how many summaries were cut."""
    row: dict[str, Any] = {
        "original_text": _nonempty(_text(record, "original_text"), SkipReason.EMPTY_TEXT, "original_text")
    }
    cut = 0
    for name in schema.summary_columns:
        text = _text(record, name)
        cut += ENDOFTEXT in text
        row[name] = _nonempty(text.split(ENDOFTEXT, 1)[0], SkipReason.EMPTY_SUMMARY, name)
    if schema is Schema.PREFERENCE:
        if row["summary_0"].strip() == row["summary_1"].strip():
            raise _BadRow(SkipReason.IDENTICAL_SUMMARIES)
        row["choice"] = _choice(record.get("choice"))
        row.update({k: _optional_str(record.get(k)) for k in ("source", "policy_0", "policy_1")})
    return row, cut


def _filter(
    record: Mapping[str, Any],
    row: Mapping[str, Any],
    schema: Schema,
    min_rating: int | None,
    seen: set[str],
    split: tuple[float, DocumentPart] | None = None,
) -> None:
    """Drop good rows the config asks to leave out: the other part of a document split (``split``:
    holdout share and the part kept), low-rated summaries, repeated prompts.

    Prompts are de-duplicated because comparison data repeats each post once per pair judged,
    which would weight PPO towards the posts that happened to be judged most.
    """
    if split is not None and in_holdout(row["original_text"], split[0]) != (split[1] == "holdout"):
        raise _BadRow(SkipReason.OTHER_PART)
    if min_rating is not None:
        rating = record.get("rating")
        if not isinstance(rating, (int, float)) or rating < min_rating:
            raise _BadRow(SkipReason.BELOW_MIN_RATING, f"overall rating {rating!r}")
    if schema is Schema.PROMPTS:
        if row["original_text"] in seen:
            raise _BadRow(SkipReason.DUPLICATE_PROMPT)
        seen.add(row["original_text"])


def _skip(report: SkipReport, skipped: SkippedRow, strict: bool) -> None:
    """Count a bad row, or in strict mode stop at it."""
    if strict and not skipped.reason.is_filter:
        detail = f" ({skipped.detail})" if skipped.detail else ""
        raise DataError(f"{skipped.file}: row {skipped.row}: {skipped.reason.value}{detail}")
    report.add(skipped)


def _warn(report: SkipReport) -> None:
    """One warning per reason, with its count and first rows: never thousands of lines."""
    for reason in report.counts:
        file = next(e.file for e in report.examples if e.reason is reason)
        message = f"{file}: skipped {report.describe(reason)}"
        if reason.is_filter:
            logger.info(message)
        else:
            warnings.warn(message, DataWarning, stacklevel=3)
    if report.cut_at_endoftext:
        logger.info("cut generation junk after %s from %d summaries", ENDOFTEXT, report.cut_at_endoftext)


def _rows(
    source: _Source,
    layout: Layout,
    cols: Mapping[str, str],
    schema: Schema,
    cfg: DataSourceConfig,
    report: SkipReport,
) -> Iterator[dict[str, Any]]:
    """Canonical rows of ``source``; bad ones go to ``report`` (or raise, in strict mode)."""
    min_rating = cfg.min_rating if schema is Schema.SFT else None
    split = (cfg.holdout_share, cfg.part) if cfg.holdout_share > 0 else None
    seen: set[str] = set()
    for index, raw in source.rows:
        try:
            if isinstance(raw, _BadRow):
                raise raw
            record = layout.read(raw, cols)
            row, cut = _canonical(record, schema)
            _filter(record, row, schema, min_rating, seen, split)
        except _BadRow as bad:
            _skip(report, SkippedRow(source.label, index, bad.reason, bad.detail), cfg.strict)
            continue
        report.cut_at_endoftext += cut
        yield row


def load_source(cfg: DataSourceConfig, schema: Schema | None = None) -> LoadResult:
    """Read ``cfg``'s source as the canonical ``schema`` (default: what its layout provides)."""
    source = _open(cfg)
    layout, cols = detect_layout(source.columns, cfg.columns, schema)
    schema = schema or layout.provides
    if cfg.min_rating is not None and schema is Schema.SFT and not layout.rated:
        raise DataError(f"min_rating is set but {layout.name} data has no ratings")
    report = SkipReport()
    rows = []
    for row in _rows(source, layout, cols, schema, cfg, report):
        rows.append(row)
        if len(rows) == cfg.limit:
            break
    _warn(report)
    table = pa.Table.from_pylist(rows, schema=schema.arrow)
    return LoadResult(table, report, schema, layout.name, cols)


def to_ray_dataset(result: LoadResult) -> ray.data.Dataset:
    """The loaded table as a Ray Dataset, for Ray Train / Data pipelines."""
    import ray.data

    return ray.data.from_arrow(result.table)


def read_dataset(cfg: DataSourceConfig, schema: Schema | None = None) -> ray.data.Dataset:
    """Load ``cfg`` and hand it to Ray; skips are still warned about as in load_source."""
    return to_ray_dataset(load_source(cfg, schema))


def dataset_table(dataset: ray.data.Dataset, schema: Schema) -> pa.Table:
    """All rows of a Ray dataset as one Arrow table in ``schema`` (empty datasets included)."""
    import ray

    tables = [table for table in ray.get(dataset.to_arrow_refs()) if table.num_rows]
    if not tables:
        return schema.arrow.empty_table()
    return pa.concat_tables([table.select(schema.arrow.names).cast(schema.arrow) for table in tables])
