"""The one rule for ids a model can score but its tokenizer cannot decode.

Checkpoints pad their embedding past the tokenizer (Qwen: 151,936 rows for 151,665 tokens; a
GPT-2-size benchmark model has 50,257 rows for the 384 ids of the byte tokenizer). An id
``>= len(tokenizer)`` that is sampled cannot be decoded (ByT5: ``bytes must be in range(0, 256)``),
so every sampler masks those logits to -inf (``mask_unknown_ids``, ``KnownIdsOnly``) and PPO scores
its samples over the decodable ids only (``known_logits``): its log-probs, ratio, KL and entropy
are then those of the distribution the tokens were drawn from.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList


def mask_unknown_ids(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``logits`` (..., V) with every id ``>= vocab_size`` at -inf (a new tensor; differentiable).

    Returned as is (the same tensor) when ``V <= vocab_size``: a model whose vocabulary is the
    tokenizer's (the tiny presets) is left untouched, not copied.
    """
    if logits.shape[-1] <= vocab_size:
        return logits
    unknown = torch.arange(logits.shape[-1], device=logits.device) >= vocab_size  # (V,)
    return logits.masked_fill(unknown, float("-inf"))


def known_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The scoring side of the rule: ``logits[..., :vocab_size]``, a view (no copy), or ``logits``
    itself when ``V <= vocab_size``.

    Its log-softmax and entropy are those of ``mask_unknown_ids(logits)`` on the kept ids, exactly,
    without -inf entries: an entropy's ``p * log p`` at ``p = 0, log p = -inf`` has a nan gradient
    even where its value is replaced by 0.
    """
    return logits[..., :vocab_size] if logits.shape[-1] > vocab_size else logits


class KnownIdsOnly(LogitsProcessor):
    """``generate``'s side of :func:`mask_unknown_ids`, for ``logits_processor=``.

    transformers applies custom processors after its own (min-new-tokens, ...) and before
    temperature, top-k and top-p, so those warpers only ever see decodable ids, and plain sampling
    draws exactly from ``softmax(mask_unknown_ids(logits) / temperature)``.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return mask_unknown_ids(scores, self.vocab_size)


def with_known_ids_only(
    vocab_size: int, processors: LogitsProcessorList | None = None
) -> LogitsProcessorList:
    """``processors`` (the caller's, if any) followed by :class:`KnownIdsOnly` for ``vocab_size``.

    Last among them, so that no caller's processor can give probability back to an undecodable id
    (transformers still runs its sampling warpers after all of them).
    """
    return LogitsProcessorList([*(processors or []), KnownIdsOnly(vocab_size)])
