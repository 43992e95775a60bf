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

Uploads are untrusted, so a parse runs under :class:`PdfLimits`: page, glyph, line and
decompressed-byte caps enforced while pdfminer works (a PdfError names the cap), and
:func:`extract_paper_isolated` adds a wall-clock and memory limit by parsing in a child process.
Everything after pdfminer is near-linear in the number of lines, so the caps bound the work.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import io
import itertools
import json
import logging
import math
import os
import re
import statistics
import sys
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

from pdfminer.converter import PDFPageAggregator
from pdfminer.layout import (
    LAParams,
    LTAnno,
    LTChar,
    LTFigure,
    LTLayoutContainer,
    LTPage,
    LTTextBox,
    LTTextBoxHorizontal,
    LTTextBoxVertical,
    LTTextLine,
    LTTextLineHorizontal,
)
from pdfminer.pdfdocument import PDFDocument, PDFEncryptionError, PDFPasswordIncorrect
from pdfminer.pdfinterp import PDFPageInterpreter, PDFResourceManager
from pdfminer.pdfpage import PDFPage
from pdfminer.pdfparser import PDFParser
from pdfminer.pdftypes import LITERALS_FLATE_DECODE, PDFStream
from pdfminer.utils import Plane, mult_matrix, uniq

from rlhf.config.core import option
from rlhf.errors import InputError

_log = logging.getLogger(__name__)

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
# A page number is "[page] <punctuation> <number or roman numeral> <punctuation>"; matched in
# three anchored steps (_is_page_number), as one regex it backtracks quadratically on long lines.
_PAGE_PREFIX = re.compile(r"(?:page\s*)?[\W_]*", re.I)
_PAGE_CORE = re.compile(r"\d{1,4}|x{0,3}(?:ix|iv|v?i{0,3})", re.I)
_WORD_RUN = re.compile(r"[^\W_]*")
_PUNCT_END = re.compile(r"[\W_]*\Z")
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"[.?!:][\"\u201d\u2019)\]]*$")
_CID = re.compile(r"\(cid:\d+\)")
_MIN_LETTERS = 50  # fewer extractable letters than this means a scanned / image-only PDF
_TAIL = 256  # characters of a paragraph's end that the line-joining rules look at
_INFLATE_CHUNK = 1 << 20  # bytes per step when measuring what a FlateDecode stream unpacks to
# pdfminer recovers a damaged FlateDecode stream one input byte at a time, copying everything
# recovered so far at each step: quadratic (16 MB took 17 s). Larger damaged streams are refused.
_MAX_DAMAGED_BYTES = 1 << 20
_WORKER_EXIT_MEMORY = 3  # the worker's exit status when the parse ran out of memory (pdf_worker)


@dataclass(frozen=True)
class PdfLimits:
    """Caps on the work one PDF may cause; uploads are untrusted (config section ``serve.pdf``).

    The defaults are far above what papers need (the 20-page ACL fixture peaks at ~5,100 glyphs
    and 160 text lines per page) and far below what makes a parse take minutes or gigabytes.
    """

    max_pages: int = option(100, "Pages a PDF may have; more is refused before any page is "
                                 "parsed (papers with appendices run to 40-80).", gt=0)
    max_chars_per_page: int = option(20_000, "Glyphs drawn on one page (a dense two-column page "
                                             "has ~6,000); counted as pdfminer draws them.", gt=0)
    max_boxes_per_page: int = option(2_000, "Text lines on one page, counted before pdfminer "
                                            "groups them into boxes (that step is quadratic in "
                                            "lines piled on one spot); papers have < 200, big "
                                            "tables a few hundred.", gt=0)
    max_inflated_bytes: int = option(100_000_000, "Bytes all of a PDF's compressed streams may "
                                                  "unpack to (zip bombs); a paper needs a few MB.",
                                     gt=0)
    timeout_s: float = option(30.0, "Wall clock of an isolated parse (extract_paper_isolated); "
                                    "the parse process is killed after it. A 20-page paper "
                                    "takes ~2 s.", gt=0)
    memory_mb: int = option(1024, "Address space of the isolated parse process in MB of 2**20 "
                                  "bytes (RLIMIT_AS; its imports take ~300 of it).", gt=0)


DEFAULT_LIMITS = PdfLimits()


class PdfError(InputError):
    """A PDF we cannot extract text from; the message names the problem and the fix."""


