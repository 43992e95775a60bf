"""Stable hash splits: a key lands on the same side in every process, run and file."""

from __future__ import annotations

import hashlib


def in_holdout(key: str, share: float) -> bool:
    """Whether ``key`` (a comparison id, a document's text) is in the held-out ``share``.

    sha256, not Python's salted ``hash``, so the split is the same everywhere; a document's text as
    the key keeps one post on one side even when several files hold it (SFT pairs, comparisons).
    """
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < share
