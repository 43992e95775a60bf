"""The reward model behind ``serve.pair_selection=uncertain``: the reward registry's current
version (the online loop publishes each kept update there), loaded once and reloaded when the
registry's CURRENT moves. Ray-free, so the ingress and a test use it alike."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from rlhf.config.sections import ModelConfig
from rlhf.models import RewardModel, load_reward_model
from rlhf.registry import PolicyRegistry
from rlhf.serve.records import Selection
from rlhf.serve.selection import least_certain

logger = logging.getLogger(__name__)


class CurrentRewardModel:
    """Scores candidate pairs with the registry's current reward model; ``lengths`` gives the
    input windows (the served policy's: the reward model reads the same documents and summaries)."""

    def __init__(self, registry: str | Path, lengths: ModelConfig):
        self.registry = PolicyRegistry(registry)
        self.lengths = lengths
        self.version: str | None = None
        self.model: RewardModel | None = None
        self._lock = threading.Lock()  # one load or scoring pass at a time (requests run in threads)

    def refresh(self) -> bool:
        """Load the registry's current version if it changed; False while the registry is empty."""
        current = self.registry.current()
        if current is None:
            return False
        with self._lock:
            if current.name != self.version:
                cfg = ModelConfig(**{**vars(self.lengths), "name_or_path": str(current)})
                self.model = load_reward_model(cfg, dropout=False)
                logger.info("pair selection scores with reward model %s (was %s)", current.name, self.version)
                self.version = current.name
        return True

    def select(self, document: str, pairs: Sequence[tuple[str, str]]) -> Selection:
        """The pair of ``document``'s candidates the model is least sure about (``refresh`` first)."""
        with self._lock:
            if self.model is None or self.version is None:
                raise RuntimeError("no reward model loaded: call refresh() and check that it returned True")
            summaries = [summary for pair in pairs for summary in pair]
            flat = self.model.score([document] * len(summaries), summaries).tolist()  # (2k,)
            version = self.version
        scores = tuple(zip(flat[0::2], flat[1::2]))
        return Selection(version, tuple(pairs), scores, least_certain(scores))