class _LimitExceeded(Exception):
    """A PdfLimits cap was hit inside pdfminer (not a ValueError, which pdfminer may catch)."""


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

    @classmethod
    def from_dict(cls, data: dict) -> Paper:
        """Inverse of to_dict: the isolated parser sends its Paper back as JSON."""
        sections = [Section(s["heading"], s["text"]) for s in data["sections"]]
        return cls(data["title"], data["abstract"], sections)

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


def extract_paper(source: str | os.PathLike | bytes, limits: PdfLimits = DEFAULT_LIMITS) -> Paper:
    """Extract title, abstract and body sections from a PDF path or raw bytes (uploads).

    The page, glyph, line and inflated-byte caps of ``limits`` hold here; its time and memory
    limits need a process of their own (:func:`extract_paper_isolated`).
    """
    data = _read_bytes(source)
    lines = _drop_repeated(_all_lines(data, limits))
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


async def extract_paper_isolated(data: bytes, limits: PdfLimits = DEFAULT_LIMITS) -> Paper:
    """:func:`extract_paper` in a child process (``python -m rlhf.data.pdf_worker``), killed after
    ``limits.timeout_s`` and limited to ``limits.memory_mb`` of address space, so a hostile PDF
    can neither block the server's event loop and threads nor exhaust its memory.

    The PDF goes in on stdin, the Paper comes back as JSON on stdout. A cancelled call (client
    gone) kills the child too; it is always reaped before this returns or raises.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rlhf.data.pdf_worker", json.dumps(asdict(limits)),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=_worker_env(),
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(data), limits.timeout_s)
    except asyncio.TimeoutError:
        raise PdfError(
            f"parsing stopped after {limits.timeout_s:g} s (limit timeout_s={limits.timeout_s:g}); "
            "the PDF is too complex to lay out: re-export it (e.g. print to PDF) or upload a "
            "smaller file"
        ) from None
    finally:
        if process.returncode is None:  # timed out or cancelled: kill, then reap (no zombie)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    assert process.returncode is not None  # communicate() returned, so the child was reaped
    return _worker_reply(process.returncode, out, err, limits)


def _worker_env() -> dict[str, str]:
    """The child's environment: one thread per numeric library, as nothing in the parse uses
    them and every idle thread's stack counts against the address-space limit."""
    threads = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    return {**os.environ, **dict.fromkeys(threads, "1")}


def _worker_reply(returncode: int, out: bytes, err: bytes, limits: PdfLimits) -> Paper:
    """The Paper the worker sent, or its failure as a one-line PdfError (details go to the log)."""
    if returncode == _WORKER_EXIT_MEMORY:
        raise PdfError(
            f"parsing needed more than {limits.memory_mb} MB (limit memory_mb={limits.memory_mb}); "
            "re-export the PDF (e.g. print to PDF) or upload a smaller file"
        )
    try:
        reply = json.loads(out) if out else {}
    except ValueError:
        reply = {}
    if not isinstance(reply, dict):
        reply = {}
    if returncode == 0 and "paper" in reply:
        return Paper.from_dict(reply["paper"])
    if returncode == 0 and "error" in reply:
        raise PdfError(reply["error"])
    _log.warning("PDF worker failed (exit status %s): %s", returncode,
                 err.decode("utf-8", "replace")[-4000:])
    reason = reply.get("failure") or (
        f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    )
    raise PdfError(f"the PDF parser failed ({reason}); re-export the PDF and try again")


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


def _all_lines(data: bytes, limits: PdfLimits) -> list[_Line]:
    """The document's text lines in reading order, page furniture and table cells removed."""
    lines: list[_Line] = []
    box_ids = itertools.count()
    for number, page in enumerate(_layout_pages(data, limits)):
        boxes = _ordered_boxes(_text_boxes(page, page.width * page.height), page.width)
        page_lines = [ln for b in boxes for ln in _make_line(number, next(box_ids), b)]
        lines += _drop_table_cells(_merge_fragments(page_lines), page.width)
    return [ln for ln in lines if ln.text and not _is_page_number(ln.text)]


# ---------------------------------------------------------------- pdfminer under the caps

