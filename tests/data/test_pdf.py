"""Tests for rlhf.data.pdf: a real two-column ACL paper, a generated PDF with a known layout,
and every bad-input case."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import time
import tracemalloc
import zlib
from pathlib import Path

import psutil
import pytest
import reportlab
from pdfminer.high_level import extract_text
from reportlab.lib.pagesizes import letter
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen import canvas
from support.paths import FIXTURES
from support.pdf import piled_glyphs, raw_pdf, scattered_glyphs, text_page, zero_stream

from rlhf.data.pdf import (
    Paper,
    PdfError,
    PdfLimits,
    Section,
    _worker_reply,
    clean_text,
    extract_paper,
    extract_paper_isolated,
)

DATA = FIXTURES
REAL_PDF = DATA / "2023.eacl-main.121.pdf"
LIGATURES = "\ufb00\ufb01\ufb02\ufb03\ufb04"


def _norm(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def real() -> Paper:
    return extract_paper(REAL_PDF)


@pytest.fixture(scope="module")
def meta() -> dict:
    rows = [json.loads(line) for line in (DATA / "pdfs_meta.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["file"].endswith(REAL_PDF.name))


# --- real paper ---------------------------------------------------------------------------


def test_real_title(real: Paper, meta: dict) -> None:
    assert _norm(real.title) == _norm(meta["title"])


def test_real_abstract(real: Paper, meta: dict) -> None:
    # Exact: small caps (LONGEVAL -> LongEval), footnote mark and hyphenation are all undone.
    assert _norm(real.abstract) == _norm(meta["abstract"])


def test_real_headings_in_document_order(real: Paper) -> None:
    headings = [s.heading for s in real.sections]
    assert headings == [
        "1 Introduction",
        "2 Survey of human evaluation practices",
        "3 The LongEval guidelines for faithfulness human evaluation",
        "3.1 RQ1: Does inter-annotator agreement improve using fine-grained annotations?",
        "3.2 RQ2: Can we reduce annotator workload by partially annotating a long summary?",
        "3.3 RQ3: Is it useful to align summary units to sentences in the source document?",
        "3.4 To what extent do our findings generalize to short-form summarization?",
        "4 Related Work",
        "5 Conclusion",
        "Limitations",
        "Ethical Considerations",
        "Acknowledgments",
    ]
    assert all(s.text for s in real.sections)


def test_real_references_and_appendix_dropped(real: Paper) -> None:
    text = real.to_text()
    assert not any("reference" in s.heading.lower() for s in real.sections)
    # Titles of cited papers, as they appear in the reference list.
    assert "A Dataset and Evaluation Platform for Machine-in-the-Loop" not in text
    assert "Evaluating content selection in summarization" not in text
    # Appendix headings: the appendices follow the references and are dropped with them.
    assert "Bootstrap analysis of inter-annotator" not in text
    assert "Additional Survey Statistics" not in text


def test_real_front_matter_and_page_furniture_dropped(real: Paper) -> None:
    text = real.to_text()
    for junk in (
        "allenai.org",
        "University of Massachusetts",
        "Proceedings of the 17th",
        "Kalpesh Krishna♠",
        "1650",
        "longeval-summarization",
        "PubMed + ngram block",  # Table 3 cells, set in body-size font inside the column
    ):
        assert junk not in text, junk
    for section in real.sections:
        assert not re.search(r"\b(Figure|Table) \d+:", section.text), section.heading
        assert not re.search(r"(?m)^\s*\d+\s*$", section.text), section.heading


def test_real_two_column_reading_order(real: Paper) -> None:
    intro = real.sections[0].text
    # This sentence runs from the bottom of the left column (above a footnote) to the top of
    # the right column of page 1.
    assert (
        "Human judgments are considered the gold standard for evaluating model-generated "
        "summaries (Kryscinski et al., 2019; Fabbri et al., 2021)"
    ) in intro
    assert intro.index("gold standard") < intro.index("To better understand the challenges")


def test_real_text_is_clean(real: Paper) -> None:
    text = real.to_text()
    assert not set(LIGATURES) & set(text)
    assert "-\n" not in text
    assert "summarization" in text and "summari- zation" not in text
    # Line-end hyphens: syllable breaks are undone, real compounds keep their hyphen.
    assert "human evaluation of long-form summaries to observe" in text
    assert "BillSum (Kornilova and Eidelman, 2019) and Multi-News (Fabbri et al., 2019)" in text
    assert "\n\n" in real.sections[0].text  # paragraph breaks survive
    assert not re.search(r"[\x00-\x08\x0b-\x1f]", text)


# --- generated PDF with a known layout ------------------------------------------------------

FONT_DIR = Path(reportlab.__file__).parent / "fonts"
TITLE = "Robust Extraction of Scholarly Text"
ABSTRACT = "We study how to recover clean text from papers. Our method works well."
HEADER = "Proceedings of the Workshop on Careful Testing 2024"


def _fonts() -> None:
    """Vera is shipped with reportlab and has the fi ligature glyph (U+FB01)."""
    pdfmetrics.registerFont(TTFont("Vera", str(FONT_DIR / "Vera.ttf")))
    pdfmetrics.registerFont(TTFont("VeraBd", str(FONT_DIR / "VeraBd.ttf")))


def _furniture(c: canvas.Canvas, page: int) -> None:
    """Running header at a fixed position; the page number drifts (so only the page-number
    rule, not the repeated-line rule, can remove it)."""
    c.setFont("Vera", 10)
    c.drawString(50, 760, HEADER)
    c.drawCentredString(306, 20 + 15 * page, str(page))


def _lines(
    c: canvas.Canvas,
    x: float,
    y: float,
    lines: list[str],
    font: str = "Vera",
    size: float = 10,
    leading: float = 12,
) -> float:
    c.setFont(font, size)
    for line in lines:
        c.drawString(x, y, line)
        y -= leading
    return y


def _known_layout_pdf() -> bytes:
    _fonts()
    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=letter)
    _furniture(c, 1)
    _lines(c, 120, 700, [TITLE], "VeraBd", 18)
    _lines(c, 150, 670, ["Ada Lovelace, Example University, ada@example.org"], size=11)
    _lines(c, 50, 630, ["Abstract"], "VeraBd", 12)
    _lines(c, 50, 612, ["We study how to recover clean text from papers.", "Our method works well."])
    _lines(c, 50, 570, ["1 Introduction"], "VeraBd", 12)
    _lines(
        c,
        50,
        550,
        [
            "Automatic summari-",
            "zation of papers needs clean input. We \ufb01nd that",
            "layout matters a lot.",
        ],
    )
    _lines(c, 50, 500, ["A second paragraph starts here."])
    c.showPage()
    _furniture(c, 2)
    _lines(c, 50, 700, ["2 Method"], "VeraBd", 12)
    _lines(
        c,
        50,
        680,
        ["The left column comes first; it ran on", "12 Linux machines and continues", "down the page."],
    )
    c.beginForm("diagram", 50, 520, 250, 640)  # embedded graphic: pdfminer makes an LTFigure
    c.rect(50, 520, 200, 120)
    _lines(c, 70, 580, ["Encoder stage", "Decoder stage"])
    c.endForm()
    c.doForm("diagram")
    _lines(c, 50, 500, ["Figure 1: The extraction pipeline."])
    _lines(c, 50, 460, ["Then the left column ends here", "and the text moves on to the"])
    _lines(c, 330, 700, ["right column, which is read", "second."])
    _lines(c, 330, 650, ["References"], "VeraBd", 12)
    _lines(c, 330, 630, ["A. Turing. 1950. Computing Machinery", "and Intelligence. Mind."])
    c.showPage()
    c.save()
    return buf.getvalue()


@pytest.fixture(scope="module")
def known() -> tuple[bytes, Paper]:
    data = _known_layout_pdf()
    return data, extract_paper(data)


def test_known_layout_exercises_ligature(known: tuple[bytes, Paper]) -> None:
    assert "\ufb01" in extract_text(io.BytesIO(known[0]))  # so normalisation is really tested


def test_known_layout_structure(known: tuple[bytes, Paper]) -> None:
    paper = known[1]
    assert paper.title == TITLE
    assert paper.abstract == ABSTRACT
    assert [s.heading for s in paper.sections] == ["1 Introduction", "2 Method"]
    assert paper.sections[0].text == (
        "Automatic summarization of papers needs clean input. We find that layout matters a lot."
        "\n\nA second paragraph starts here."
    )
    assert paper.sections[1].text == (
        "The left column comes first; it ran on 12 Linux machines and continues down the page.\n\n"
        "Then the left column ends here and the text moves on to the right column, "
        "which is read second."
    )


def test_known_layout_drops_furniture(known: tuple[bytes, Paper]) -> None:
    text = known[1].to_text()
    for junk in (HEADER, "Figure 1", "pipeline", "stage", "Turing", "Ada Lovelace", "example.org"):
        assert junk not in text, junk
    assert not re.search(r"(?m)^\s*\d+\s*$", text)


def test_paper_serialisation() -> None:
    paper = Paper("T", "A", [Section("1 Intro", "Body.")])
    assert paper.to_dict() == {
        "title": "T",
        "abstract": "A",
        "sections": [{"heading": "1 Intro", "text": "Body."}],
    }
    assert paper.to_text() == "T\n\nA\n\n1 Intro\nBody."


def test_clean_text_normalises_ligatures_and_controls() -> None:
    assert clean_text("e\ufb03cient \ufb02ow\x07 \ufb00") == "efficient flow  ff"


# --- errors ---------------------------------------------------------------------------------


def _expect(source: str | os.PathLike | bytes, pattern: str) -> None:
    with pytest.raises(PdfError, match=pattern) as info:
        extract_paper(source)
    assert "\n" not in str(info.value)


def test_error_not_a_pdf(tmp_path: Path) -> None:
    fake = tmp_path / "notes.pdf"
    fake.write_text("just some notes, not a PDF\n")
    _expect(fake, r"not a PDF.*%PDF header")


def test_error_missing_file(tmp_path: Path) -> None:
    _expect(tmp_path / "nope.pdf", "cannot read PDF file")


def test_error_truncated() -> None:
    data = REAL_PDF.read_bytes()
    _expect(data[: len(data) // 2], "corrupt or truncated")


def test_error_corrupt_body() -> None:
    _expect(b"%PDF-1.7\n1 0 obj << /Type /Catalog garbage\n%%EOF\n", "corrupt or truncated")


def test_error_encrypted() -> None:
    buf = io.BytesIO()
    c = canvas.Canvas(buf, encrypt="secret")
    c.drawString(100, 700, "Top secret paper text " * 5)
    c.save()
    _expect(buf.getvalue(), "encrypted.*password")


def test_error_image_only() -> None:
    buf = io.BytesIO()
    c = canvas.Canvas(buf)
    c.rect(100, 100, 300, 400, fill=1)
    c.circle(300, 600, 50)
    c.save()
    _expect(buf.getvalue(), "no extractable text.*OCR")


# --- hostile PDFs (parser bombs, built by tests/pdf_builders.py) ----------------------------------


def _refused(data: bytes, limits: PdfLimits, pattern: str, within_s: float) -> str:
    start = time.perf_counter()
    with pytest.raises(PdfError, match=pattern) as info:
        extract_paper(data, limits)
    assert time.perf_counter() - start < within_s
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bomb_scattered_glyphs_refused_fast() -> None:
    # 17 KB, 4,000 glyphs: 3,949 text boxes (2 min and 3 GB before the caps).
    _refused(raw_pdf([scattered_glyphs(4000)]), PdfLimits(),
             r"more than 2000 text lines on page 1 \(limit max_boxes_per_page=2000\)", 10)


def test_bomb_scattered_words_parse_fast_with_caps_raised() -> None:
    # Past the caps, layout and our own ordering/table rules stay near-linear in the boxes.
    limits = PdfLimits(max_boxes_per_page=10_000)
    title = text_page([(72, 740, "Scattered Words Everywhere")], size=20)
    data = raw_pdf([title + b"\n" + scattered_glyphs(4000, "abc")])
    start = time.perf_counter()
    paper = extract_paper(data, limits)
    assert time.perf_counter() - start < 10
    assert paper.title == "Scattered Words Everywhere"
    # Most share a baseline with another word in their column: dropped as table cells.
    assert paper.sections and 100 < paper.sections[0].text.count("abc") < 4000


def test_bomb_piled_glyphs() -> None:
    # Over the line cap: refused before pdfminer groups the lines.
    _refused(raw_pdf([piled_glyphs(4001)]), PdfLimits(), "max_boxes_per_page=2000", 10)
    # Under it, grouping is quadratic, not cubic (1,600 piled glyphs took 25 s in pdfminer).
    start = time.perf_counter()
    with pytest.raises(PdfError, match="no line with more than two letters"):
        extract_paper(raw_pdf([piled_glyphs(1600)]))
    assert time.perf_counter() - start < 10


def test_glyph_cap_names_page_and_limit() -> None:
    pages = [scattered_glyphs(100, seed=1), scattered_glyphs(700, seed=2)]
    _refused(raw_pdf(pages), PdfLimits(max_chars_per_page=500),
             r"more than 500 glyphs on page 2 \(limit max_chars_per_page=500\)", 10)


@pytest.fixture(scope="module")
def zero_bomb() -> bytes:
    """512 MB of zeros in two FlateDecode layers: a 2 KB PDF."""
    return zero_stream(512 << 20, layers=2)


def test_bomb_inflate_refused_before_unpacking(zero_bomb: bytes) -> None:
    assert len(zero_bomb) < 10_000
    # Behind ASCII85 (as reportlab writes streams) the 512 MB are one FlateDecode layer.
    inner = zlib.decompress(zero_bomb.split(b"stream\n")[1].split(b"\nendstream")[0])
    ascii85 = raw_pdf([base64.a85encode(inner) + b"~>"], layers=0).replace(
        b"/Filter []", b"/Filter [/ASCII85Decode /FlateDecode]")
    tracemalloc.start()
    try:
        for bomb in (zero_bomb, ascii85):
            _refused(bomb, PdfLimits(), r"unpack to more than 100000000 bytes "
                     r"\(limit max_inflated_bytes=100000000\)", 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20  # measured piece by piece: the zeros are never held in memory
    one_layer = zero_stream(8 << 20, layers=1)
    _refused(one_layer, PdfLimits(max_inflated_bytes=4_000_000), "max_inflated_bytes=4000000", 10)


def test_inflate_cap_is_a_total_over_streams() -> None:
    page = bytes(400_000)  # 400 KB of whitespace per page, no text
    limits = PdfLimits(max_inflated_bytes=1_000_000)
    _refused(raw_pdf([page] * 3), limits, "max_inflated_bytes=1000000", 10)
    _refused(raw_pdf([page]), limits, "no extractable text", 10)


def test_damaged_big_stream_refused_fast() -> None:
    # pdfminer recovers a damaged zlib stream byte by byte in quadratic time (16 MB: 17 s).
    stream = zlib.compress(b"0 0 m\n" * (3 << 20))
    stream = stream[:-4] + bytes(b ^ 0xFF for b in stream[-4:])  # wrong checksum
    _refused(raw_pdf([stream], layers=0, filters=1), PdfLimits(), "corrupt or truncated PDF", 5)


def test_too_many_pages_refused_before_parsing() -> None:
    pages = [text_page([(72, 700, f"Page {i} of a very long document")]) for i in range(101)]
    _refused(raw_pdf(pages), PdfLimits(),
             r"more than 100 pages \(limit max_pages=100\)", 5)
    _refused(raw_pdf(pages[:4]), PdfLimits(max_pages=3), "limit max_pages=3", 5)


def test_long_lines_stay_linear() -> None:
    # A 6,000-letter word ahead of a paragraph (our line joining searched the whole paragraph
    # with a backtracking regex at every line) and a 6,000-character line of dots (so did the
    # page-number rule): 20 s before, now linear.
    items = [(72, 740, "A Title Line")]
    items += [(72, 700, "x" * 6000), (72, 688, "." * 6000 + "a")]
    items += [(72, 676 - 6 * i, "more words on a line") for i in range(100)]
    data = raw_pdf([text_page(items[:1], size=20) + b"\n" + text_page(items[1:])])
    start = time.perf_counter()
    paper = extract_paper(data)
    assert time.perf_counter() - start < 5
    assert paper.title == "A Title Line"
    assert paper.sections[0].text.startswith("x" * 6000 + " " + "." * 6000 + "a more words")


def test_lines_of_at_most_two_letters() -> None:
    tokens = text_page([(72, 750 - 14 * i, "a b") for i in range(50)])
    with pytest.raises(PdfError, match="no line with more than two letters"):
        extract_paper(raw_pdf([tokens]))  # ValueError: max() arg is an empty sequence before
    digits = text_page([(72, 750 - 14 * i, "12 ab") for i in range(50)])
    with pytest.raises(PdfError, match="no line with more than two letters"):
        extract_paper(raw_pdf([digits]))


def test_page_of_single_words_is_a_paper() -> None:
    words = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon"]
    items = [(72, 700, "Single Words")] + [(72, 660 - 14 * i, w) for i, w in enumerate(words * 8)]
    data = raw_pdf([text_page(items[:1], size=20) + b"\n" + text_page(items[1:])])
    paper = extract_paper(data)
    assert paper.title == "Single Words"
    assert paper.sections[0].text == " ".join(words * 8)


# --- the isolated parse ----------------------------------------------------------------------


def _workers() -> list[psutil.Process]:
    """Live pdf_worker children of this process."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "rlhf.data.pdf_worker" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
    return found


