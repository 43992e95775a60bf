"""Resident memory of the serving process holding N policy versions: LoRA adapters on one base
(each a named PEFT adapter, issue 17) against N full models of the same size.

The base is a random-weight GPT-2 small by default (``--arch``, from
``benchmarks/architectures.py``: 124M parameters, 0.5 GB fp32). Each adapter version is a LoRA of
rank ``--rank`` on it (PEFT's GPT-2 default, ``c_attn``) with random updates; each full version
is that adapter merged into a copy of the base (what ``lora.publish=merged`` publishes), so both
columns serve the same models. Every point runs in a fresh process: ``PolicyVersions`` (what a
Serve replica holds) loads the N versions, then answers one batch with one greedy request per
version (one ``generate`` call for the adapters, N for the full models). RSS is measured after
the imports, after loading and after that batch. The batch is the number that counts: safetensors
weights are mapped lazily, so only a forward pass makes every weight resident. The summaries'
digest shows whether the adapters on one base write what the merged models write.

    python benchmarks/serve_memory.py [--versions 1 2 4] [--rank 16] [--new-tokens 16] [--arch gpt2-125m]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from architectures import ARCHITECTURES, save_random  # noqa: E402

TEXT = ("The city council voted on Tuesday to extend the bike lane network across the river, after a "
        "year of debate about parking and safety near the schools. Version {version}.")
KINDS = ("adapter", "full")


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure(registry: Path, base: Path, new_tokens: int) -> dict:
    """Every version of ``registry`` loaded in this process, then one batch with a request for each."""
    import torch

    from rlhf.config.sections import ModelConfig
    from rlhf.serve.config import ServingConfig
    from rlhf.serve.policy_versions import PolicyVersions
    from rlhf.serve.records import SummaryRequest

    imported = _rss_mib()
    start = time.perf_counter()
    cfg = ModelConfig(name_or_path=str(base), max_source_length=256, max_target_length=new_tokens)
    names = sorted(p.name for p in registry.iterdir())
    versions = PolicyVersions(registry, cfg, ServingConfig(), torch.device("cpu"), cache_size=len(names))
    models = {id(versions.get(name).policy.model) for name in names}
    loaded, load_s = _rss_mib(), time.perf_counter() - start
    start = time.perf_counter()
    batch = [SummaryRequest(TEXT.format(version=name), name, False, new_tokens) for name in names]
    summaries = json.dumps([s.text for s in versions.generate(batch)])
    batch_s = time.perf_counter() - start
    served = _rss_mib()
    return {"versions": len(names), "models_in_memory": len(models),
            "rss_imported_mib": round(imported), "rss_loaded_mib": round(loaded),
            "rss_served_mib": round(served), "added_by_versions_mib": round(served - imported),
            "load_s": round(load_s, 2), "batch_s": round(batch_s, 2),
            "summaries_sha256": hashlib.sha256(summaries.encode()).hexdigest()[:16]}


def prepare(workdir: Path, arch: str, count: int, rank: int) -> tuple[Path, list[Path], list[Path]]:
    """The base folder and ``count`` adapter folders on it with their merged (full) twins."""
    import torch

    from rlhf.config.sections import LoraConfig, ModelConfig
    from rlhf.models import load_policy

    base, parameters = save_random(arch, workdir)
    print(f"base {arch}: {parameters / 1e6:.1f}M parameters in {base}", flush=True)
    policy = load_policy(ModelConfig(name_or_path=str(base)), lora=LoraConfig(r=rank))
    adapters, merged = [], []
    for seed in range(1, count + 1):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in policy.model.named_parameters():
                if "lora_B" in name:  # B = 0 at the start: a trained adapter's update is not
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        adapters.append(workdir / "adapters" / f"a{seed}")
        merged.append(workdir / "merged" / f"m{seed}")
        policy.save_adapter(adapters[-1])
        policy.save(merged[-1])  # an adapted policy saves merged: a full model
        print(f"adapter and merged version {seed} of {count} saved", flush=True)
    return base, adapters, merged


def registry_of(workdir: Path, kind: str, folders: list[Path]) -> Path:
    """A registry whose versions v0001.. are links to ``folders`` (no copies of 0.5 GB models)."""
    registry = workdir / f"registry-{kind}-{len(folders)}"
    registry.mkdir()
    for number, folder in enumerate(folders, 1):
        (registry / f"v{number:04d}").symlink_to(folder, target_is_directory=True)
    return registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, nargs="+", default=[1, 2, 4], help="versions held at once")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the adapter versions")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens each request generates")
    parser.add_argument("--arch", default="gpt2-125m", choices=sorted(ARCHITECTURES), help="the base's size")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_memory.json")
    parser.add_argument("--point", nargs=2, help=argparse.SUPPRESS)  # registry, base (child)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure(Path(args.point[0]), Path(args.point[1]), args.new_tokens)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlhf-serve-memory-") as folder:
        workdir = Path(folder)
        base, adapters, merged = prepare(workdir, args.arch, max(args.versions), args.rank)
        for count in args.versions:
            for kind, folders in zip(KINDS, (adapters, merged)):
                registry = registry_of(workdir, kind, folders[:count])
                done = subprocess.run([sys.executable, __file__, "--point", str(registry), str(base),
                                       "--new-tokens", str(args.new_tokens)],
                                      capture_output=True, text=True, check=True)
                rows.append({"kind": kind, **json.loads(done.stdout.strip().splitlines()[-1])})
                print(json.dumps(rows[-1]), flush=True)
    report = {"machine": f"{platform.node()} {os.cpu_count()} CPUs", "arch": args.arch, "rank": args.rank,
              "new_tokens": args.new_tokens, "loadavg_end": os.getloadavg(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| versions | adapters on one base: RSS after a batch (added) | full models: RSS (added) |")
    print("|---|---|---|")
    by_point = {(r["kind"], r["versions"]): r for r in rows}
    for count in args.versions:
        cells = [by_point[kind, count] for kind in KINDS]
        print(f"| {count} | " + " | ".join(f"{c['rss_served_mib']} MiB ({c['added_by_versions_mib']})"
                                           for c in cells) + " |")
    for count in args.versions:
        same = by_point["adapter", count]["summaries_sha256"] == by_point["full", count]["summaries_sha256"]
        print(f"{count} version(s): adapters and merged models wrote the same summaries: {same}")


if __name__ == "__main__":
    main()