# all_texts: ACL Anthology pages wrap all text in a form XObject. boxes_flow=None: no
# hierarchical grouping of text boxes (quadratic in boxes, 2 min / 3 GB for 4,000 stray glyphs);
# _ordered_boxes orders the boxes itself.
_LAPARAMS = LAParams(all_texts=True, boxes_flow=None)


def _layout_pages(data: bytes, limits: PdfLimits) -> Iterator[LTPage]:
    """Run pdfminer page by page under ``limits``, turning its many failure modes (and the caps)
    into one-line PdfErrors. Only pdfminer runs inside the try: our own bugs stay visible."""
    budget = _Budget(limits)
    try:
        document = PDFDocument(_CappedParser(io.BytesIO(data), budget))
        pages = list(itertools.islice(PDFPage.create_pages(document), limits.max_pages + 1))
        if len(pages) > limits.max_pages:
            budget.fail(f"the PDF has more than {limits.max_pages} pages (limit max_pages="
                        f"{limits.max_pages}); upload the paper without supplementary material")
        resources = PDFResourceManager()
        device = _CappedAggregator(resources, budget)
        interpreter = PDFPageInterpreter(resources, device)
        for number, page in enumerate(pages, 1):
            budget.start_page(number)
            interpreter.process_page(page)
            layout = device.get_result()
            layout.analyze(_LAPARAMS)
            yield layout
    except _LimitExceeded as exc:
        raise PdfError(str(exc)) from None
    except (PDFPasswordIncorrect, PDFEncryptionError) as exc:
        raise PdfError("PDF is encrypted (password-protected); remove the password first") from exc
    except MemoryError:
        raise  # the isolated parse reports it as the memory_mb limit
    except Exception as exc:  # pdfminer raises anything from PSEOF to KeyError on bad input
        if budget.broken:  # a cap was hit in a place where pdfminer turned it into another error
            raise PdfError(budget.broken) from exc
        msg = f"corrupt or truncated PDF (pdfminer: {type(exc).__name__}); re-download or re-export it"
        raise PdfError(msg) from exc


class _Budget:
    """One parse's running counts against its PdfLimits; remembers the first cap it broke."""

    def __init__(self, limits: PdfLimits) -> None:
        self.limits = limits
        self.page = 0
        self.chars = 0
        self.lines = 0
        self.inflated = 0
        self.broken: str | None = None

    def fail(self, message: str) -> NoReturn:
        """Stop the parse; later checks keep failing with the first message."""
        self.broken = self.broken or message
        raise _LimitExceeded(self.broken)

    def start_page(self, number: int) -> None:
        self.page, self.chars, self.lines = number, 0, 0

    def add_char(self) -> None:
        self.chars += 1
        if self.chars > self.limits.max_chars_per_page:
            cap = self.limits.max_chars_per_page
            self.fail(f"the PDF has more than {cap} glyphs on page {self.page} (limit "
                      f"max_chars_per_page={cap}); a paper page has ~6000: upload the paper itself")

    def add_lines(self, count: int) -> None:
        self.lines += count
        if self.lines > self.limits.max_boxes_per_page:
            cap = self.limits.max_boxes_per_page
            self.fail(f"the PDF has more than {cap} text lines on page {self.page} (limit "
                      f"max_boxes_per_page={cap}); a paper page has < 200: upload the paper itself")

    def room(self) -> int:
        """Decompressed bytes the rest of the parse may still produce."""
        return self.limits.max_inflated_bytes - self.inflated

    def check_inflated(self, size: int) -> None:
        """Fail if ``size`` more decompressed bytes would pass max_inflated_bytes."""
        if size > self.room():
            cap = self.limits.max_inflated_bytes
            self.fail(f"the PDF's compressed streams unpack to more than {cap} bytes (limit "
                      f"max_inflated_bytes={cap}); re-export it without embedded data or files")


