"""rlhf.data loaders on real sample rows (tests/fixtures/README.md says where each file comes from)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections import Counter

import pytest
from support.paths import FIXTURES, ROOT

from rlhf.config.sections import DataSourceConfig
from rlhf.data import (
    DataError,
    DataWarning,
    Schema,
    SkipReason,
    SkipReport,
    load_source,
    to_ray_dataset,
)
from rlhf.data.sources import SkippedRow

DATA = FIXTURES
REPO = ROOT


def load(name: str, schema: Schema | None = None, **cfg):
    """Load a sample file, failing the test on any DataWarning it did not ask about."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        return load_source(DataSourceConfig(path=str(DATA / name), **cfg), schema)


def raw_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def test_flat_comparisons_skip_the_three_empty_summaries_and_cut_junk():
    with pytest.warns(DataWarning, match=r"skipped 3 row\(s\): empty summary \(rows 51, 52, 54\)"):
        result = load_source(DataSourceConfig(path=str(DATA / "tldr_comparisons_sample.jsonl")))
    assert result.layout == "flat comparisons" and result.schema is Schema.PREFERENCE
    assert result.table.num_rows == 57  # 60 real rows, split column "valid2" etc. not filtered
    assert result.skipped.counts == Counter({SkipReason.EMPTY_SUMMARY: 3})
    assert result.skipped.cut_at_endoftext == 3
    rows = result.table.to_pylist()
    assert not any("<|endoftext|>" in r["summary_0"] + r["summary_1"] for r in rows)
    junk = [r["summary_1"] for r in rows if r["summary_1"].startswith("My girlfriend and I broke up")]
    assert junk[0].endswith("without my permission.")
    assert rows[0]["summary_0"].startswith("Started dating this girl 3 weeks ago")
    assert (rows[0]["choice"], rows[0]["policy_0"]) == (0, "sup4_ppo_rm4_t.7")
    assert rows[0]["source"].startswith("redwoodresearch/mlab")


def test_tldr_sft_pairs():
    result = load("tldr_sft_sample.jsonl")
    assert (result.schema, result.table.num_rows, result.skipped.total) == (Schema.SFT, 60, 0)
    assert result.columns == {"original_text": "post", "summary": "summary"}
    assert result.table["summary"][0].as_py().startswith("Me and my gf got caught making out")


def test_original_comparisons_layout_reads_nested_rows():
    result = load("sff_comparisons_sample.jsonl")
    raw = raw_rows("sff_comparisons_sample.jsonl")
    assert result.layout == "summarize_from_feedback comparisons"
    assert result.table.num_rows == 8
    first = result.table.to_pylist()[0]
    assert first["original_text"] == raw[0]["info"]["post"]
    assert first["summary_1"] == raw[0]["summaries"][1]["text"]
    assert (first["policy_1"], first["source"]) == (raw[0]["summaries"][1]["policy"], "post")


def test_comparisons_as_prompts_are_the_distinct_documents():
    result = load("tldr_comparisons_sample.jsonl", Schema.PROMPTS)
    assert result.table.column_names == ["original_text"]
    assert result.table.num_rows == 18  # 60 comparisons of 18 posts; empty summaries don't matter
    assert result.skipped.counts == Counter({SkipReason.DUPLICATE_PROMPT: 42})


def test_a_document_split_is_by_text_and_the_same_in_every_file(tmp_path):
    full = load("tldr_sft_sample.jsonl").table
    rest = load("tldr_sft_sample.jsonl", holdout_share=0.3).table
    held = load("tldr_sft_sample.jsonl", holdout_share=0.3, part="holdout").table
    texts = full.column("original_text").to_pylist()
    assert 0 < held.num_rows < full.num_rows and rest.num_rows + held.num_rows == full.num_rows
    assert sorted(rest.column("original_text").to_pylist() + held.column("original_text").to_pylist()) \
        == sorted(texts)
    assert load("tldr_sft_sample.jsonl", holdout_share=0.3, part="holdout").skipped.counts == Counter(
        {SkipReason.OTHER_PART: rest.num_rows})  # counted, not warned about
    # another file holding the same posts (as prompts) puts each on the same side
    other = tmp_path / "posts.jsonl"
    other.write_text("".join(json.dumps({"post": t, "summary": "x"}) + "\n" for t in reversed(texts)))
    moved = load_source(DataSourceConfig(path=str(other), holdout_share=0.3, part="holdout"), Schema.PROMPTS)
    held_texts = held.column("original_text").to_pylist()
    assert set(moved.table.column("original_text").to_pylist()) == set(held_texts)
    limited = load("tldr_sft_sample.jsonl", holdout_share=0.3, part="holdout", limit=2).table
    assert limited.column("original_text").to_pylist() == held_texts[:2]


