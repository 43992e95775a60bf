"""Who may label, how often, and what the labeling queue shows next: the ingress's access rules,
kept out of the routes so each piece is a small class a test can drive without Serve."""

from __future__ import annotations

import functools
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from fastapi import HTTPException

from rlhf.store.labelers import Labelers
from rlhf.store.tables import ANONYMOUS

# What a queue request (/v1/compare without text) is answered with.
QueueKind = Literal["fresh", "gold", "overlap"]
MAX_TRACKED_KEYS = 10_000  # a limiter keeps at most this many buckets (least recently used go)


class RateLimiter:
    """A token bucket per key (labeler id, client address): ``per_minute`` tokens refilled evenly,
    bursts up to ``per_minute``.

    State lives in this object, so each ingress replica limits on its own: with N replicas a
    client may get up to N times the rate. At most ``max_keys`` buckets are kept, the least
    recently used forgotten first, so a flood of addresses cannot grow it. ``clock`` (seconds) is
    injectable for tests.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = MAX_TRACKED_KEYS):
        self.capacity = float(per_minute)
        self.refill_per_s = per_minute / 60.0
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, as of)

    def admit(self, key: str) -> float:
        """Take one token for ``key``: 0.0 when admitted, else the seconds until one is available.
        A limiter with ``per_minute == 0`` admits everything."""
        if self.capacity <= 0:
            return 0.0
        now = self.clock()
        tokens, since = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - since) * self.refill_per_s)
        admitted = tokens >= 1.0
        self._buckets[key] = (tokens - admitted, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return 0.0 if admitted else (1.0 - tokens) / self.refill_per_s

    def __len__(self) -> int:
        return len(self._buckets)


@functools.lru_cache(maxsize=8)
def _networks(trusted: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Parsed once per list, not per request."""
    return [ipaddress.ip_network(net, strict=False) for net in trusted]


def client_address(peer: str, forwarded_for: str | None, trusted: Sequence[str]) -> str:
    """The address to rate-limit: the peer, unless it is a trusted proxy; then the last
    ``X-Forwarded-For`` entry no trusted proxy wrote (entries to its left are the client's own
    claims and can be forged)."""
    networks = _networks(tuple(trusted))

    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in net for net in networks)

    if not is_trusted(peer) or not forwarded_for:
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    return next((hop for hop in reversed(hops) if not is_trusted(hop)), hops[0] if hops else peer)


def too_many(field: str, route: str, wait_s: float) -> HTTPException:
    """429 with Retry-After in whole seconds (rounded up, so a client that waits gets through)."""
    seconds = max(1, math.ceil(wait_s))
    return HTTPException(429, f"{field}: too many requests to {route} and the other generating "
                              f"routes; retry in {seconds} s", headers={"Retry-After": str(seconds)})


@dataclass(frozen=True)
class Caller:
    """Who sent a labeling request: a labeler's id and name, or ANONYMOUS without labeler auth."""

    id: str
    name: str


ANONYMOUS_CALLER = Caller(ANONYMOUS, ANONYMOUS)


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header ("" when absent or another scheme)."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class LabelerGate:
    """Labeler authentication: 401 without a valid token, 403 for a revoked one. Every request reads
    the database, so a revocation applies at once on every replica."""

    def __init__(self, labelers: Labelers, required: bool):
        self.labelers = labelers
        self.required = required

    def identify(self, authorization: str | None) -> Caller:
        if not self.required:
            return ANONYMOUS_CALLER
        token = bearer_token(authorization)
        labeler = self.labelers.by_token(token) if token else None
        if labeler is None:
            raise HTTPException(401, "Authorization: send 'Bearer <labeler token>'; an admin creates one "
                                     "with POST /admin/labelers", headers={"WWW-Authenticate": "Bearer"})
        if labeler.revoked:
            raise HTTPException(403, "Authorization: this labeler token was revoked; ask an admin for a "
                                     "new one")
        return Caller(labeler.id, labeler.name)


def queue_kind(draw: float, gold_rate: float, overlap_rate: float) -> QueueKind:
    """What a queue request gets for a uniform ``draw`` in [0, 1): gold with probability
    ``gold_rate``, a pair shown to another labeler with ``overlap_rate``, else a fresh pair."""
    if draw < gold_rate:
        return "gold"
    if draw < gold_rate + overlap_rate:
        return "overlap"
    return "fresh"
