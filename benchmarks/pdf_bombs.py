"""Hostile PDFs against the paper extractor, before and after the parse caps (rlhf.data.pdf).

Builds the bombs with tests/support/pdf.py and parses each one in a fresh process,
recording the parse's wall time, its outcome and the process's peak RSS (ru_maxrss from
os.wait4; Linux keeps the spawning process's RSS as a floor of it across exec, so this script
spawns from a process that imports nothing heavy, ~15 MB, and builds the bombs in another):

* before: the extractor as committed (``git show <rev>:rlhf/data/pdf.py``), killed after
  ``--before-cap-s`` seconds and limited to ``--before-memory-gb`` of address space;
* after, in process: ``extract_paper(data)`` with the default PdfLimits;
* after, isolated: ``extract_paper_isolated(data)`` (the server's path) in a runner process; the
  worker's peak RSS is the runner's RUSAGE_CHILDREN, an upper bound by that same floor (the
  runner's ~80 MB when it spawns the worker).

    python benchmarks/pdf_bombs.py [--rev HEAD] [--out benchmarks/results/pdf_bombs.json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the bomb builders (tests/support/pdf.py)

MODES = ("before", "after", "isolated")


def bombs() -> dict[str, tuple[str, bytes]]:
    """name -> (what it is, PDF bytes): a real paper as the control, then the attacks."""
    from support.pdf import piled_glyphs, raw_pdf, scattered_glyphs, text_page, zero_stream
    from test_pdf import REAL_PDF

    lines = [(72, 700 - 14 * i, f"Line {i} of a page in a very long document.") for i in range(10)]
    return {
        "paper": ("the 20-page ACL fixture (control)", REAL_PDF.read_bytes()),
        "scattered_glyphs": ("4,000 tiny glyphs at random spots on one page",
                             raw_pdf([scattered_glyphs(4000)])),
        "zero_stream": ("a content stream of 512 MB of zeros in two FlateDecode layers",
                        zero_stream(512 << 20, layers=2)),
        "many_pages": ("2,000 pages of 10 text lines", raw_pdf([text_page(lines)] * 2000)),
        "piled_glyphs": ("2,000 glyphs alternating between two spots (just under the line cap)",
                         raw_pdf([piled_glyphs(2000)])),
    }


def parse_once(mode: str, pdf: Path, old_module: Path | None) -> dict:
    """Run in the measured process: one parse, its outcome and seconds."""
    data = pdf.read_bytes()
    if mode == "before":
        spec = importlib.util.spec_from_file_location("pdf_before", old_module)
        module = importlib.util.module_from_spec(spec)
        sys.modules["pdf_before"] = module
        spec.loader.exec_module(module)
        run = lambda: module.extract_paper(data)  # noqa: E731
    else:
        from rlhf.data.pdf import extract_paper, extract_paper_isolated

        run = ((lambda: extract_paper(data)) if mode == "after"
               else (lambda: asyncio.run(extract_paper_isolated(data))))
    start = time.perf_counter()
    try:
        paper = run()
        outcome = f"parsed: {len(paper.to_text())} characters"
    except Exception as exc:  # the outcome is what we measure
        outcome = f"{type(exc).__name__}: {exc}"[:200]
    seconds = time.perf_counter() - start
    result = {"outcome": outcome, "seconds": round(seconds, 2)}
    if mode == "isolated":  # this process is the server's side; the worker is its child
        status = Path("/proc/self/status").read_text()
        own_kb = int(status.split("VmHWM:")[1].split()[0])
        worker_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        result.update(server_peak_rss_mb=round(own_kb / 1024, 1),
                      worker_peak_rss_mb=round(worker_kb / 1024, 1))
    return result


def measure(mode: str, pdf: Path, old_module: Path, cap_s: float, memory_gb: float) -> dict:
    """Parse ``pdf`` in a fresh process; its peak RSS from wait4, killed after ``cap_s``."""
    cmd = [sys.executable, __file__, "--one", mode, str(pdf), str(old_module)]

    def limit() -> None:  # the benchmark has no threads: preexec_fn is safe here
        resource.setrlimit(resource.RLIMIT_AS, (int(memory_gb * 2**30),) * 2)

    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             preexec_fn=limit if mode == "before" else None)
    deadline = start + cap_s
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            child.kill()
            _, status, usage = os.wait4(child.pid, 0)
            break
        time.sleep(0.05)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    out = child.stdout.read().decode()
    child.stdout.close()
    result = json.loads(out) if out.strip() else {
        "outcome": f"killed after {cap_s:g} s" if wall >= cap_s else f"died (status {status})",
        "seconds": round(wall, 2)}
    if mode != "isolated":  # wait4 counts reaped children in: the isolated runner reports itself
        result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    return result


def build(folder: Path) -> None:
    """Write the bombs and a manifest (what each is, the default limits) into ``folder``."""
    from rlhf.data.pdf import PdfLimits

    manifest = {"limits": PdfLimits().__dict__, "bombs": {}}
    for name, (what, data) in bombs().items():
        (folder / f"{name}.pdf").write_bytes(data)
        manifest["bombs"][name] = {"what": what, "file_bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD", help="git revision of the 'before' extractor")
    parser.add_argument("--before-cap-s", type=float, default=150.0)
    parser.add_argument("--before-memory-gb", type=float, default=6.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/pdf_bombs.json"))
    parser.add_argument("--one", nargs=3, metavar=("MODE", "PDF", "OLD"), help=argparse.SUPPRESS)
    parser.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(parse_once(args.one[0], Path(args.one[1]), Path(args.one[2]))))
        return
    if args.build:
        build(Path(args.build))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subprocess.run([sys.executable, __file__, "--build", tmp], check=True)
        manifest = json.loads((folder / "manifest.json").read_text())
        old = folder / "pdf_before.py"
        old.write_bytes(subprocess.run(["git", "show", f"{args.rev}:rlhf/data/pdf.py"], cwd=ROOT,
                                       check=True, capture_output=True).stdout)
        for name, row in manifest["bombs"].items():
            for mode in MODES:
                cap = args.before_cap_s if mode == "before" else 600.0
                row[mode] = measure(mode, folder / f"{name}.pdf", old, cap, args.before_memory_gb)
                print(name, mode, row[mode], flush=True)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(),
               "pdfminer.six": _pdfminer_version(), "before_rev": args.rev,
               "before_cap_s": args.before_cap_s, "before_memory_gb": args.before_memory_gb}
    report = {"machine": machine, **manifest}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def _pdfminer_version() -> str:
    """From the package metadata: importing pdfminer here would raise this process's RSS."""
    from importlib.metadata import version

    return version("pdfminer.six")

if __name__ == "__main__":
    main()
