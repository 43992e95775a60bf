"""Config tree of jobs/serve.py: the HTTP app, policy replicas, batching and limits."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from rlhf.config.core import ConfigError, option
from rlhf.config.sections import ModelConfig, StoreConfig
from rlhf.data.pdf import PdfLimits

# What /v1/compare sets against the current policy (rlhf.serve.policy_versions.PolicyVersions.pair).
CompareStrategy = Literal["previous", "random_earlier", "samples"]
# Which fresh pair a labeling-queue request shows (rlhf.serve.api.FeedbackApi._queued).
PairSelection = Literal["random", "uncertain"]


@dataclass
class ServingConfig:
    """The Ray Serve application: HTTP, replicas, batching, limits and the comparison strategy."""

    host: str = option("127.0.0.1", "Address the HTTP proxy listens on (0.0.0.0 on a cluster head).")
    port: int = option(8000, "HTTP port.", gt=0, le=65535)
    replicas: int = option(1, "Policy replicas when autoscaling is off.", gt=0)
    autoscale: bool = option(False, "Scale policy replicas between min_replicas and max_replicas.")
    min_replicas: int = option(1, "Autoscaling lower bound.", ge=0)
    max_replicas: int = option(4, "Autoscaling upper bound.", gt=0)
    target_ongoing_requests: float = option(4.0, "Autoscaling target of queued+running requests "
                                                 "per replica.", gt=0)
    cpus_per_replica: float = option(1.0, "CPUs reserved by each policy replica.", gt=0)
    gpus_per_replica: float = option(0.0, "GPUs per policy replica (bf16 on GPU); 0 = CPU.", ge=0)
    threads_per_replica: int = option(0, "Torch threads per policy replica; 0 = its whole CPUs.", ge=0)
    max_batch_size: int = option(8, "Requests one policy replica generates for together "
                                    "(@serve.batch); 1 turns batching off.", gt=0)
    batch_wait_timeout_s: float = option(
        0.2, "How long a replica waits to fill a batch. While a replica generates, its event loop "
        "takes in the waiting requests slowly, so a short wait starts the next batch with few of "
        "them: 16 clients on GPT-2 125M at 64 tokens filled batches of 32 requests at 0.2 s, "
        "4.5 rows per model call at 0.05 s and 2 at 0.01 s (docs/benchmarks.md, serving at 125M). "
        "A lone request waits this long when traffic is low.", ge=0)
    max_new_tokens: int = option(64, "Summary length when a request does not say, and the most one "
                                     "may ask for; also cut to what the model's positions leave "
                                     "after the longest prompt.", gt=0)
    max_text_bytes: int = option(200_000, "Hard limit on a text's UTF-8 size (413 above it); "
                                          "shorter texts that exceed the model's window are cut "
                                          "and flagged.", gt=0)
    max_json_bytes: int = option(1_000_000, "Hard limit on a JSON request body, checked by the HTTP "
                                            "proxy before the body is read (413 at once above it).", gt=0)
    max_upload_bytes: int = option(20_000_000, "Hard limit on an uploaded PDF or an admin JSONL "
                                               "upload, checked like max_json_bytes (413).", gt=0)
    pdf: PdfLimits = option(factory=PdfLimits, help="Caps on the parse of an uploaded PDF "
                                                    "(/v1/documents), which runs in a child process.")
    parallel_pdf_parses: int = option(
        2, "PDF parses one ingress replica runs at once (each may take up to serve.pdf.memory_mb); later "
        "uploads wait their turn.", gt=0,
    )
    compare_strategy: CompareStrategy = option(
        "previous", "What /v1/compare sets against the current policy: previous (the version "
        "before it), random_earlier (any earlier version), samples (two samples of the current "
        "one). With a single version every strategy uses samples."
    )
    temperature: float = option(1.0, "Sampling temperature of /v1/compare summaries (/v1/summarize "
                                     "is greedy), and of OpenAI-route requests that send none.", gt=0)
    top_p: float = option(0.95, "Nucleus sampling mass of /v1/compare summaries, and of OpenAI-route "
                                "requests that send none.", gt=0, le=1)
    reload_interval_s: float = option(2.0, "How often replicas look for a newly published or "
                                      "rolled-back version (the registry's CURRENT).", gt=0)
    admin_token_env: str = option(
        "RLHF_ADMIN_TOKEN", "Environment variable holding the admin token (reload, export); admin "
        "routes answer 503 while it is unset."
    )
    labeler_auth: bool = option(
        False, "Require 'Authorization: Bearer <labeler token>' (POST /admin/labelers) on /v1/compare "
        "and /v1/feedback and record the labeler's id with each choice; off, choices are recorded as "
        "'anonymous' (a laptop default; turn it on wherever more than one person labels)."
    )
    requests_per_minute_per_labeler: int = option(
        0, "Requests to the routes that generate or parse (/v1/summarize, /v1/compare, "
        "/v1/documents, /v1/chat/completions, /v1/completions) one labeler may make per minute, "
        "bursts up to that many (429 with Retry-After above it); per ingress replica; 0 = no limit; "
        "anonymous callers are limited by address only.", ge=0
    )
    requests_per_minute_per_address: int = option(
        0, "Requests to the same routes per minute from one client address (the peer, or the "
        "X-Forwarded-For entry a trusted proxy added), bursts up to that many; per ingress replica; "
        "0 = no limit.", ge=0
    )
    trusted_proxies: list[str] = option(
        factory=list, help="Addresses or networks (CIDR) of reverse proxies in front of Serve: only "
        "from them is X-Forwarded-For believed when rate-limiting by address."
    )
    allowed_hosts: list[str] = option(
        factory=list, help="Host header values accepted besides the loopback names and serve.host "
        "(400 for any other: DNS rebinding); '*' accepts any (a proxy in front checks Host itself). "
        "Needed when serve.host is 0.0.0.0 or ::."
    )
    allow_anonymous_public: bool = option(
        False, "Accept anonymous labelers (labeler_auth=false) on a non-loopback serve.host; off, "
        "such a config is refused at start."
    )
    ssl_certfile: str = option("", "PEM certificate for HTTPS (with ssl_keyfile); empty = plain "
                                   "HTTP.", must_exist=True)
    ssl_keyfile: str = option("", "PEM private key of ssl_certfile.", must_exist=True)
    gold_rate: float = option(
        0.0, "Share of queue requests (/v1/compare without text) answered with a gold pair "
        "(POST /admin/gold) to score the labeler.", ge=0, le=1
    )
    overlap_rate: float = option(
        0.0, "Share of queue requests answered with a pair another labeler was shown, to measure "
        "agreement (labeler_auth only: anonymous choices have no labeler to compare).", ge=0, le=1
    )
    pair_selection: PairSelection = option(
        "random", "Which fresh pair a queue request shows: random (one pair of the document), or "
        "uncertain (of pair_candidates pairs, the one the reward_registry's current reward model is "
        "least sure about: the smallest |sigmoid(r_0 - r_1) - 0.5|; random while it is empty). "
        "Measured no better than random on simulated labelers (docs/benchmarks.md)."
    )
    pair_candidates: int = option(4, "Candidate pairs written per queue request with "
                                     "pair_selection=uncertain.", ge=2)
    reward_registry: str = option(
        "", "Reward-model registry whose current version scores pair_selection=uncertain's candidates "
        "(the online loop's reward_registry, by default its output_dir/reward_registry); re-read "
        "like the policy registry."
    )

    def validate(self) -> None:
        self._validate_exposure()
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ConfigError("ssl_keyfile", "HTTPS needs both ssl_certfile and ssl_keyfile; set both "
                                             "or neither")
        if self.max_json_bytes < self.max_text_bytes:
            raise ConfigError("max_json_bytes", f"{self.max_json_bytes} is below max_text_bytes="
                                                f"{self.max_text_bytes}: no text at the limit could arrive")
        if self.min_replicas > self.max_replicas:
            raise ConfigError("min_replicas", f"{self.min_replicas} exceeds max_replicas={self.max_replicas}")
        if self.gold_rate + self.overlap_rate > 1:
            raise ConfigError("gold_rate", f"gold_rate + overlap_rate = {self.gold_rate + self.overlap_rate} "
                                           "exceeds 1; lower one of them")
        if self.pair_selection == "uncertain" and not self.reward_registry:
            raise ConfigError("reward_registry", "pair_selection=uncertain needs a reward model: set "
                                                 "serve.reward_registry to the online loop's reward "
                                                 "registry, or use pair_selection=random")

    def _validate_exposure(self) -> None:
        """A server other machines can reach needs labeler auth (unless explicitly waived) and the
        host names clients use."""
        if is_loopback(self.host):
            return
        if not self.labeler_auth and not self.allow_anonymous_public:
            raise ConfigError("labeler_auth", f"serve.host={self.host} is reachable from other machines "
                                              "and anyone could read and label what others paste; set "
                                              "serve.labeler_auth=true (or serve.allow_anonymous_public"
                                              "=true to accept that)")
        if self.host in WILDCARD_HOSTS and not self.allowed_hosts:
            raise ConfigError("allowed_hosts", f"serve.host={self.host} listens on every address; name the "
                                               "host names clients use, e.g. serve.allowed_hosts="
                                               "[rlhf.example.org] (or ['*'] behind a proxy that checks "
                                               "Host)")

    def accepted_hosts(self) -> list[str]:
        """Host header values the HTTP proxy answers (``allowed_hosts`` plus the loopback names and
        a bound address)."""
        if "*" in self.allowed_hosts:
            return ["*"]
        bound = [] if self.host in WILDCARD_HOSTS else [self.host]
        return sorted({*LOOPBACK_NAMES, *bound, *self.allowed_hosts})


WILDCARD_HOSTS = ("0.0.0.0", "::")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    """jobs/serve.py: the policy over HTTP, the comparison page, choices into the feedback database."""

    output_dir: str = option("runs/serve", "The resolved config is saved here.")
    seed: int = option(0, "Seed for the labeling queue's picks and sampling (which summary is shown "
                          "first comes from the OS's cryptographic RNG: a labeler must not predict it).")
    registry: str = option("runs/ppo/registry", "Policy registry directory (jobs/ppo.py publishes into "
                                                "output_dir/registry); the newest version is served.")
    policy: ModelConfig = option(
        factory=lambda: ModelConfig(name_or_path="tiny-t5", max_source_length=256, max_target_length=32),
        help="Served as version 'base' while the registry is empty; its lengths apply to every version.",
    )
    store: StoreConfig = option(factory=StoreConfig, help="Where comparisons and choices are stored.")
    serve: ServingConfig = option(factory=ServingConfig, help="HTTP, replicas, batching and limits.")
