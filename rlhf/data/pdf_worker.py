"""The child process of :func:`rlhf.data.pdf.extract_paper_isolated`: one PDF in, one reply out.

    python -m rlhf.data.pdf_worker '<PdfLimits as JSON>'  < paper.pdf

It reads the PDF from stdin and writes one JSON object to stdout: ``{"paper": Paper.to_dict()}``,
``{"error": "<PdfError message>"}`` or, for a bug, ``{"failure": "<exception type>"}`` (traceback
on stderr, for the server log). Running out of memory exits with status 3 at once, since
building a reply may itself need memory. The limits are set here rather than in a ``preexec_fn``:
``preexec_fn`` is unsafe in a threaded parent such as the server.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import traceback
import warnings
from typing import Any

from rlhf.data.pdf import _WORKER_EXIT_MEMORY, PdfError, PdfLimits, extract_paper


def limit_resources(limits: PdfLimits) -> None:
    """Cap this process's address space at memory_mb (allocations beyond it raise MemoryError)
    and its CPU time a little above timeout_s, so that a child orphaned by a crashed server
    still ends; the parent kills it at timeout_s of wall clock."""
    for which, soft in (
        (resource.RLIMIT_AS, limits.memory_mb << 20),
        (resource.RLIMIT_CPU, math.ceil(limits.timeout_s) + 5),
    ):
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(which, (soft, soft if which == resource.RLIMIT_AS else soft + 5))


def main() -> None:
    """Parse stdin under the limits in argv[1] and reply on stdout."""
    limits = PdfLimits(**json.loads(sys.argv[1]))
    logging.disable(logging.CRITICAL)  # pdfminer warns per bad object: unbounded stderr
    warnings.simplefilter("ignore")
    limit_resources(limits)
    try:
        data = sys.stdin.buffer.read()
        try:
            reply: dict[str, Any] = {"paper": extract_paper(data, limits).to_dict()}
        except PdfError as exc:
            reply = {"error": str(exc)}
        except MemoryError:
            raise
        except Exception as exc:  # a bug: the user gets one line, the log the traceback
            traceback.print_exc()
            reply = {"failure": type(exc).__name__}
        sys.stdout.write(json.dumps(reply))  # ASCII: safe whatever the locale
        sys.stdout.flush()
    except MemoryError:
        os._exit(_WORKER_EXIT_MEMORY)  # no cleanup: it could need memory too

if __name__ == "__main__":
    main()