def test_comparisons_as_sft_is_a_clear_error():
    with pytest.raises(DataError, match="comparisons data has no sft rows: load it as preference or prompts"):
        load("sff_comparisons_sample.jsonl", Schema.SFT)


def test_axis_min_rating_filters_sft_pairs():
    assert load("sff_axis_sample.jsonl").table.num_rows == 8
    rated = load("sff_axis_sample.jsonl", Schema.SFT, min_rating=5)
    assert rated.table.num_rows == 5  # made-up overall ratings 7, 6, 3, 5, 2, 7, 4, 6
    assert rated.skipped.counts == Counter({SkipReason.BELOW_MIN_RATING: 3})
    assert rated.table["summary"][0].as_py() == raw_rows("sff_axis_sample.jsonl")[0]["summary"]["text"]
    with pytest.raises(DataError, match="min_rating is set but document/summary pairs data has no ratings"):
        load("tldr_sft_sample.jsonl", Schema.SFT, min_rating=5)


@pytest.mark.parametrize("name", ["arxiv_sample.jsonl", "acl_sample.jsonl"])
def test_paper_article_abstract_pairs(name):
    result = load(name)
    raw = raw_rows(name)
    assert result.columns == {"original_text": "article", "summary": "abstract"}
    assert result.table.num_rows == 5
    assert result.table["summary"][4].as_py() == raw[4]["abstract"]


def test_seed_layouts_misspelt_text_and_abstract_sentence_lists():
    seed = load("seed_sft_sample.jsonl")
    assert seed.table.num_rows == 10
    assert seed.table["original_text"][0].as_py() == raw_rows("seed_sft_sample.jsonl")[0]["orignal_text"]
    lists = load("seed_abstract_list.jsonl")
    sentences = raw_rows("seed_abstract_list.jsonl")[0]["abstract"]
    assert len(sentences) > 1 and lists.table["summary"][0].as_py() == " ".join(sentences)


def test_csv_and_parquet_with_a_columns_mapping():
    csv = load("custom_columns.csv", columns={"original_text": "body", "summary": "tldr"})
    assert (csv.schema, csv.table.num_rows) == (Schema.SFT, 10)
    assert any("\n" in text for text in csv.table["original_text"].to_pylist())  # quoted newlines
    mapping = {"original_text": "doc", "summary_0": "a", "summary_1": "b", "choice": "label"}
    parquet = load("custom_columns.parquet", columns=mapping)
    assert (parquet.schema, parquet.table.num_rows) == (Schema.PREFERENCE, 10)
    assert set(parquet.table["choice"].to_pylist()) == {0, 1}


def test_unknown_layout_names_the_columns_and_the_mapping(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"body": "a post", "tldr": "short"}) + "\n")
    with pytest.raises(DataError, match=r"columns \['body', 'tldr'\]; add a `columns` mapping"):
        load_source(DataSourceConfig(path=str(path)))


def test_mapping_to_a_missing_column_is_an_error():
    with pytest.raises(DataError, match=r"columns mapping names \['nope'\], not in the source"):
        load("tldr_sft_sample.jsonl", columns={"summary": "nope"})


