"""Policy versions as the server sees them: the registry's current one (its newest unless rolled
back) answers, the others are loaded on demand.

A version is a full model or a LoRA adapter folder (``lora.publish=adapter``). Adapter versions
of one base share that base in memory, each a named PEFT adapter on it, and requests for several
of them (and for the base) are generated in one call with PEFT's mixed-adapter batches.

Ray-free so the version logic (which version is current, which pair a comparison shows, how a
batch of mixed requests is generated) is tested without starting Serve.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import torch

from rlhf.config.sections import ModelConfig
from rlhf.models.encoding import new_token_room
from rlhf.models.lora import (
    AdaptedModel,
    adapter_base,
    adapters_for_rows,
    attach_saved_adapter,
    base_fingerprint,
    is_adapter_folder,
    mixes_adapters,
    recorded_base_fingerprint,
    remove_adapter,
)
from rlhf.models.policy import Policy, inference_dtype, load_policy
from rlhf.registry import METRICS_FILE, PolicyRegistry
from rlhf.serve.config import ServingConfig
from rlhf.serve.records import (
    BASE_VERSION,
    Sampling,
    Summary,
    SummaryRequest,
    registry_current,
    servable_versions,
)

logger = logging.getLogger(__name__)

@dataclass
class BatchSizes:
    """The batches a replica formed, counted by size: requests per ``generate`` batch (what
    ``serve.max_batch_size`` bounds) and rows per model call (a batch splits by model, sampling and
    length: a compare's two versions are two calls unless they are adapters of one base). Tells an
    operator whether batching pays: a replica whose calls stay near 1 row serves one at a time."""

    requests: Counter[int] = field(default_factory=Counter)
    rows: Counter[int] = field(default_factory=Counter)

    def mean_rows(self) -> float:
        """Rows per model call, on average (0 before the first call)."""
        calls = sum(self.rows.values())
        return sum(size * n for size, n in self.rows.items()) / calls if calls else 0.0


@dataclass(eq=False)
class Backbone:
    """One model in memory: a full version, or the base that adapter versions are attached to.

    ``lock`` is held while it generates and while an adapter is added or removed, so a reload or
    an eviction never changes its layers under a running ``generate``.
    """

    policy: Policy  # its ``model`` is a PeftModel while adapters are attached
    fingerprint: str  # ``base_fingerprint`` of the folder or preset it was loaded from
    users: set[str] = field(default_factory=set)  # versions served on it
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True, eq=False)
class LoadedVersion:
    """A version ready to generate: the model it runs on and, for an adapter version, its adapter."""

    backbone: Backbone
    adapter: str | None  # the PEFT adapter's name (the version's); None: the backbone's own weights

    @property
    def policy(self) -> Policy:
        return self.backbone.policy


class PolicyVersions:
    """Loaded versions by name, at most ``cache_size`` at once (the current one stays).

    ``refresh`` loads a newly published version BEFORE making it current, and ``generate`` pins
    the versions it uses (an eviction skips them), so a switch never fails a request in flight.
    Each base is loaded once (``Backbone``, found by its fingerprint); evicting an adapter version
    removes its adapter, and a base leaves memory with the last version using it.
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
        self._loaded: OrderedDict[str, LoadedVersion] = OrderedDict()
        self._pins: Counter[str] = Counter()  # versions a running generate uses: never evicted
        self._lock = threading.Lock()  # _loaded, _pins and current, across the reload and request threads
        # One load at a time: transformers builds models on the meta device through process-wide
        # state, and two threads loading at once get meta tensors ("Cannot copy out of meta tensor").
        # Loads and evictions (under it) are also all that change _backbones and their users.
        self._load_lock = threading.Lock()
        self._backbones: dict[str, Backbone] = {}  # by fingerprint: each base once
        self.batch_sizes = BatchSizes()
        self.current = registry_current(self.registry)
        self.get(self.current)

    def known(self) -> list[str]:
        """Every version that can be served, oldest first."""
        return servable_versions(self.registry)

    def refresh(self) -> bool:
        """Switch to the registry's current version if it changed; True when it did."""
        wanted = registry_current(self.registry)
        if wanted == self.current:
            return False
        self.get(wanted)  # load first: requests keep using the old version meanwhile
        with self._lock:
            previous, self.current = self.current, wanted
        logger.info("serving policy %s (was %s)", wanted, previous)
        return True

    def get(self, version: str, pin: bool = False) -> LoadedVersion:
        """``version`` loaded, loading it if needed (the least recently used ones are dropped);
        ``pin`` keeps it loaded until it is unpinned (``_pinned``)."""
        cached = self._cached(version, pin)
        if cached is not None:
            return cached
        with self._load_lock:
            cached = self._cached(version, pin)  # loaded by another thread while this one waited
            if cached is not None:
                return cached
            loaded = self._load(version)
            with self._lock:
                self._loaded[version] = loaded
                self._pins[version] += pin
                evicted = self._over_capacity()
            for name, old in evicted:
                self._drop(name, old)
        return loaded

    def _cached(self, version: str, pin: bool) -> LoadedVersion | None:
        with self._lock:
            if version in self._loaded:
                self._loaded.move_to_end(version)
                self._pins[version] += pin
                return self._loaded[version]
        return None

    @contextmanager
    def _pinned(self, versions: set[str]) -> Iterator[dict[str, LoadedVersion]]:
        """``versions`` loaded and kept (their adapters stay on their base) until the block ends."""
        loaded: dict[str, LoadedVersion] = {}
        try:
            for version in sorted(versions):
                loaded[version] = self.get(version, pin=True)
            yield loaded
        finally:
            with self._lock:
                self._pins.subtract(loaded.keys())

    def _over_capacity(self) -> list[tuple[str, LoadedVersion]]:
        """Take the least recently used versions beyond ``cache_size`` out of the cache; never the
        current one nor one in use (the cache stays larger until they are free). Holds ``_lock``."""
        idle = [v for v in self._loaded if v != self.current and not self._pins[v]]
        return [(v, self._loaded.pop(v)) for v in idle[:max(0, len(self._loaded) - self.cache_size)]]

    def _drop(self, version: str, loaded: LoadedVersion) -> None:
        """Forget an evicted version: its adapter leaves the base; a model no version uses leaves memory."""
        backbone = loaded.backbone
        backbone.users.discard(version)
        if not backbone.users:
            del self._backbones[backbone.fingerprint]
        elif loaded.adapter is not None:
            with backbone.lock:
                model = backbone.policy.model
                assert isinstance(model, AdaptedModel)  # _load attached this version's adapter to it
                backbone.policy.model = remove_adapter(model, loaded.adapter)

    def _load(self, version: str) -> LoadedVersion:
        """An adapter version as a named adapter on its base (loaded once), else a full model."""
        if version == BASE_VERSION:
            source = self.base.name_or_path
        elif version in self.registry.versions():
            source = str(self.registry.root / version)
        else:
            raise KeyError(version)
        if not is_adapter_folder(source):
            backbone, adapter = self._backbone(base_fingerprint(source), source), None
        else:
            backbone, adapter = self._base_of(source), version
            with backbone.lock:
                backbone.policy.model = attach_saved_adapter(backbone.policy.model, source, version)
        backbone.users.add(version)
        return LoadedVersion(backbone, adapter)

    def _base_of(self, folder: str) -> Backbone:
        """The base of an adapter folder: the loaded one with the fingerprint it records, else
        loaded now (``adapter_base`` refuses a base whose weights changed since the adapter was saved)."""
        recorded = recorded_base_fingerprint(folder)
        if recorded in self._backbones:
            return self._backbones[recorded]
        name = adapter_base(folder)
        return self._backbone(recorded or base_fingerprint(name), name)

    def _backbone(self, fingerprint: str, name_or_path: str) -> Backbone:
        """The model with ``fingerprint``, loaded from ``name_or_path`` unless it is in memory."""
        if fingerprint not in self._backbones:
            cfg = ModelConfig(**{**vars(self.base), "name_or_path": name_or_path})
            policy = load_policy(cfg, dtype=inference_dtype(self.device))
            policy.model.to(self.device).eval()
            self._backbones[fingerprint] = Backbone(policy, fingerprint)
        return self._backbones[fingerprint]

    def metrics(self, version: str) -> dict:
        """The metrics PPO published with ``version`` (empty for the base policy)."""
        path = self.registry.root / version / METRICS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def comparison_pair(self, rng: random.Random) -> tuple[str, str]:
        """(current, other) versions for /v1/compare under the configured strategy. Only versions
        older than the current one count as earlier: after a rollback, the versions it rolled back
        from are not shown again."""
        current = self.current
        known = self.known()
        earlier = known[:known.index(current)] if current in known else []
        strategy = self.serving.compare_strategy
        if strategy == "samples" or not earlier:
            return current, current
        return current, earlier[-1] if strategy == "previous" else rng.choice(earlier)

    def generate(self, requests: list[SummaryRequest]) -> list[Summary | Exception]:
        """Summaries for a batch of requests, in the order of ``requests``: one ``generate`` call
        per (model, sampling, length) group, so adapter versions of one base and the base itself
        share a call, each row with its own adapter (PEFT's mixed-adapter batch; one call per
        version for a family that cannot mix them, see ``mixes_adapters``). A request that fails
        gets its exception in its place; the others in its batch still get their summaries."""
        results: dict[int, Summary | Exception] = {}
        self.batch_sizes.requests[len(requests)] += 1
        with self._pinned({r.version for r in requests}) as loaded:
            def key(i: int) -> tuple[int, str, bool, int, float, float, int]:
                request, backbone = requests[i], loaded[requests[i].version].backbone
                own_call = "" if mixes_adapters(backbone.policy.model) else request.version
                temperature, top_p, seed = self._sampling(request)
                alone = i if seed is not None else -1  # a seeded request's draws depend on no other row
                return (id(backbone), own_call, request.sample, request.max_new_tokens, temperature, top_p,
                        alone)

            for _, group in groupby(sorted(range(len(requests)), key=key), key):
                indices = list(group)
                self.batch_sizes.rows[len(indices)] += 1
                rows = [(requests[i], loaded[requests[i].version]) for i in indices]
                for i, summary in zip(indices, self._generate_isolated(rows)):
                    results[i] = summary
        return [results[i] for i in range(len(requests))]

    def _sampling(self, request: SummaryRequest) -> tuple[float, float, int | None]:
        """(temperature, top_p, seed) of a sampled request, the config filling what it leaves out;
        zeros for a greedy one."""
        if not request.sample:
            return 0.0, 0.0, None
        own = request.sampling or Sampling()
        temperature = self.serving.temperature if own.temperature is None else own.temperature
        return temperature, self.serving.top_p if own.top_p is None else own.top_p, own.seed

    def _generate_isolated(
        self, rows: list[tuple[SummaryRequest, LoadedVersion]]
    ) -> Sequence[Summary | Exception]:
        """``_generate_rows``; when the call fails, each row again on its own, so one bad request
        fails alone."""
        try:
            return self._generate_rows(rows)
        except Exception as exc:  # noqa: BLE001 - returned to the request that caused it
            if len(rows) == 1:
                logger.warning("a summary request failed: %s: %s", type(exc).__name__, exc)
                return [exc]
        return [result for row in rows for result in self._generate_isolated([row])]

    def _generate_rows(self, rows: list[tuple[SummaryRequest, LoadedVersion]]) -> list[Summary]:
        """One ``generate`` call for requests on one backbone with the same sampling and length."""
        first, backbone = rows[0][0], rows[0][1].backbone
        texts = [request.text for request, _ in rows]
        temperature, top_p, seed = self._sampling(first)
        options = ({"do_sample": True, "temperature": temperature, "top_p": top_p}
                   if first.sample else {"do_sample": False})
        with backbone.lock, _seeded(seed, self.device):
            policy = backbone.policy
            with adapters_for_rows(policy.model, [loaded.adapter for _, loaded in rows]) as adapters:
                outputs = policy.generate(texts, max_new_tokens=first.max_new_tokens, **options, **adapters)
        # A byte-level model can write NUL, which no database stores as text (the store refuses it):
        # what people are shown and what is stored is the summary without it.
        outputs = [output.replace("\x00", "") for output in outputs]
        prompt_tokens, completion_tokens = _token_counts(policy, texts, outputs)
        room = new_token_room(policy.model.config, policy.limits)
        limit = first.max_new_tokens if room is None else min(first.max_new_tokens, room)
        return [Summary(output, request.version, cut, prompt, completion, completion >= limit)
                for (request, _), output, cut, prompt, completion
                in zip(rows, outputs, policy.truncated(texts), prompt_tokens, completion_tokens)]


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """torch's generator seeded with ``seed`` for the block and restored after it (transformers'
    ``generate`` takes no generator of its own), so the unseeded requests' stream goes on as if
    the seeded call had not run; nothing without a seed."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _token_counts(policy: Policy, texts: list[str], outputs: list[str]) -> tuple[list[int], list[int]]:
    """(input tokens the model read, summary tokens) per row: the OpenAI routes' ``usage``. The
    summary is re-encoded (``Policy.generate`` returns text), which gives the generated count for
    byte-level and almost always for BPE tokenizers."""
    prompts = policy.encode_documents(texts)["attention_mask"].sum(dim=1).tolist()
    encoded = policy.tokenizer(outputs, add_special_tokens=False, verbose=False)["input_ids"]
    return prompts, [len(ids) for ids in encoded]