class _CappedStream(PDFStream):
    """A PDF stream whose decoding counts against the parse's max_inflated_bytes.

    Before pdfminer decodes (all at once, in memory), the stream's last FlateDecode layer is
    inflated piece by piece and only measured, stopping past the room left, so a zip bomb is
    refused without ever being held in memory. Filters before that layer are decoded first the
    same way (a capped stream of their own), so a bomb cannot hide behind ASCII85 or a second
    FlateDecode. Other filters expand boundedly and are counted after the fact; the worker's
    memory limit is the backstop.
    """

    def __init__(self, stream: PDFStream, budget: _Budget) -> None:
        super().__init__(stream.attrs, stream.rawdata or b"", stream.decipher)
        self.budget = budget

    def decode(self) -> None:
        size, damaged = _last_flate_size(self, self.budget)
        self.budget.check_inflated(size)  # before pdfminer allocates it
        if damaged and size > _MAX_DAMAGED_BYTES:
            raise _LimitExceeded("corrupt or truncated PDF (a damaged compressed stream of over "
                                 f"{_MAX_DAMAGED_BYTES >> 20} MB); re-download or re-export it")
        super().decode()
        size = len(self.data or b"")  # all filters applied
        self.budget.check_inflated(size)
        self.budget.inflated += size


class _CappedParser(PDFParser):
    """pdfminer's object parser, except that the streams it reads are _CappedStreams."""

    def __init__(self, fp: io.BytesIO, budget: _Budget) -> None:
        super().__init__(fp)
        self.budget = budget

    def push(self, *objs: Any) -> None:
        super().push(*((pos, _CappedStream(obj, self.budget) if type(obj) is PDFStream else obj)
                       for pos, obj in objs))


def _last_flate_size(stream: PDFStream, budget: _Budget) -> tuple[int, bool]:
    """(bytes the stream's last FlateDecode layer unpacks to, whether it is damaged as pdfminer
    would see it), counting only up to just past the room left; (0, False) without one."""
    chain = stream.get_filters()
    flate = [i for i, (name, _) in enumerate(chain) if name in LITERALS_FLATE_DECODE]
    if not flate:
        return 0, False
    data = stream.rawdata or b""
    if stream.decipher and stream.objid is not None and stream.genno is not None:
        data = stream.decipher(stream.objid, stream.genno, data, stream.attrs)
    if flate[-1]:  # the filters before it, by pdfminer (predictors included), under the cap
        before = {"Filter": [name for name, _ in chain[: flate[-1]]],
                  "DecodeParms": [params for _, params in chain[: flate[-1]]]}
        data = _CappedStream(PDFStream(before, data), budget).get_data()
    return _inflated_size(data, budget.room())


def _inflated_size(data: bytes, room: int) -> tuple[int, bool]:
    """(size of the zlib stream ``data`` inflated, whether it is corrupt or cut short), inflating
    _INFLATE_CHUNK bytes at a time and stopping once past ``room``."""
    inflater, size = zlib.decompressobj(), 0
    try:
        while not inflater.eof and size <= room:
            chunk = inflater.decompress(data, _INFLATE_CHUNK)
            size += len(chunk)
            data = inflater.unconsumed_tail
            if not data and len(chunk) < _INFLATE_CHUNK:  # all input used, no output pending
                break
    except zlib.error:
        return size, True
    return size, not inflater.eof and size <= room


class _CappedAggregator(PDFPageAggregator):
    """Collects a page's raw layout objects (no analysis) in our page and figure classes,
    refusing a page once it draws more than max_chars_per_page glyphs."""

    def __init__(self, resources: PDFResourceManager, budget: _Budget) -> None:
        super().__init__(resources, laparams=None)
        self.budget = budget

    def begin_page(self, page: PDFPage, ctm: Any) -> None:
        super().begin_page(page, ctm)
        assert isinstance(self.cur_item, LTPage)  # what PDFPageAggregator.begin_page just made
        self.cur_item = _Page(self.cur_item.pageid, self.cur_item.bbox, self.budget)

    def begin_figure(self, name: str, bbox: Any, matrix: Any) -> None:
        super().begin_figure(name, bbox, matrix)  # pushes the parent, as pdfminer does
        self.cur_item = _Figure(name, bbox, mult_matrix(matrix, self.ctm), self.budget)

    def render_char(self, *args: Any, **kwargs: Any) -> float:
        self.budget.add_char()
        return super().render_char(*args, **kwargs)


class _CappedLayout(LTLayoutContainer):
    """A page or figure whose text lines count against max_boxes_per_page before pdfminer groups
    them into boxes, which it does here without pdfminer's cubic case (see _group_textlines)."""

    budget: _Budget

    def group_textlines(self, laparams: LAParams, lines: Any) -> Iterator[LTTextBox]:
        lines = list(lines)
        self.budget.add_lines(len(lines))
        return _group_textlines(self, laparams, lines)


