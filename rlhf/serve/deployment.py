"""The policy deployment: a thin Ray Serve wrapper that batches requests into PolicyVersions.

torch and the models load in the replica's constructor, not at import: the driver that deploys
the app (``jobs/serve.py``, which then waits for as long as the app serves) stays without them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from typing import TYPE_CHECKING

from ray import serve

from rlhf.runtime import compute_device, set_torch_threads
from rlhf.serve.config import ServeConfig
from rlhf.serve.records import Sampling, Summary, SummaryRequest

if TYPE_CHECKING:
    from rlhf.serve.policy_versions import BatchSizes

logger = logging.getLogger(__name__)

# Resamples when a comparison would show an empty summary or the same text twice.
DISTINCT_ATTEMPTS = 3


@serve.deployment
class PolicyDeployment:
    """Generates summaries; watches the registry and switches to a newly published version."""

    def __init__(self, cfg: ServeConfig):
        import torch

        from rlhf.serve.policy_versions import PolicyVersions

        serving = cfg.serve
        set_torch_threads(serving.cpus_per_replica, serving.threads_per_replica)
        torch.manual_seed(cfg.seed)
        device = compute_device(serving.gpus_per_replica)
        self.versions = PolicyVersions(cfg.registry, cfg.policy, serving, device)
        self.max_new_tokens = serving.max_new_tokens
        self.rng = random.Random(cfg.seed)
        # setters that @serve.batch adds
        self._generate_batch.set_max_batch_size(serving.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(serving.batch_wait_timeout_s)
        watcher = threading.Thread(target=self._watch, args=(serving.reload_interval_s,), daemon=True)
        watcher.start()
        logger.info("policy replica serving %s on %s", self.versions.current, device)

    def _watch(self, interval_s: float) -> None:
        """Poll the registry (a daemon thread: it ends with the replica); a broken new version is
        logged and retried, never served half-loaded."""
        while True:
            time.sleep(interval_s)
            try:
                self.versions.refresh()
            except Exception:  # noqa: BLE001 - keep serving the current version
                logger.exception("could not load the current policy version; still serving %s",
                                 self.versions.current)

    @serve.batch
    async def _generate_batch(self, requests: list[SummaryRequest]) -> list[Summary | Exception]:
        # Off the event loop, so health checks and queued requests are answered while generating.
        return await asyncio.to_thread(self.versions.generate, requests)

    async def _generate(self, request: SummaryRequest) -> Summary:
        """One request through the batch; its own failure raises here, never in its batch mates."""
        result = await self._generate_batch(request)
        if isinstance(result, Exception):
            raise result
        return result

    def _request(
        self, text: str, version: str, sample: bool, max_new_tokens: int | None,
        sampling: Sampling | None = None,
    ) -> SummaryRequest:
        """A request at most ``serve.max_new_tokens`` long (the model may cut it further: Policy.generate)."""
        length = min(max_new_tokens or self.max_new_tokens, self.max_new_tokens)
        return SummaryRequest(text, version, sample, length, sampling)

    async def summarize(self, text: str, max_new_tokens: int | None = None) -> Summary:
        """A greedy summary by the current version."""
        return await self._generate(self._request(text, self.versions.current, False, max_new_tokens))

    async def complete(
        self, text: str, version: str, max_new_tokens: int | None, sampling: Sampling | None
    ) -> Summary:
        """One choice of an OpenAI-compatible request (``rlhf.serve.openai_routes``): ``version`` by
        name (the ingress checked it is servable), sampled with ``sampling``, greedy without it."""
        request = self._request(text, version, sampling is not None, max_new_tokens, sampling)
        return await self._generate(request)

    async def compare(self, text: str, max_new_tokens: int | None = None) -> tuple[Summary, Summary]:
        """(current version's summary, the other one) under the configured strategy, both sampled:
        the policies are judged on the distribution PPO trains, and the same text asked again gets
        a new pair. A half that came out empty, or the same as the other, is resampled from the
        current version: a person cannot choose between them and the store refuses them."""
        current, other = self.versions.comparison_pair(self.rng)
        pair = list(await asyncio.gather(
            self._generate(self._request(text, current, True, max_new_tokens)),
            self._generate(self._request(text, other, True, max_new_tokens)),
        ))
        for _ in range(DISTINCT_ATTEMPTS):
            unusable = [i for i, s in enumerate(pair) if not s.text.strip()]
            if pair[0].text == pair[1].text:
                unusable.append(1)
            if not unusable:
                break
            resampled = self._request(text, current, True, max_new_tokens)
            pair[unusable[0]] = await self._generate(resampled)
        return pair[0], pair[1]

    def policy_info(self) -> dict:
        """The fields of the API's PolicyInfo: current version, all versions, current's metrics."""
        current = self.versions.current
        return {"version": current, "versions": self.versions.known(),
                "metrics": self.versions.metrics(current)}

    def batch_sizes(self) -> BatchSizes:
        """This replica's batches so far, by size (``PolicyVersions.batch_sizes``)."""
        return self.versions.batch_sizes

    def reload(self) -> dict:
        """Switch to the registry's current version now instead of at the next poll."""
        self.versions.refresh()
        return self.policy_info()
