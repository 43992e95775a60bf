"""Policy versions as the server sees them: the registry's newest is current, older ones on demand.

Ray-free so the version logic (which version is current, which pair a comparison shows, how a
batch of mixed requests is generated) is tested without starting Serve.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections import OrderedDict
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch

from rlhf.config.sections import ModelConfig
from rlhf.models.policy import Policy, inference_dtype, load_policy
from rlhf.registry import METRICS_FILE, PolicyRegistry
from rlhf.serve.config import ServingConfig

logger = logging.getLogger(__name__)

BASE_VERSION = "base"  # the configured policy, served while the registry is empty


@dataclass(frozen=True)
class SummaryRequest:
    """One summary to write: which version, greedy or sampled, how long."""

    text: str
    version: str
    sample: bool
    max_new_tokens: int


@dataclass(frozen=True)
class Summary:
    text: str
    version: str
    truncated: bool  # the document was cut to the model's input window


class PolicyVersions:
    """Loaded policies by version name, at most ``cache_size`` at once (the current one stays).

    ``refresh`` loads a newly published version BEFORE making it current, and requests hold a
    reference to the Policy they started with, so a switch never fails a request in flight.
    """

    def __init__(
        self, registry: str | Path, base: ModelConfig, serving: ServingConfig, device: torch.device,
        cache_size: int = 3,
    ):
        self.registry = PolicyRegistry(registry)
        self.base = base
        self.serving = serving
        self.device = device
        self.cache_size = cache_size
        self._loaded: OrderedDict[str, Policy] = OrderedDict()
        self._lock = threading.Lock()  # guards _loaded and current across the reload and request threads
        # One load at a time: transformers builds models on the meta device through process-wide
        # state, and two threads loading at once get meta tensors ("Cannot copy out of meta tensor").
        self._load_lock = threading.Lock()
        self.current = self._newest()
        self.get(self.current)

    def _newest(self) -> str:
        versions = self.registry.versions()
        return versions[-1] if versions else BASE_VERSION

    def known(self) -> list[str]:
        """Every version that can be served, oldest first."""
        return self.registry.versions() or [BASE_VERSION]

    def refresh(self) -> bool:
        """Switch to the registry's newest version if it changed; True when it did."""
        newest = self._newest()
        if newest == self.current:
            return False
        self.get(newest)  # load first: requests keep using the old version meanwhile
        with self._lock:
            previous, self.current = self.current, newest
        logger.info("serving policy %s (was %s)", newest, previous)
        return True

    def get(self, version: str) -> Policy:
        """The policy of ``version``, loading it if needed (the least recently used one is dropped)."""
        cached = self._cached(version)
        if cached is not None:
            return cached
        with self._load_lock:
            cached = self._cached(version)  # loaded by another thread while this one waited
            if cached is not None:
                return cached
            policy = self._load(version)
            with self._lock:
                self._loaded[version] = policy
                while len(self._loaded) > self.cache_size:
                    oldest = next(v for v in self._loaded if v != self.current)
                    del self._loaded[oldest]
        return policy

    def _cached(self, version: str) -> Policy | None:
        with self._lock:
            if version in self._loaded:
                self._loaded.move_to_end(version)
                return self._loaded[version]
        return None

    def _load(self, version: str) -> Policy:
        if version == BASE_VERSION:
            cfg = self.base
        elif version in self.registry.versions():
            cfg = ModelConfig(**{**vars(self.base), "name_or_path": str(self.registry.root / version)})
        else:
            raise KeyError(version)
        policy = load_policy(cfg, dtype=inference_dtype(self.device))
        policy.model.to(self.device).eval()
        return policy

    def metrics(self, version: str) -> dict:
        """The metrics PPO published with ``version`` (empty for the base policy)."""
        path = self.registry.root / version / METRICS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def comparison_pair(self, rng: random.Random) -> tuple[str, str]:
        """(current, other) versions for /v1/compare under the configured strategy."""
        current = self.current
        earlier = [v for v in self.known() if v != current]
        strategy = self.serving.compare_strategy
        if strategy == "samples" or not earlier:
            return current, current
        return current, earlier[-1] if strategy == "previous" else rng.choice(earlier)

    def generate(self, requests: list[SummaryRequest]) -> list[Summary]:
        """Summaries for a batch of requests, one ``generate`` call per (version, sampling, length)
        group, in the order of ``requests``."""
        results: list[Summary | None] = [None] * len(requests)

        def key(i: int) -> tuple[str, bool, int]:
            return requests[i].version, requests[i].sample, requests[i].max_new_tokens

        for (version, sample, max_new_tokens), group in groupby(sorted(range(len(requests)), key=key), key):
            indices = list(group)
            texts = [requests[i].text for i in indices]
            policy = self.get(version)
            sampling = {"do_sample": True, "temperature": self.serving.temperature,
                        "top_p": self.serving.top_p}
            outputs = policy.generate(texts, max_new_tokens=max_new_tokens,
                                      **(sampling if sample else {"do_sample": False}))
            for i, output, cut in zip(indices, outputs, policy.truncated(texts)):
                results[i] = Summary(output, version, cut)
        return results