class _Page(_CappedLayout, LTPage):
    def __init__(self, pageid: int, bbox: Any, budget: _Budget) -> None:
        LTPage.__init__(self, pageid, bbox)
        self.budget = budget


class _Figure(_CappedLayout, LTFigure):
    def __init__(self, name: str, bbox: Any, matrix: Any, budget: _Budget) -> None:
        LTFigure.__init__(self, name, bbox, matrix)
        self.budget = budget


def _group_textlines(
    container: LTLayoutContainer, laparams: LAParams, lines: list[LTTextLine]
) -> Iterator[LTTextBox]:
    """pdfminer's LTLayoutContainer.group_textlines (pdfminer.six 20260107) with one change: a
    box already merged into this line's box is not merged again for each of its lines. Same
    boxes, same line order; pdfminer re-adds the whole box once per neighbour, which is cubic
    for lines piled on one spot (2,000 such glyphs: 50 s, now 3 s)."""
    plane: Plane[LTTextLine] = Plane(container.bbox)
    plane.extend(lines)
    boxes: dict[LTTextLine, LTTextBox] = {}
    for line in lines:
        neighbors = line.find_neighbors(plane, laparams.line_margin)
        members: list[LTTextLine] = [line]
        merged: set[LTTextBox] = set()
        for obj1 in neighbors:
            members.append(obj1)
            old = boxes.pop(obj1, None)
            if old is not None and old not in merged:
                merged.add(old)
                members.extend(old)
        box: LTTextBox = (LTTextBoxHorizontal() if isinstance(line, LTTextLineHorizontal)
                          else LTTextBoxVertical())
        for obj in uniq(members):
            box.add(obj)
            boxes[obj] = box
    done = set()
    for line in lines:
        line_box = boxes.get(line)
        if line_box is None or line_box in done:
            continue
        done.add(line_box)
        if not line_box.is_empty():
            yield line_box


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
    top to bottom, then right column. Single-column pages degrade to top-to-bottom order.

    A box's band is the number of full-width boxes whose centre is above its own (bisect)."""
    mid, boxes = width / 2, list(boxes)
    full = sorted((b for b in boxes if b.x0 < mid < b.x1), key=lambda b: -(b.y0 + b.y1))
    centres = sorted(f.y0 + f.y1 for f in full)
    bands: list[list[LTTextBox]] = [[] for _ in range(len(full) + 1)]
    for box in boxes:
        if not box.x0 < mid < box.x1:
            bands[len(centres) - bisect.bisect_right(centres, box.y0 + box.y1)].append(box)
    ordered: list[LTTextBox] = []
    for index, in_band in enumerate(bands):
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
    out: list[str] = []
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
    text never sits side by side within a column, table cells and display-math debris do.

    Per column, lines are sorted by baseline; a narrow line's row is a bisected range of them,
    and range minima of x1 (and maxima of x0) tell at once whether any of it lies to its side."""
    mid, narrow = width / 2, width / 5
    columns: tuple[list[_Line], list[_Line]] = ([], [])
    for ln in lines:
        if ln.x1 <= mid or ln.x0 >= mid:  # lines across the middle are never table cells
            columns[0 if ln.x1 <= mid else 1].append(ln)
    cells: set[int] = set()
    for column in columns:
        column.sort(key=lambda ln: ln.y0)
        baselines = [ln.y0 for ln in column]
        min_x1 = _RangeMin([ln.x1 for ln in column])
        min_neg_x0 = _RangeMin([-ln.x0 for ln in column])
        for a in column:
            if a.x1 - a.x0 >= narrow:
                continue
            tol = 0.3 * a.size  # same row: abs(a.y0 - b.y0) < tol, a contiguous range of b
            lo = bisect.bisect_left(baselines, True, key=lambda y: a.y0 - y < tol)
            hi = bisect.bisect_left(baselines, True, key=lambda y: y - a.y0 >= tol)
            if lo < hi and (min_x1.min(lo, hi) <= a.x0 or -min_neg_x0.min(lo, hi) >= a.x1):
                cells.add(id(a))
    return [ln for ln in lines if id(ln) not in cells]


class _RangeMin:
    """Minimum of any slice ``values[lo:hi]`` in O(1) after an O(n log n) build (sparse table)."""

    def __init__(self, values: list[float]) -> None:
        self.levels = [values]  # levels[k][i] = min(values[i : i + 2**k])
        while 2 ** len(self.levels) <= len(values):
            prev, step = self.levels[-1], 2 ** (len(self.levels) - 1)
            self.levels.append([min(prev[i], prev[i + step]) for i in range(len(prev) - step)])

    def min(self, lo: int, hi: int) -> float:
        level = (hi - lo).bit_length() - 1
        row = self.levels[level]
        return min(row[lo], row[hi - (1 << level)])


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
    if not wordy:
        raise PdfError("PDF has no line with more than two letters, so no title or running text; "
                       "upload the paper itself (or OCR it if it is a scan)")
    first = [ln for ln in wordy if ln.page == wordy[0].page]
    biggest = max(ln.size for ln in first)
    return [ln for ln in first if ln.size >= biggest - 0.5]


def _split_abstract(lines: list[_Line], body: float) -> tuple[list[_Line], list[_Line]]:
    """Split off the abstract (between "Abstract" and the first heading); front matter before
    it is discarded. Without an "Abstract" heading the abstract is empty."""
    found = next(((i, match) for i, ln in enumerate(lines[:200]) if (match := _ABSTRACT.match(ln.text))),
                 None)
    if found is None:
        return [], lines
    start, match = found
    head = lines[start]
    inline = match.group(1)
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
    otherwise lines are joined with spaces, undoing end-of-line hyphenation.

    Paragraphs are lists of pieces, and the rules look only at a paragraph's last _TAIL
    characters, so joining stays linear in the text however long a paragraph gets."""
    paragraphs: list[list[str]] = []
    prev: _Line | None = None
    for ln in lines:
        if prev is None or (ln.box != prev.box and _SENTENCE_END.search(_tail(paragraphs[-1]))):
            paragraphs.append([ln.text])
        else:
            _join_pair(paragraphs[-1], ln.text, vocab)
        prev = ln
    return "\n\n".join("".join(pieces) for pieces in paragraphs)


