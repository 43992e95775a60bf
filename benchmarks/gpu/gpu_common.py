"""What every GPU benchmark reports: the card and versions, peak memory, and the matmul peak."""

from __future__ import annotations

import json
import platform
import resource
import time
from importlib import metadata
from pathlib import Path

import torch

GIB = 2**30


def device_report() -> dict[str, str]:
    """The card (or CPU) and the library versions a number was measured with."""
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    report = {"device": card, "torch": torch.__version__, "cuda": torch.version.cuda or "-"}
    for package in ("transformers", "deepspeed", "ray"):
        try:
            report[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            report[package] = "-"
    return report


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset; on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def bf16_matmul_peak(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """Measured FLOP/s of square matmuls: bf16 on GPU, fp32 (n/8) on CPU. The MFU denominator."""
    if device.type != "cuda":
        n, dtype = n // 8, torch.float32
    else:
        dtype = torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def emit(result: dict, out: Path | None) -> None:
    """Print the result as one JSON line and append it to ``out`` (runs accumulate in one file)."""
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(line + "\n")
