"""What the HTTP ingress and the policy replicas pass each other: requests, summaries, the pair
selection, and which registry version answers. Torch-free, so the ingress replica (and a job
driver that only deploys) starts without importing torch or transformers."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.registry import PolicyRegistry

BASE_VERSION = "base"  # the configured policy, served while the registry is empty


def servable_versions(registry: PolicyRegistry) -> list[str]:
    """Every version that can be served, oldest first (the base policy while the registry is empty)."""
    return registry.versions() or [BASE_VERSION]


def registry_current(registry: PolicyRegistry) -> str:
    """The registry's current version (``PolicyRegistry.current``: newest, or rolled back to)."""
    current = registry.current()
    return current.name if current is not None else BASE_VERSION


@dataclass(frozen=True)
class Sampling:
    """A sampled request's own settings (the OpenAI-compatible routes); None: ``serve.temperature``
    / ``serve.top_p``. A request with a seed is generated in a call of its own under that seed, so
    the same request writes the same text whatever else the replica is batching."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class SummaryRequest:
    """One summary to write: which version, greedy or sampled (and how), how long."""

    text: str
    version: str
    sample: bool
    max_new_tokens: int
    sampling: Sampling | None = None  # only read when ``sample``


@dataclass(frozen=True)
class Summary:
    text: str
    version: str
    truncated: bool  # the document was cut to the model's input window
    prompt_tokens: int = 0  # the model's input, after the cut
    completion_tokens: int = 0  # the summary re-encoded by the policy's tokenizer (eos not counted)
    at_length_limit: bool = False  # stopped at max_new_tokens (or the model's positions), not at eos


@dataclass(frozen=True)
class Selection:
    """Which of the candidate pairs was shown, and the reward scores (r_0, r_1) that chose it."""

    reward_version: str
    pairs: tuple[tuple[str, str], ...]
    scores: tuple[tuple[float, float], ...]
    chosen: int
