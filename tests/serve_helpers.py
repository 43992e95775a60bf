"""Shared by the serving tests: a registry of tiny published policies and a running Serve app."""

from __future__ import annotations

import socket
from pathlib import Path

from rlhf.config.core import load_config
from rlhf.models.policy import Policy
from rlhf.models.tiny import build_tiny_lm
from rlhf.models.tokenizer import load_tokenizer
from rlhf.registry import PolicyRegistry
from rlhf.serve.config import ServeConfig

PRESET = "tiny-t5"


def publish_tiny(registry: Path, seed: int) -> Path:
    """Publish a tiny-t5 policy with weights from ``seed`` as the registry's next version.

    Random tiny weights mostly write eos or non-ASCII bytes at once (which decode to ""); the saved
    generation config suppresses both, so every version writes visible, distinct summaries.
    """
    model = build_tiny_lm(PRESET, seed)
    tokenizer = load_tokenizer(PRESET)
    printable = {tokenizer.convert_tokens_to_ids(chr(b)) for b in range(32, 127)}
    hidden = [i for i in range(model.config.vocab_size) if i not in printable]
    model.generation_config.suppress_tokens = hidden
    policy = Policy(model, tokenizer, 256, 32)
    return PolicyRegistry(registry).publish(policy.save, {"iteration": seed, "reward_mean": float(seed)})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_config(registry: Path, db: Path, *overrides: str) -> ServeConfig:
    """The tiny serving config on a free loopback port, validated like jobs/serve.py's."""
    return load_config(ServeConfig, None, [
        f"registry={registry}", f"store.url=sqlite:///{db}", f"output_dir={db.parent / 'serve'}",
        "serve.host=127.0.0.1", f"serve.port={free_port()}", "serve.max_new_tokens=24",
        "serve.max_text_bytes=20000", "serve.reload_interval_s=0.5", *overrides,
    ])