def _tail(pieces: list[str]) -> str:
    """The last _TAIL characters of the paragraph made of ``pieces``."""
    size, start = 0, len(pieces)
    while start and size < _TAIL:
        start -= 1
        size += len(pieces[start])
    return "".join(pieces[start:])[-_TAIL:]


def _join_pair(pieces: list[str], right: str, vocab: set[str]) -> None:
    """Append a wrapped line to a paragraph; "summari-" + "zation" -> "summarization", but keep
    the hyphen of compounds ("long-" + "form") when the document spells them hyphenated
    elsewhere."""
    tail = _tail(pieces)
    stem_run = _WORD.match(tail[-2::-1]) if tail.endswith("-") else None  # word before "-"
    if not stem_run:
        pieces += (" ", right)
        return
    stem, word = stem_run.group(0)[::-1].lower(), right.split(" ", 1)[0].lower().rstrip(".,;:)")
    if stem + word in vocab or (right[:1].islower() and f"{stem}-{word}" not in vocab):
        while not pieces[-1]:
            pieces.pop()
        pieces[-1] = pieces[-1][:-1]
    pieces.append(right)


def _vocabulary(lines: list[_Line]) -> set[str]:
    """Lower-cased words of the document, used to decide how to undo line-end hyphens."""
    return {w.strip(".,;:()[]\"'").lower() for ln in lines for w in ln.text.split()}


def _letters(text: str) -> int:
    """Count letters: a scanned PDF has none, a stray symbol line too few to be a title."""
    return sum(ch.isalpha() for ch in text)


def _is_page_number(text: str) -> bool:
    """True for "12", "- 12 -", "Page 3", "xiv": the regex "^(?:page\\s*)?[\\W_]*(?:\\d{1,4}|
    <roman>)[\\W_]*$" taken apart, since as one regex it backtracks quadratically on long
    punctuation runs. The number can only be the word characters after the leading punctuation."""
    prefix = _PAGE_PREFIX.match(text)
    word_run = _WORD_RUN.match(text, prefix.end()) if prefix else None
    assert prefix and word_run  # both patterns match the empty string, so they match anywhere
    start, end = prefix.end(), word_run.end()
    return bool(_PUNCT_END.match(text, end) and _PAGE_CORE.fullmatch(text, start, end))


def _norm_space(text: str) -> str:
    """Collapse whitespace runs so comparisons and output are stable."""
    return " ".join(text.split())
