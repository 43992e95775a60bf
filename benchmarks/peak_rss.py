"""Run a command and report the peak memory of its whole process tree (Ray's raylet and actors are
children of a local driver), which ``/usr/bin/time`` cannot see: it reports the driver alone.

    python benchmarks/peak_rss.py --out runs/sft_rss.json -- \\
        python jobs/sft.py --config configs/sft_smollm.yaml

Samples every --interval seconds: the largest sum of RSS over the tree (an upper bound: pages shared
between processes count once per process) and the largest single process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil


def tree_rss(root: psutil.Process) -> tuple[int, int, str]:
    """(sum of RSS over ``root`` and its descendants, the largest one, its name) in bytes."""
    total, largest, name = 0, 0, ""
    for process in [root, *root.children(recursive=True)]:
        try:
            rss = process.memory_info().rss
            label = " ".join(process.cmdline()[:2])[-60:]
        except psutil.Error:  # ended between the listing and the read
            continue
        total += rss
        if rss > largest:
            largest, name = rss, label
    return total, largest, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = time.time()
    child = subprocess.Popen(command)
    root = psutil.Process(child.pid)
    peak_total, peak_single, peak_name = 0, 0, ""
    while child.poll() is None:
        total, largest, name = tree_rss(root)
        peak_total = max(peak_total, total)
        if largest > peak_single:
            peak_single, peak_name = largest, name
        time.sleep(args.interval)
    report = {"command": command, "returncode": child.returncode, "wall_s": round(time.time() - start, 1),
              "peak_tree_rss_gib": round(peak_total / 2**30, 2),
              "peak_process_rss_gib": round(peak_single / 2**30, 2), "peak_process": peak_name}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report), file=sys.stderr)
    raise SystemExit(child.returncode)


if __name__ == "__main__":
    main()
