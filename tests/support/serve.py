"""Shared by the serving tests: a registry of tiny published policies and a running Serve app."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import torch

from rlhf.config.core import load_config
from rlhf.config.sections import LoraConfig, ModelConfig
from rlhf.models.policy import Policy, load_policy
from rlhf.models.tiny import build_tiny_lm
from rlhf.models.tokenizer import load_tokenizer
from rlhf.registry import PolicyRegistry
from rlhf.runtime import free_port
from rlhf.serve.config import ServeConfig

PRESET = "tiny-t5"


def publish_tiny(registry: Path, seed: int, preset: str = PRESET) -> Path:
    """Publish a tiny policy (tiny-t5 unless ``preset``) with weights from ``seed`` as the registry's
    next version.

    Random tiny weights mostly write eos or non-ASCII bytes at once (which decode to ""); the saved
    generation config suppresses both, so every version writes visible, distinct summaries.
    """
    model = build_tiny_lm(preset, seed)
    tokenizer = load_tokenizer(preset)
    printable = {tokenizer.convert_tokens_to_ids(chr(b)) for b in range(32, 127)}
    hidden = [i for i in range(model.config.vocab_size) if i not in printable]
    model.generation_config.suppress_tokens = hidden
    policy = Policy(model, tokenizer, 256, 32)
    return PolicyRegistry(registry).publish(policy.save, {"iteration": seed, "reward_mean": float(seed)})


def publish_tiny_adapter(registry: Path, base: Path | str, seed: int) -> Path:
    """Publish a LoRA adapter on the policy ``base`` (folder or preset) as the registry's next
    version (an adapter folder naming its base), its updates drawn from ``seed`` so each version
    writes its own text."""
    policy = load_policy(ModelConfig(name_or_path=str(base), max_source_length=256, max_target_length=32),
                         lora=LoraConfig(r=4))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:  # B starts at 0 (no change): give the adapter a visible update
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 2.0)
    metrics = {"iteration": seed, "reward_mean": float(seed)}
    return PolicyRegistry(registry).publish(policy.save_adapter, metrics)


def serve_config(registry: Path, db: Path, *overrides: str) -> ServeConfig:
    """The tiny serving config on a free loopback port, validated like jobs/serve.py's."""
    return load_config(ServeConfig, None, [
        f"registry={registry}", f"store.url=sqlite:///{db}", f"output_dir={db.parent / 'serve'}",
        "serve.host=127.0.0.1", f"serve.port={free_port()}", "serve.max_new_tokens=24",
        "serve.max_text_bytes=20000", "serve.reload_interval_s=0.5",
        # Tests send one request at a time: nothing fills a batch, so waiting for one costs time.
        "serve.batch_wait_timeout_s=0.01", *overrides,
    ])


@contextmanager
def summarize_stream(url: str, text: str, clients: int = 4) -> Iterator[list[str]]:
    """``clients`` threads post /v1/summarize to ``url`` until the block ends; yields the versions
    that answered, in order, as they come. Fails if any request failed."""
    errors: list[str] = []
    versions: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        while not stop.is_set():
            answer = requests.post(url + "/v1/summarize", json={"text": f"{text} {n}"}, timeout=60)
            if answer.status_code != 200:
                errors.append(answer.text)
            else:
                versions.append(answer.json()["policy_version"])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield versions
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []


def wait_for_answers(answers: list[str], count: int, timeout_s: float = 60) -> None:
    """Until a ``summarize_stream``'s ``answers`` hold ``count``: requests are in flight and
    answered, however slow the machine, before the test changes what is served."""
    deadline = time.monotonic() + timeout_s
    while len(answers) < count:
        assert time.monotonic() < deadline, f"{len(answers)} of {count} answers in {timeout_s} s"
        time.sleep(0.05)


def start_with_admin(cfg: ServeConfig, admin_token: str) -> str:
    """Deploy the app of ``cfg`` with ``admin_token`` in the variable it reads (only while the driver
    builds the app); its URL."""
    from rlhf.serve.app import start_app

    with pytest.MonkeyPatch.context() as env:
        env.setenv(cfg.serve.admin_token_env, admin_token)
        return start_app(cfg)