def test_bad_rows_are_counted_by_reason_with_one_warning_each():
    with pytest.warns(DataWarning) as caught:
        result = load_source(DataSourceConfig(path=str(DATA / "bad_rows.jsonl")))
    assert result.table.num_rows == 2
    assert result.table["summary_0"][1].as_py() == "Roommate eats my food."
    assert result.skipped.counts == Counter(
        {
            SkipReason.INVALID_JSON: 1,
            SkipReason.INVALID_UTF8: 1,
            SkipReason.EMPTY_TEXT: 1,
            SkipReason.EMPTY_SUMMARY: 2,
            SkipReason.IDENTICAL_SUMMARIES: 1,
            SkipReason.BAD_CHOICE: 2,
            SkipReason.MISSING_FIELD: 1,
            SkipReason.WRONG_TYPE: 2,
        }
    )
    messages = [str(w.message) for w in caught]
    assert len(messages) == 8 and all("bad_rows.jsonl: skipped" in m for m in messages)
    assert "skipped 1 row(s): invalid UTF-8 (rows 2)" in "\n".join(messages)
    assert "choice not 0 or 1 (rows 6, 12)" in "\n".join(messages)


def test_strict_mode_raises_naming_file_row_and_reason():
    with pytest.raises(DataError, match=r"bad_rows\.jsonl: row 1: invalid JSON"):
        load("bad_rows.jsonl", strict=True)


def test_limit_caps_valid_rows():
    assert load("tldr_sft_sample.jsonl", limit=7).table.num_rows == 7


def test_json_array_files_are_read(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"original_text": "doc", "summary": "sum"}, ["not an object"]]))
    with pytest.warns(DataWarning, match=r"wrong type \(rows 1\)"):
        result = load_source(DataSourceConfig(path=str(path)))
    assert result.table.to_pylist() == [{"original_text": "doc", "summary": "sum"}]


def test_hub_rows_go_through_the_same_adapter(monkeypatch):
    """Hub rows nest like the JSON release but carry both post and article, one of them null."""
    import datasets

    rows = raw_rows("sff_comparisons_sample.jsonl")[:2]
    rows[1]["info"] = {"id": "cnn-1", "article": "A news article.", "title": "t", "site": "cnn"}
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = "openai/summarize_from_feedback"
    result = load_source(DataSourceConfig(path=hub, hub_config="comparisons", split="validation"))
    assert calls == [(hub, "comparisons", "validation")]
    assert result.table["source"].to_pylist() == ["post", "article"]
    assert result.table["original_text"][1].as_py() == "A news article."


def test_missing_hub_dataset_offline_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load hub dataset nobody/no-such-dataset") as err:
        load_source(DataSourceConfig(path="nobody/no-such-dataset"))
    assert "\n" not in str(err.value)


def test_skip_report_merge_adds_counts_and_caps_examples():
    def report(rows):
        r = SkipReport(cut_at_endoftext=1)
        for i in rows:
            r.add(SkippedRow("f", i, SkipReason.EMPTY_TEXT))
        return r

    assert [e.row for e in report(range(7)).examples] == [0, 1, 2, 3, 4]
    merged = report(range(3)).merge(report(range(10, 14)))
    assert merged.counts[SkipReason.EMPTY_TEXT] == 7 and merged.cut_at_endoftext == 2
    assert [e.row for e in merged.examples] == [0, 1, 2, 10, 11]
    assert merged.describe(SkipReason.EMPTY_TEXT) == "7 row(s): empty text (rows 0, 1, 2, 10, 11, ...)"


@pytest.mark.usefixtures("ray_local")
def test_ray_dataset_round_trip():
    result = load("tldr_sft_sample.jsonl", limit=12)
    dataset = to_ray_dataset(result)
    assert dataset.count() == 12
    assert dataset.take(1)[0] == result.table.slice(0, 1).to_pylist()[0]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rlhf.data", *args], capture_output=True, text=True, cwd=REPO, env=env
    )


def test_cli_inspect_prints_rows_skips_and_token_lengths():
    done = run_cli("inspect", str(DATA / "tldr_comparisons_sample.jsonl"))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "layout: flat comparisons" in out and "choice: int64 not null" in out
    assert "rows: 57" in out and "3 row(s): empty summary (rows 51, 52, 54)" in out
    assert "cut at <|endoftext|>: 3" in out
    assert "p50" in out and "p99" in out and "summary_1" in out.split("token lengths")[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "no/such/file.jsonl"], "error: no such file: no/such/file.jsonl"),
        (["pdf", str(DATA / "README.md")], "error: "),  # PdfError: not a PDF
    ],
)
def test_cli_errors_are_one_line_exit_2(args, message):
    done = run_cli(*args)
    assert done.returncode == 2
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr + done.stdout
