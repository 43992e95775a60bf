"""Turn a research-paper PDF into title, abstract and body sections in reading order.

The summarizer wants clean prose, so we use pdfminer.six layout analysis (MIT licence; PyMuPDF
is AGPL and therefore off limits) and rebuild the reading order ourselves from text-box
positions: pdfminer's own ordering interleaves columns, figures and footnotes.

Heuristics (all relative to the document's dominant *body* font size):

* title: the largest-font lines on page 1;
* abstract: lines after an "Abstract" heading up to the first section heading;
* headings: short, whole-line bold or larger-than-body lines that are numbered ("2.1 Data"),
  larger than body text, or a well-known unnumbered name ("Limitations", "References");
* dropped: front matter (everything before the abstract / first heading), running headers and
  footers, page numbers, text inside embedded figures, small-font text (footnotes, tables,
  captions), "Figure N:"/"Table N:" captions, and the references section *and everything after
  it* (appendices included - they are rarely what a summary should cover).
"""

from __future__ import annotations

import io
import itertools
import math
import os
import re
import statistics
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

from pdfminer.high_level import extract_pages
from pdfminer.layout import LAParams, LTAnno, LTChar, LTFigure, LTPage, LTTextBox, LTTextLine
from pdfminer.pdfdocument import PDFEncryptionError, PDFPasswordIncorrect

from rlhf.errors import InputError

_BOLD_FONT = re.compile(r"bold|black|heavy|semibold|demi|medi", re.IGNORECASE)
_NUMBERED = re.compile(r"^\d{1,2}(?:\.\d{1,2}){0,3}\.?\s+[A-Z]")
_KNOWN_HEADINGS = re.compile(
    r"^(?:acknowledge?ments?|limitations|ethics statement|ethical considerations|conclusions?"
    r"|introduction|related work|appendix)$",
    re.IGNORECASE,
)
_REFERENCES = re.compile(
    r"^(?:\d{1,2}\.?\s+)?(?:references|bibliography|works cited|literature cited)$",
    re.IGNORECASE,
)
_ABSTRACT = re.compile(r"^abstract\b[\s.:\u2014\u2013-]*(.*)$", re.IGNORECASE)
_CAPTION = re.compile(r"^(?:figure|fig\.|table|algorithm)\s*\d+\s*[.:]", re.IGNORECASE)
_PAGE_NUMBER = re.compile(r"^(?:page\s*)?[\W_]*(?:\d{1,4}|x{0,3}(?:ix|iv|v?i{0,3}))[\W_]*$", re.I)
_SENTENCE_END = re.compile(r"[.?!:][\"\u201d\u2019)\]]*$")
_CID = re.compile(r"\(cid:\d+\)")
_MIN_LETTERS = 50  # fewer extractable letters than this means a scanned / image-only PDF


class PdfError(InputError):
    """A PDF we cannot extract text from; the message names the problem and the fix."""


@dataclass
class Section:
    """One body section: its heading line (e.g. "2.1 Data") and paragraph text."""

    heading: str
    text: str


