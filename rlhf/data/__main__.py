"""``python -m rlhf.data``: look at a dataset or a paper PDF before training on it.

    python -m rlhf.data inspect tests/fixtures/tldr_comparisons_sample.jsonl
    python -m rlhf.data inspect data.csv --schema sft --columns original_text=body,summary=tldr
    python -m rlhf.data pdf paper.pdf

Errors (missing file, unknown layout, bad PDF, a bad row under --strict) print one ``error:``
line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from rlhf.config.sections import DataSourceConfig
from rlhf.data.schemas import Schema
from rlhf.data.sources import DataWarning, LoadResult, SkipReport, load_source

PERCENTILES = (50, 90, 99)
# Tokenizing every document of a 200k-paper hub dataset takes hours; the first rows suffice.
LENGTH_SAMPLE_ROWS = 5000


def _columns(text: str) -> dict[str, str]:
    """``original_text=body,summary=tldr`` -> {"original_text": "body", "summary": "tldr"}."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected canonical=source pairs, got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def _tokenizer(name: str | None) -> Any:
    """ByT5's byte tokenizer needs no download, so lengths work offline; else a hub tokenizer."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    return ByT5Tokenizer() if name is None else AutoTokenizer.from_pretrained(name)


def _length_lines(table: pa.Table, schema: Schema, tokenizer: Any) -> list[str]:
    """Token-length percentiles of each text column, to choose max_source/target_length."""
    import numpy as np

    sample = table.slice(0, LENGTH_SAMPLE_ROWS)
    lines = [
        f"token lengths ({type(tokenizer).__name__}, {sample.num_rows} rows):",
        f"  {'column':<14}" + "".join(f"{'p' + str(p):>8}" for p in PERCENTILES) + f"{'max':>8}",
    ]
    for column in schema.text_columns:
        texts = sample.column(column).to_pylist()
        lengths = np.array([len(ids) for ids in tokenizer(texts)["input_ids"]] or [0])
        values = [*np.percentile(lengths, PERCENTILES), lengths.max()]
        lines.append(f"  {column:<14}" + "".join(f"{v:>8.0f}" for v in values))
    return lines


def _skip_lines(report: SkipReport) -> list[str]:
    """Skipped rows by reason, with the first row indices so they can be found in the file."""
    lines = [f"skipped: {report.total}"]
    lines += [f"  {report.describe(reason)}" for reason in report.counts]
    if report.cut_at_endoftext:
        lines.append(f"fixed: summaries cut at <|endoftext|>: {report.cut_at_endoftext}")
    return lines


def _report(result: LoadResult, tokenizer: Any) -> str:
    used = ", ".join(f"{field} <- {column}" for field, column in result.columns.items())
    lines = [
        f"layout: {result.layout} ({used})",
        f"schema: {result.schema.value}",
        *(f"  {line}" for line in str(result.table.schema).splitlines()),
        f"rows: {result.table.num_rows}",
        *_skip_lines(result.skipped),
        *_length_lines(result.table, result.schema, tokenizer),
    ]
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> None:
    overrides = {"hub_config": args.hub_config, "split": args.split}
    cfg = DataSourceConfig(
        path=args.source,
        columns=args.columns,
        strict=args.strict,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # the report lists the same skips
        result = load_source(cfg, args.schema and Schema(args.schema))
    print(_report(result, _tokenizer(args.tokenizer)))


def _pdf(args: argparse.Namespace) -> None:
    from rlhf.data.pdf import extract_paper  # pdfminer is slow to import; only this needs it

    print(json.dumps(extract_paper(args.file).to_dict(), indent=2))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlhf.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="layout, schema, row count, skips, token lengths")
    inspect.add_argument("source", help="local .jsonl/.json/.parquet/.csv file or hub dataset name")
    inspect.add_argument(
        "--schema",
        choices=[s.value for s in Schema],
        help="canonical table to load as (default: what the layout provides)",
    )
    inspect.add_argument("--hub-config", help="hub dataset config, e.g. comparisons or axis")
    inspect.add_argument("--split", help="hub dataset split; local files are read whole")
    inspect.add_argument("--tokenizer", help="hub tokenizer for lengths (default: ByT5 bytes)")
    inspect.add_argument(
        "--columns",
        type=_columns,
        default={},
        help="canonical=source column pairs, e.g. original_text=body,summary=tldr",
    )
    inspect.add_argument("--strict", action="store_true", help="fail on the first bad row")
    inspect.set_defaults(run=_inspect)
    pdf = commands.add_parser("pdf", help="extract title, abstract and sections of a paper PDF")
    pdf.add_argument("file", help="PDF file")
    pdf.set_defaults(run=_pdf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (OSError, ValueError) as err:  # DataError, PdfError and ConfigError are ValueErrors
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
