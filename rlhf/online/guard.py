"""The publish guard: a cycle's new policy becomes the served version only if it does not look like
it learned to game the reward model, and people are not turning against the version it builds on.

Both the served policy the cycle started from and the new one summarise the same first stored
documents (the same ones every cycle), greedily (reproducible, and what /v1/summarize serves) with
their saved generation configs; the new one is refused when its summaries grew longer, repeat
themselves more, or more often never end (hit max_new_tokens without eos) than the tolerances in
``guard`` allow, or when people preferred the served version too rarely in /v1/compare against
other versions. A refused policy stays where it was trained, outside the registry; the ledger
records why.
"""

from __future__ import annotations

import torch

from rlhf.config.sections import ModelConfig
from rlhf.eval.health import mean_repetition, unfinished_share
from rlhf.models import Policy, load_policy
from rlhf.online.config import GuardConfig
from rlhf.store import FeedbackStore, GuardReport, SummaryStats
from rlhf.store.queries import Tally, version_wins_query

GENERATE_BATCH = 8


def win_count(store: FeedbackStore, version: str | None) -> Tally:
    """``version``'s wins; a policy served from outside the registry (None) has none recorded."""
    if version is None:
        return Tally(0, 0)
    with store.engine.connect() as conn:
        won, decided = conn.execute(version_wins_query(version)).one()
    return Tally(int(won), int(decided))


@torch.no_grad()
def summary_stats(policy: Policy, documents: list[str], max_new_tokens: int, ngram: int) -> SummaryStats:
    """Greedy summaries of ``documents``: mean length in tokens (up to eos, else max_new_tokens),
    repetition of word ``ngram``-grams, and the share that never emitted eos."""
    texts: list[str] = []
    lengths: list[int] = []
    ended: list[bool] = []
    tokenizer, model = policy.tokenizer, policy.model
    for start in range(0, len(documents), GENERATE_BATCH):
        batch = policy.encode_documents(documents[start:start + GENERATE_BATCH]).to(model.device)
        # PeftModel forwards generate to the model it wraps (untyped __getattr__)
        output = model.generate(
            **batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            logits_processor=policy.logits_processors(),
        )  # (B, prefix + T)
        prefix = 1 if policy.is_encoder_decoder else batch["input_ids"].shape[1]
        response = output[:, prefix:].cpu()  # (B, T): start token or prompt dropped, padded after eos
        is_eos = response == tokenizer.eos_token_id  # (B, T)
        has_eos = is_eos.any(1)  # (B,)
        first_eos = torch.where(has_eos, is_eos.int().argmax(1), response.shape[1])  # (B,)
        texts += tokenizer.batch_decode(response, skip_special_tokens=True)
        lengths += first_eos.tolist()
        ended += has_eos.tolist()
    return SummaryStats(length_mean=sum(lengths) / max(len(lengths), 1),
                        repetition=mean_repetition(texts, ngram), unfinished=unfinished_share(ended))


def refusals(before: SummaryStats, after: SummaryStats, wins: Tally, guard: GuardConfig) -> list[str]:
    """The checks the new policy (``after``) fails against the served one (``before``), each naming
    its ``guard`` key and the numbers; empty = publish. The length ratio counts a served policy
    that writes nothing as one token long."""
    failed = []
    ratio = after.length_mean / max(before.length_mean, 1.0)
    if ratio > guard.max_length_ratio:
        failed.append(f"guard.max_length_ratio: mean summary length grew from {before.length_mean:.1f} to "
                      f"{after.length_mean:.1f} tokens (x{ratio:.2f} > x{guard.max_length_ratio})")
    if after.repetition - before.repetition > guard.max_repetition_increase:
        failed.append(f"guard.max_repetition_increase: repeated word {guard.repetition_ngram}-grams rose "
                      f"from {before.repetition:.3f} to {after.repetition:.3f} "
                      f"(> +{guard.max_repetition_increase})")
    if after.unfinished - before.unfinished > guard.max_unfinished_increase:
        failed.append(f"guard.max_unfinished_increase: summaries without eos rose from "
                      f"{before.unfinished:.3f} to {after.unfinished:.3f} "
                      f"(> +{guard.max_unfinished_increase})")
    if wins.total >= guard.min_win_comparisons and wins.hits < guard.min_win_rate * wins.total:
        failed.append(f"guard.min_win_rate: people preferred the served version in {wins.hits} of "
                      f"{wins.total} comparisons ({wins.rate:.3f} < {guard.min_win_rate})")
    return failed


def check_policy(
    store: FeedbackStore, served: ModelConfig, new: ModelConfig, served_version: str | None,
    guard: GuardConfig, max_new_tokens: int,
) -> GuardReport:
    """Measure the served and the new policy on the first ``guard.documents`` stored documents and
    judge the new one; ``served_version`` names the served policy in /v1/compare (None: none)."""
    documents = store.documents_table(limit=guard.documents).column("original_text").to_pylist()
    before, after = (summary_stats(load_policy(cfg, dropout=False), documents, max_new_tokens,
                                   guard.repetition_ngram) for cfg in (served, new))
    wins = win_count(store, served_version)
    return GuardReport(
        documents=len(documents), before=before, after=after,
        win_rate=None if wins.rate is None else round(wins.rate, 4), win_comparisons=wins.total,
        refused=refusals(before, after, wins, guard),
    )