def _isolated(data: bytes, limits: PdfLimits) -> Paper:
    return asyncio.run(extract_paper_isolated(data, limits))


def test_isolated_same_paper(real: Paper) -> None:
    assert _isolated(REAL_PDF.read_bytes(), PdfLimits()) == real
    assert not _workers()


def test_isolated_passes_pdf_errors_through() -> None:
    pages = [text_page([(72, 700, f"Page {i}")]) for i in range(5)]
    with pytest.raises(PdfError) as info:
        _isolated(raw_pdf(pages), PdfLimits(max_pages=3))
    assert str(info.value) == (
        "the PDF has more than 3 pages (limit max_pages=3); upload the paper without "
        "supplementary material"
    )


def test_isolated_timeout_kills_the_child() -> None:
    slow = raw_pdf([piled_glyphs(4000)])  # ~10 s with the line cap raised
    start = time.perf_counter()
    with pytest.raises(PdfError, match=r"^parsing stopped after 1 s \(limit timeout_s=1\)"):
        _isolated(slow, PdfLimits(max_boxes_per_page=100_000, timeout_s=1))
    assert time.perf_counter() - start < 5
    assert not _workers()


def test_isolated_memory_limit(zero_bomb: bytes) -> None:
    # 512 MB unpacked at once by pdfminer, with the inflate cap lifted: over 400 MB of memory.
    limits = PdfLimits(max_inflated_bytes=10**10, memory_mb=400)
    with pytest.raises(PdfError, match=r"^parsing needed more than 400 MB \(limit memory_mb=400\)"):
        _isolated(zero_bomb, limits)
    assert not _workers()


def test_isolated_cancel_kills_the_child() -> None:
    async def cancel_while_parsing() -> None:
        limits = PdfLimits(max_boxes_per_page=100_000, timeout_s=60)
        task = asyncio.create_task(extract_paper_isolated(raw_pdf([piled_glyphs(4000)]), limits))
        for _ in range(100):  # until the child runs
            await asyncio.sleep(0.05)
            if _workers():
                break
        assert _workers()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_while_parsing())
    assert not _workers()


def test_worker_failure_is_one_line() -> None:
    traceback = b"Traceback (most recent call last):\n  ...\nIndexError: list index out of range\n"
    for returncode, out in ((0, b'{"failure": "IndexError"}'), (1, b""), (-11, b"garbage")):
        with pytest.raises(PdfError, match=r"^the PDF parser failed \(") as info:
            _worker_reply(returncode, out, traceback, PdfLimits())
        assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