@dataclass
class Paper:
    """The parts of a paper a summarizer needs, front and back matter removed."""

    title: str
    abstract: str
    sections: list[Section] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form for storage and API responses."""
        return asdict(self)

    def to_text(self) -> str:
        """One plain-text document (title, abstract, "heading\\ntext" sections) for the model."""
        parts = [self.title, self.abstract]
        parts += ["\n".join(p for p in (s.heading, s.text) if p) for s in self.sections]
        return "\n\n".join(p for p in parts if p)


@dataclass
class _Line:
    """A text line with the layout facts the heuristics need."""

    page: int
    box: int
    x0: float
    y0: float
    x1: float
    y1: float
    size: float
    bold: float  # fraction of letters set in a bold font
    text: str


def extract_paper(source: str | os.PathLike | bytes) -> Paper:
    """Extract title, abstract and body sections from a PDF path or raw bytes (uploads)."""
    data = _read_bytes(source)
    lines = _drop_repeated(_all_lines(data))
    if sum(_letters(ln.text) for ln in lines) < _MIN_LETTERS:
        raise PdfError("PDF has no extractable text (scanned/image-only?); run OCR first")
    body = statistics.mode(round(ln.size, 1) for ln in lines for ch in ln.text if ch.isalpha())
    title_lines = _title_lines(lines)
    abstract, rest = _split_abstract(lines[lines.index(title_lines[-1]) + 1 :], body)
    vocab = _vocabulary(lines)
    return Paper(
        title=_norm_space(" ".join(ln.text for ln in title_lines)),
        abstract=_join_lines(abstract, vocab).replace("\n\n", " "),
        sections=_sections(rest, body, vocab),
    )


def clean_text(text: str) -> str:
    """NFKC-normalise (this also splits ligatures such as "ﬁ" into "fi"), drop control chars."""
    text = _CID.sub("", unicodedata.normalize("NFKC", text))
    return "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)


def _read_bytes(source: str | os.PathLike | bytes) -> bytes:
    """Load and sanity-check the raw file so pdfminer only ever sees something PDF-shaped."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        try:
            with open(os.fspath(source), "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise PdfError(f"cannot read PDF file {os.fspath(source)!r}: {exc.strerror}") from exc
    if b"%PDF-" not in data[:1024]:
        raise PdfError("not a PDF: missing the %PDF header; upload the paper as a .pdf file")
    return data


def _all_lines(data: bytes) -> list[_Line]:
    """Run pdfminer, turning its many failure modes into one-line PdfErrors."""
    params = LAParams(all_texts=True)  # ACL Anthology pages wrap all text in a form XObject
    try:
        pages = list(extract_pages(io.BytesIO(data), laparams=params))
    except (PDFPasswordIncorrect, PDFEncryptionError) as exc:
        raise PdfError("PDF is encrypted (password-protected); remove the password first") from exc
    except Exception as exc:  # pdfminer raises anything from PSEOF to KeyError on bad input
        msg = f"corrupt or truncated PDF (pdfminer: {type(exc).__name__}); re-download or re-export it"
        raise PdfError(msg) from exc
    lines: list[_Line] = []
    box_ids = itertools.count()
    for number, page in enumerate(pages):
        boxes = _ordered_boxes(_text_boxes(page, page.width * page.height), page.width)
        page_lines = [ln for b in boxes for ln in _make_line(number, next(box_ids), b)]
        lines += _drop_table_cells(_merge_fragments(page_lines), page.width)
    return [ln for ln in lines if ln.text and not _PAGE_NUMBER.match(ln.text)]


def _text_boxes(container: LTPage | LTFigure, page_area: float) -> Iterator[LTTextBox]:
    """Yield text boxes, skipping embedded figures (graphs, diagrams) smaller than half a page.

    A figure covering the whole page is a wrapper (e.g. ACL Anthology stamping), not a graphic.
    """
    for item in container:
        if isinstance(item, LTTextBox):
            yield item
        elif isinstance(item, LTFigure) and item.width * item.height > page_area / 2:
            yield from _text_boxes(item, page_area)


def _ordered_boxes(boxes: Iterable[LTTextBox], width: float) -> list[LTTextBox]:
    """Order boxes for reading: full-width boxes cut the page into bands; per band, left column
    top to bottom, then right column. Single-column pages degrade to top-to-bottom order."""
    mid, boxes = width / 2, list(boxes)
    full = sorted((b for b in boxes if b.x0 < mid < b.x1), key=lambda b: -(b.y0 + b.y1))
    columns = [b for b in boxes if not b.x0 < mid < b.x1]

    def band(box: LTTextBox) -> int:
        return sum(f.y0 + f.y1 > box.y0 + box.y1 for f in full)

    ordered: list[LTTextBox] = []
    for index in range(len(full) + 1):
        in_band = [b for b in columns if band(b) == index]
        ordered += sorted(in_band, key=lambda b: (b.x0 >= mid, -round(b.y1), b.x0))
        ordered += full[index : index + 1]
    return ordered


def _make_line(page: int, box_id: int, box: LTTextBox) -> list[_Line]:
    """Convert one pdfminer box into _Lines: size, boldness and cleaned text per line.

    Rotated characters (e.g. arXiv's vertical side stamp) are ignored."""
    out = []
    for line in box:
        chars = [c for c in line if isinstance(c, LTChar) and c.upright]
        if chars:
            size = statistics.median(c.size for c in chars)
            letters = [c for c in chars if c.get_text().isalpha()] or chars
            bold = sum(bool(_BOLD_FONT.search(c.fontname)) for c in letters) / len(letters)
            text = _norm_space(clean_text(_line_text(line, size)))
            out.append(_Line(page, box_id, *line.bbox, size=size, bold=bold, text=text))
    return out


def _line_text(line: LTTextLine, size: float) -> str:
    """Line text without footnote markers, with fake small caps ("LONGEVAL") lower-cased.

    Markers are raised and under 3/4 of the line's size; LaTeX small caps are ~0.8 of it.
    """
    base = statistics.median(c.y0 for c in line if isinstance(c, LTChar))
    out = []
    for item in line:
        char = item.get_text()
        if isinstance(item, LTChar):
            ratio = item.size / size
            if ratio < 0.75 and item.y0 > base + 0.25 * size:
                continue
            if ratio < 0.9 and char.isupper() and out and out[-1].isalpha():
                char = char.lower()
        elif not isinstance(item, LTAnno):
            continue
        out.append(char)
    return "".join(out)


def _merge_fragments(lines: list[_Line]) -> list[_Line]:
    """Glue pieces on one baseline that pdfminer split into boxes ("1" + "Introduction")."""
    merged: list[_Line] = []
    for ln in lines:
        prev = merged[-1] if merged else None
        if prev and abs(prev.y0 - ln.y0) < 0.3 * ln.size and 0 <= ln.x0 - prev.x1 < 2 * ln.size:
            weight = len(prev.text) / (len(prev.text) + len(ln.text) or 1)
            prev.bold = prev.bold * weight + ln.bold * (1 - weight)
            prev.size, prev.x1 = max(prev.size, ln.size), ln.x1
            prev.text = f"{prev.text} {ln.text}".strip()
        else:
            merged.append(ln)
    return merged


def _drop_table_cells(lines: list[_Line], width: float) -> list[_Line]:
    """Drop narrow lines that share a baseline with another line in the same column: body
    text never sits side by side within a column, table cells and display-math debris do."""
    mid = width / 2

    def side(ln: _Line) -> int:
        return 0 if ln.x1 <= mid else 1 if ln.x0 >= mid else 2

    def row_mates(a: _Line, b: _Line) -> bool:
        apart = a.x1 <= b.x0 or b.x1 <= a.x0
        return apart and abs(a.y0 - b.y0) < 0.3 * a.size and side(a) == side(b) != 2

    narrow = width / 5
    return [a for a in lines if a.x1 - a.x0 >= narrow or not any(row_mates(a, b) for b in lines)]


def _drop_repeated(lines: list[_Line]) -> list[_Line]:
    """Remove running headers/footers: same text (digits ignored) at the same height on at
    least half of the pages (and on two or more)."""
    pages = len({ln.page for ln in lines})

    def key(ln: _Line) -> tuple[int, str]:
        return round(ln.y0 / 3), re.sub(r"\d+", "#", ln.text.lower())

    counts = Counter(k for _, k in {(ln.page, key(ln)) for ln in lines})
    limit = max(2, math.ceil(pages / 2))
    return [ln for ln in lines if counts[key(ln)] < limit]


def _title_lines(lines: list[_Line]) -> list[_Line]:
    """The title is the run of largest-font lines on the first page with text."""
    wordy = [ln for ln in lines if _letters(ln.text) > 2]  # not stray symbols or digits
    first = [ln for ln in wordy if ln.page == wordy[0].page]
    biggest = max(ln.size for ln in first)
    return [ln for ln in first if ln.size >= biggest - 0.5]


def _split_abstract(lines: list[_Line], body: float) -> tuple[list[_Line], list[_Line]]:
    """Split off the abstract (between "Abstract" and the first heading); front matter before
    it is discarded. Without an "Abstract" heading the abstract is empty."""
    start = next((i for i, ln in enumerate(lines[:200]) if _ABSTRACT.match(ln.text)), None)
    if start is None:
        return [], lines
    head = lines[start]
    inline = _ABSTRACT.match(head.text).group(1)
    after = lines[start + 1 :]
    end = next((i for i, ln in enumerate(after) if _is_heading(ln, body)), len(after))
    abstract = [ln for ln in after[:end] if ln.size >= 0.9 * after[0].size]  # no footnotes
    if inline:
        abstract.insert(0, _Line(**{**asdict(head), "text": inline}))
    return abstract, after[end:]


def _is_heading(ln: _Line, body: float) -> bool:
    """Section headings are short, whole-line bold or larger lines without a final period."""
    text = ln.text
    if not (ln.size >= 0.95 * body and len(text) <= 100 and re.search("[A-Za-z]{2}", text)):
        return False
    if text.endswith((".", ",", ";")) or not (ln.bold >= 0.9 or ln.size >= 1.05 * body):
        return False
    name = re.sub(r"^[\d.]+\s*", "", text)
    known = _KNOWN_HEADINGS.match(name) or _REFERENCES.match(text)
    return bool(_NUMBERED.match(text) or ln.size >= 1.05 * body or known)


def _sections(lines: list[_Line], body: float, vocab: set[str]) -> list[Section]:
    """Group body lines under headings, stopping at the references section."""
    sections: list[tuple[_Line, list[_Line]]] = []
    for ln in _body_lines(lines, body):
        if sections and _continues_heading(sections[-1], ln):
            sections[-1][0].text += " " + ln.text
        elif _is_heading(ln, body):
            if _REFERENCES.match(ln.text):
                break
            sections.append((ln, []))
        elif sections:
            sections[-1][1].append(ln)
    if not sections:  # no recognisable headings: keep the body rather than lose it
        text = _join_lines(list(_body_lines(lines, body)), vocab)
        return [Section("", text)] if text else []
    return [Section(head.text, _join_lines(group, vocab)) for head, group in sections]


def _continues_heading(section: tuple[_Line, list[_Line]], ln: _Line) -> bool:
    """True for the second line of a wrapped heading: same style, right below, no body yet."""
    head, body = section
    return (
        not body
        and ln.page == head.page
        and ln.bold >= 0.9
        and abs(ln.size - head.size) < 0.5
        and 0 < head.y0 - ln.y0 < 1.6 * ln.size
    )


def _body_lines(lines: list[_Line], body: float) -> Iterator[_Line]:
    """Drop small print (footnotes, tables, captions' font) and "Figure N:" caption boxes."""
    caption_box = -1
    for ln in lines:
        if _CAPTION.match(ln.text):
            caption_box = ln.box
        if ln.box != caption_box and ln.size >= 0.95 * body:
            yield ln


def _join_lines(lines: list[_Line], vocab: set[str]) -> str:
    """Rebuild paragraphs: a new pdfminer box after a finished sentence starts a paragraph;
    otherwise lines are joined with spaces, undoing end-of-line hyphenation."""
    paragraphs: list[str] = []
    prev: _Line | None = None
    for ln in lines:
        if prev is None or (ln.box != prev.box and _SENTENCE_END.search(paragraphs[-1])):
            paragraphs.append(ln.text)
        else:
            paragraphs[-1] = _join_pair(paragraphs[-1], ln.text, vocab)
        prev = ln
    return "\n\n".join(paragraphs)


def _join_pair(left: str, right: str, vocab: set[str]) -> str:
    """Join two wrapped lines; "summari-" + "zation" -> "summarization", but keep the hyphen
    of compounds ("long-" + "form") when the document spells them hyphenated elsewhere."""
    match = re.search(r"(\w+)-$", left)
    if not match:
        return f"{left} {right}"
    stem, word = match.group(1).lower(), right.split(" ", 1)[0].lower().rstrip(".,;:)")
    if stem + word in vocab or (right[:1].islower() and f"{stem}-{word}" not in vocab):
        return left[:-1] + right
    return left + right


def _vocabulary(lines: list[_Line]) -> set[str]:
    """Lower-cased words of the document, used to decide how to undo line-end hyphens."""
    return {w.strip(".,;:()[]\"'").lower() for ln in lines for w in ln.text.split()}


def _letters(text: str) -> int:
    """Count letters: a scanned PDF has none, a stray symbol line too few to be a title."""
    return sum(ch.isalpha() for ch in text)


def _norm_space(text: str) -> str:
    """Collapse whitespace runs so comparisons and output are stable."""
    return " ".join(text.split())
