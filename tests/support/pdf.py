"""Small PDFs written as raw PDF syntax for tests and benchmarks/pdf_bombs.py: hostile layouts
(parser bombs) and odd text a real paper never has. One content stream per page, Helvetica (a
standard font, nothing embedded), as many FlateDecode layers as asked."""

from __future__ import annotations

import random
import zlib


def raw_pdf(contents: list[bytes], layers: int = 1, filters: int | None = None) -> bytes:
    """A minimal valid PDF with one page per content stream, each compressed ``layers`` times
    and declared as ``filters`` FlateDecode layers (default: as many; more if precompressed)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    names = b" ".join([b"/FlateDecode"] * (layers if filters is None else filters))
    for content in contents:
        for _ in range(layers):
            content = zlib.compress(content)
        kids.append(len(objects) + 1)
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources "
                       b"<< /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (len(objects) + 2))
        objects.append(b"<< /Length %d /Filter [%s] >>\nstream\n%s\nendstream"
                       % (len(content), names, content))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def text_page(items: list[tuple[float, float, str]], size: float = 10) -> bytes:
    """A content stream drawing each (x, y, text) in Helvetica at ``size``."""
    ops = [b"BT /F1 %g Tf" % size]
    ops += [b"1 0 0 1 %g %g Tm (%s) Tj" % (x, y, text.encode("latin-1")) for x, y, text in items]
    return b"\n".join([*ops, b"ET"])


def scattered_glyphs(count: int, text: str = "x", seed: int = 0) -> bytes:
    """The reported attack: thousands of separate tiny glyphs, each its own text box."""
    rng = random.Random(seed)
    return text_page([(rng.randrange(10, 600), rng.randrange(10, 780), text)
                      for _ in range(count)], size=1)


def piled_glyphs(count: int) -> bytes:
    """Glyphs alternating between two spots: every line is a neighbour of every other one on its
    spot, the case where pdfminer's grouping of lines into boxes is cubic."""
    return text_page([(100 if i % 2 else 400, 400, "w") for i in range(count)])


def zero_stream(size: int, layers: int) -> bytes:
    """A page whose content stream unpacks to ``size`` zero bytes (PDF whitespace), compressed
    ``layers`` times: 512 MB fit in ~500 KB, a second layer makes that ~2 KB."""
    compressor, chunk = zlib.compressobj(), bytes(1 << 20)
    data = b"".join(compressor.compress(chunk) for _ in range(size >> 20)) + compressor.flush()
    return raw_pdf([data], layers=layers - 1, filters=layers)


def piled_lines(lines: int, seed: int = 0) -> bytes:
    """One page of ``lines`` separate short words piled within a 20-point square: pdfminer compares
    each text line with its neighbours, so this is quadratic (3,000 take ~10 s, 6,000 ~40 s on two
    cores) from a few KB; the line cap refuses it, raised caps leave it to the time limit."""
    rng = random.Random(seed)
    return raw_pdf([text_page([(300 + rng.randrange(20), 400 + rng.randrange(20), "abc")
                               for _ in range(lines)], size=4)])


def short_word_lines(lines: int = 80) -> bytes:
    """A page whose lines hold one or two short words each (no line has three letters)."""
    words = ["a b", "I", "of", "x y", "to"]
    return raw_pdf([text_page([(72, 740 - 9 * i, words[i % len(words)]) for i in range(lines)], size=8)])
