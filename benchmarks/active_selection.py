"""Active pair selection (``serve.pair_selection``): reward-model accuracy on held-out simulated
choices after N labels, when each label's pair is the first of k candidates (random), the one the
reward model trained so far is least sure about (uncertain: ``rlhf.serve.selection.least_certain``,
what the server runs), or the one an ensemble of heads disagrees about most (ensemble: the
alternative the margin was chosen over).

No Serve: the queue's draw and the reward update are library calls. The pool is built once: for
each bundled TL;DR post (``rlhf/data/samples``) its human/policy summaries plus extracts of 1-2 of
its sentences (no summarizer ships offline; random tiny policies write noise). The reward model
is a Bradley-Terry linear head on fixed features of (post, summary) that see wording and length:
the all-MiniLM-L6-v2 sentence embedding of the summary (mean-pooled, as the checkpoint was trained),
its elementwise product with the post's, and the summary's log length. A refit takes well under a
second, so the selecting model is refitted every few labels. (A linear head on the backbone's
frozen [CLS] state, the pooling ``RewardModel`` fine-tunes, stays at chance even on the length
rule, and fine-tuning per point costs minutes.) A simulated person labels the chosen pair:
``shorter`` (the online e2e scenario's user), ``lead_overlap`` (prefers the summary whose content
words come more from the post's first sentence) or ``post_overlap`` (... from the whole post),
each with label noise p. The held-out choices come from posts the stream never shows.

    python benchmarks/active_selection.py [--seeds 0 1 2] [--labels 10 20 40 80 160 320]
        [--preferences shorter:0 post_overlap:0.1] [--features-cache runs/active_selection_features.pt]
        [--out benchmarks/results/active_selection.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "rlhf" / "data" / "samples"
BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"
Rule = Literal["shorter", "lead_overlap", "post_overlap"]
RULES: tuple[Rule, ...] = ("shorter", "lead_overlap", "post_overlap")
Strategy = Literal["random", "uncertain", "ensemble"]
STRATEGIES: tuple[Strategy, ...] = ("random", "uncertain", "ensemble")
STOPWORDS = set("the and for that this with was were are you your have has had not but she her him his they "
                "them their what when who will would about from there been into just than then out can "
                "all any our its also very really some more".split())


@dataclass(frozen=True)
class Preference:
    """The simulated person: a rule, and the chance p that a choice is flipped."""

    rule: Rule
    noise: float

    @property
    def name(self) -> str:
        return f"{self.rule}, p={self.noise:g}"


@dataclass(frozen=True)
class Document:
    lead_words: frozenset[str]  # content words of the post's first sentence
    post_words: frozenset[str]  # content words of the whole post
    summaries: tuple[str, ...]
    features: tuple[int, ...]  # row of each summary in the feature matrix


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2 and w not in STOPWORDS}


def overlap_share(summary: str, words: frozenset[str]) -> float:
    """Share of the summary's content words that occur in ``words`` (a sentence's or post's)."""
    own = content_words(summary)
    return len(own & words) / max(len(own), 1)


def sentences(post: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", post) if len(s.split()) >= 4]


def candidate_summaries(post: str, written: list[str], rng: random.Random, extracts: int = 3) -> list[str]:
    """The post's written summaries plus ``extracts`` windows of 1-2 of its sentences (<= 40 words)."""
    parts = sentences(post)
    out = [s.split("<|endoftext|>")[0].strip() for s in written]
    for _ in range(extracts if len(parts) >= 2 else 0):
        start = rng.randrange(len(parts))
        out.append(" ".join(" ".join(parts[start:start + rng.choice((1, 2))]).split()[:40]))
    return list(dict.fromkeys(s for s in out if s))


def load_posts() -> dict[str, tuple[str, list[str]]]:
    """{post: (first sentence, its two policy summaries)} from the bundled TL;DR comparisons."""
    posts: dict[str, list[str]] = {}
    for line in (SAMPLES / "tldr_comparisons.jsonl").read_text().splitlines():
        row = json.loads(line)
        posts.setdefault(row["post"], []).extend([row["summary_0"], row["summary_1"]])
    return {post: ((sentences(post) or [post])[0], written) for post, written in posts.items()}


def build_pool(seed: int, cache: Path | None):
    """(documents, features (S, F)): every pool summary's features (see ``encode``), computed once
    or read from ``cache``, written by an earlier run with the same settings."""
    import torch

    rng = random.Random(seed)
    posts, summaries, documents = [], [], []
    for post, (lead, written) in sorted(load_posts().items()):
        candidates = candidate_summaries(post, written, rng)
        if len(candidates) < 3:
            continue
        rows = tuple(range(len(summaries), len(summaries) + len(candidates)))
        posts += [post] * len(candidates)
        summaries += candidates
        documents.append(Document(frozenset(content_words(lead)), frozenset(content_words(post)),
                                  tuple(candidates), rows))
    if cache is not None and cache.is_file():
        return documents, torch.load(cache)
    features = encode(posts, summaries)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(features, cache)
    return documents, features


def encode(posts: list[str], summaries: list[str], max_summary_tokens: int = 64,
           max_post_tokens: int = 256):
    """Features (S, 2H + 1) of each (post, summary): the summary's sentence embedding e_s, e_s * e_p
    (scaled by 10: a cosine's terms are ~1/H) and log(1 + characters), centred."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from rlhf.models.offline import resolve_name_or_path

    name = resolve_name_or_path(BACKBONE)
    tokenizer, backbone = AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name).eval()

    def embed(texts: list[str], max_tokens: int) -> torch.Tensor:  # (N, H), unit length
        rows = []
        with torch.no_grad():
            for start in range(0, len(texts), 64):
                batch = tokenizer(texts[start:start + 64], padding=True, truncation=True,
                                  max_length=max_tokens, return_tensors="pt")
                hidden = backbone(**batch).last_hidden_state  # (B, T, H)
                mask = batch["attention_mask"][..., None].float()  # (B, T, 1)
                rows.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
                print(f"embedded {start + len(rows[-1])}/{len(texts)}", flush=True)
        return torch.cat(rows)

    row_of_post = {post: row for row, post in enumerate(dict.fromkeys(posts))}
    post_embeddings = embed(list(row_of_post), max_post_tokens)
    e_p = post_embeddings[[row_of_post[p] for p in posts]]  # (S, H)
    e_s = embed(summaries, max_summary_tokens)  # (S, H)
    length = torch.tensor([[math.log1p(len(s))] for s in summaries])  # (S, 1)
    return torch.cat([e_s, 10 * e_s * e_p, length - length.mean()], dim=1)


@dataclass(frozen=True)
class Pair:
    document: int
    first: int  # index of summary_0 in the document's summaries
    second: int


@dataclass(frozen=True)
class Draw:
    """What one label's slot of the stream offers: k candidate pairs, and the person's dice."""

    candidates: tuple[Pair, ...]
    flip: float  # uniform: the choice is flipped when below the preference's noise
    coin: float  # uniform: decides a tie of the rule


def random_pairs(documents: list[Document], doc: int, k: int, rng: random.Random) -> tuple[Pair, ...]:
    """Up to ``k`` distinct pairs of the document's summaries, of different lengths (the shorter
    rule has no answer for equal lengths; the e2e user leaves such pairs pending)."""
    summaries = documents[doc].summaries
    pairs = [Pair(doc, i, j) for i in range(len(summaries)) for j in range(i + 1, len(summaries))
             if len(summaries[i]) != len(summaries[j])]
    chosen = rng.sample(pairs, min(k, len(pairs)))
    return tuple(Pair(p.document, p.second, p.first) if rng.random() < 0.5 else p for p in chosen)


def stream(documents: list[Document], pool: list[int], n: int, k: int, seed: int) -> list[Draw]:
    """The labeling stream: the same documents, candidates and dice whatever the strategy."""
    rng = random.Random(seed)
    order = [pool[i % len(pool)] for i in range(n)]
    rng.shuffle(order)
    return [Draw(random_pairs(documents, doc, k, rng), rng.random(), rng.random()) for doc in order]


def choose(preference: Preference, documents: list[Document], pair: Pair, draw: Draw) -> tuple[int, bool]:
    """(the simulated person's choice, whether the rule itself was a tie and a coin decided)."""
    doc = documents[pair.document]
    a, b = doc.summaries[pair.first], doc.summaries[pair.second]
    if preference.rule == "shorter":
        value_a, value_b = -len(a), -len(b)
    else:
        words = doc.lead_words if preference.rule == "lead_overlap" else doc.post_words
        value_a, value_b = overlap_share(a, words), overlap_share(b, words)
    tie = value_a == value_b
    choice = (draw.coin >= 0.5) if tie else int(value_b > value_a)
    return int(choice) ^ int(draw.flip < preference.noise), tie


def rows(documents: list[Document], pairs: list[Pair]):
    """Feature rows (P,) of each pair's summary_0 and summary_1."""
    import torch

    first = [documents[p.document].features[p.first] for p in pairs]
    second = [documents[p.document].features[p.second] for p in pairs]
    return torch.tensor(first), torch.tensor(second)


def train_head(features, documents, pairs: list[Pair], choices: list[int], seed: int,
               steps: int = 100, l2: float = 1e-2):
    """A fresh linear head (F -> 1) fitted to the labels: the Bradley-Terry loss of the reward
    trainer plus ``l2``·|w|², minimised by L-BFGS (convex in the head; ~100 steps converge)."""
    import torch

    from rlhf.train.reward import bradley_terry_loss

    head = torch.nn.Linear(features.shape[1], 1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / (head.in_features + 1) ** 0.5, generator=generator)
        head.bias.zero_()
    first, second = rows(documents, pairs)
    picked = torch.tensor(choices).bool()
    chosen, rejected = torch.where(picked, second, first), torch.where(picked, first, second)
    inputs = features[torch.cat([chosen, rejected])]  # (2P, H)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss, _, _ = bradley_terry_loss(*head(inputs).squeeze(-1).split(len(chosen)))
        loss = loss + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head.eval()


def pair_scores(head, features, documents, pairs: list[Pair]) -> list[tuple[float, float]]:
    import torch

    first, second = rows(documents, pairs)
    with torch.no_grad():
        scores = head(features[torch.cat([first, second])]).squeeze(-1)  # (2P,)
    return list(zip(*(part.tolist() for part in scores.split(len(pairs)))))


def most_disagreed(heads, features, documents, pairs: list[Pair]) -> int:
    """Index of the pair whose P(summary_0 preferred) varies most across the ensemble's heads."""
    import torch

    scores = torch.tensor([pair_scores(h, features, documents, pairs) for h in heads])  # (heads, k, 2)
    probabilities = torch.sigmoid(scores[..., 0] - scores[..., 1])  # (heads, k)
    return int(probabilities.std(0).argmax())


@dataclass(frozen=True)
class Settings:
    candidates: int  # k pairs per label
    retrain_every: int  # labels between refits of the selecting model
    ensemble: int  # heads of the ensemble strategy (bootstrap resamples of the labels)
    labels: tuple[int, ...]  # N at which accuracy is measured


@dataclass(frozen=True)
class Point:
    preference: str
    strategy: str
    seed: int
    labels: int
    accuracy: float  # on the held-out choices (noise included: the ceiling is 1 - p)
    rule_accuracy: float  # on the same pairs against the noise-free rule
    coin_flip_share: float  # training labels whose rule was a tie (a coin decided them)


@dataclass(frozen=True)
class Heldout:
    pairs: list[Pair]
    choices: list[int]
    rule: list[int]


def heldout(documents, pool: list[int], preference: Preference, seed: int, per_document: int = 10) -> Heldout:
    """Fixed simulated choices on posts the stream never shows (rule ties left out)."""
    draws = stream(documents, pool, len(pool), per_document, seed)
    pairs, choices, rule = [], [], []
    for draw in draws:
        for pair in draw.candidates:
            choice, tie = choose(preference, documents, pair, draw)
            if not tie:
                pairs.append(pair)
                choices.append(choice)
                rule.append(choose(Preference(preference.rule, 0.0), documents, pair, draw)[0])
    return Heldout(pairs, choices, rule)


def accuracy(head, features, documents, pairs: list[Pair], choices: list[int]) -> float:
    scores = pair_scores(head, features, documents, pairs)
    return sum(int(b > a) == c for (a, b), c in zip(scores, choices)) / len(choices)


def select(strategy: Strategy, selectors: list, features, documents, candidates: list[Pair]) -> int:
    """Which candidate the strategy shows; the first while it has no model yet."""
    from rlhf.serve.selection import least_certain

    if strategy == "random" or not selectors:
        return 0
    if strategy == "uncertain":
        return least_certain(pair_scores(selectors[0], features, documents, candidates))
    return most_disagreed(selectors, features, documents, candidates)


def selectors(
    strategy: Strategy, features, documents, pairs: list[Pair], choices: list[int],
    settings: Settings, seed: int,
):
    """The model(s) choosing the next pairs: one head on every label, or heads on bootstrap resamples."""
    if strategy == "random":
        return []
    if strategy == "uncertain":
        return [train_head(features, documents, pairs, choices, seed)]
    heads = []
    for member in range(settings.ensemble):
        rng = random.Random(seed * 1000 + member)
        picks = [rng.randrange(len(pairs)) for _ in pairs]
        heads.append(train_head(features, documents, [pairs[i] for i in picks],
                                [choices[i] for i in picks], seed * 1000 + member))
    return heads


def run_strategy(strategy: Strategy, preference: Preference, data, draws: list[Draw], test: Heldout,
                 settings: Settings, seed: int) -> list[Point]:
    """Label the stream with ``strategy``; accuracy of a head fitted on the first N labels."""
    documents, features = data
    pairs, choices, ties, points, models = [], [], 0, [], []
    for t, draw in enumerate(draws):
        if t and t % settings.retrain_every == 0:
            models = selectors(strategy, features, documents, pairs, choices, settings,
                               seed + t)
        pair = draw.candidates[select(strategy, models, features, documents, list(draw.candidates))]
        choice, tie = choose(preference, documents, pair, draw)
        pairs.append(pair)
        choices.append(choice)
        ties += tie
        if t + 1 in settings.labels:
            head = train_head(features, documents, pairs, choices, seed)
            points.append(Point(preference.name, strategy, seed, t + 1,
                                accuracy(head, features, documents, test.pairs, test.choices),
                                accuracy(head, features, documents, test.pairs, test.rule), ties / (t + 1)))
    return points


def shorter_baseline(documents, test: Heldout) -> float:
    """Accuracy of "the shorter summary wins" on the held-out choices (no pair has equal lengths)."""
    lengths = [[len(s) for s in documents[p.document].summaries] for p in test.pairs]
    shorter = [int(n[p.second] < n[p.first]) for n, p in zip(lengths, test.pairs)]
    return sum(s == c for s, c in zip(shorter, test.choices)) / len(test.choices)


def parse_preference(text: str) -> Preference:
    rule, _, noise = text.partition(":")
    if rule not in RULES:
        raise SystemExit(f"--preferences: unknown rule {rule!r}; use one of {', '.join(RULES)}, "
                         "e.g. post_overlap:0.1")
    return Preference(rule, float(noise or 0))  # type: ignore[arg-type]


def mean_table(points: list[dict]) -> list[dict]:
    """Per (preference, strategy, N): mean, min and max accuracy over seeds, and the paired
    difference to ``random`` on the same seed (mean, and on how many seeds it is ahead / behind)."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p["preference"], p["strategy"], p["labels"]), []).append(p)

    def versus_random(pref: str, n: int, group: list[dict]) -> dict:
        baseline = {p["seed"]: p["accuracy"] for p in groups[(pref, "random", n)]}
        gaps = [p["accuracy"] - baseline[p["seed"]] for p in group]
        return {"vs_random_mean": sum(gaps) / len(gaps), "seeds_ahead": sum(g > 0 for g in gaps),
                "seeds_behind": sum(g < 0 for g in gaps)}

    return [{"preference": pref, "strategy": strategy, "labels": n,
             **versus_random(pref, n, group),
             "accuracy_mean": sum(p["accuracy"] for p in group) / len(group),
             "accuracy_min": min(p["accuracy"] for p in group),
             "accuracy_max": max(p["accuracy"] for p in group),
             "rule_accuracy_mean": sum(p["rule_accuracy"] for p in group) / len(group),
             "coin_flip_share_mean": sum(p["coin_flip_share"] for p in group) / len(group)}
            for (pref, strategy, n), group in groups.items()]


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preferences = list(dict.fromkeys(row["preference"] for row in table))
    fig, axes = plt.subplots(1, len(preferences), figsize=(5.5 * len(preferences), 4), squeeze=False)
    for ax, preference in zip(axes[0], preferences):
        for strategy in STRATEGIES:
            line = [r for r in table if r["preference"] == preference and r["strategy"] == strategy]
            if line:
                n = [r["labels"] for r in line]
                mean = [r["accuracy_mean"] for r in line]
                ax.plot(n, mean, marker="o", label=strategy)
                low, high = [r["accuracy_min"] for r in line], [r["accuracy_max"] for r in line]
                ax.fill_between(n, low, high, alpha=0.15)
        ax.set(title=preference, xlabel="labels (N)", ylabel="held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--labels", type=int, nargs="+", default=[10, 20, 40, 80, 160, 320])
    parser.add_argument("--preferences", nargs="+",
                        default=["shorter:0", "lead_overlap:0.1", "post_overlap:0.1"])
    parser.add_argument("--candidates", type=int, default=4, help="k, as serve.pair_candidates")
    parser.add_argument("--retrain-every", type=int, default=10)
    parser.add_argument("--ensemble", type=int, default=4)
    parser.add_argument("--heldout-share", type=float, default=0.25)
    parser.add_argument("--out", default="benchmarks/results/active_selection.json")
    parser.add_argument("--features-cache", type=Path, help="Where the pool's encoded features are kept "
                                                              "between runs (a .pt file; the same settings).")
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    settings = Settings(args.candidates, args.retrain_every, args.ensemble, tuple(sorted(args.labels)))
    preferences = [parse_preference(p) for p in args.preferences]
    started = time.time()
    documents, features = build_pool(0, args.features_cache)
    encoded_s = time.time() - started
    print(f"pool: {len(documents)} posts, {features.shape[0]} summaries encoded in {encoded_s:.0f} s",
          flush=True)
    data = (documents, features)
    points, baselines = [], []
    for seed in args.seeds:
        order = random.Random(seed).sample(range(len(documents)), len(documents))
        cut = int(len(order) * args.heldout_share)
        test_docs, train_docs = order[:cut], order[cut:]
        draws = stream(documents, train_docs, max(settings.labels), settings.candidates, seed + 1)
        for preference in preferences:
            test = heldout(documents, test_docs, preference, seed + 2)
            baselines.append({"preference": preference.name, "seed": seed, "heldout_pairs": len(test.pairs),
                              "shorter_wins_accuracy": shorter_baseline(documents, test)})
            for strategy in STRATEGIES:
                for point in run_strategy(strategy, preference, data, draws, test, settings, seed):
                    points.append(asdict(point))
                    print(json.dumps(points[-1]), flush=True)
    table = mean_table(points)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "settings": {**asdict(settings), "seeds": args.seeds, "backbone": BACKBONE,
                     "features": int(features.shape[1]), "heldout_share": args.heldout_share,
                     "posts": len(documents), "summaries": int(features.shape[0]),
                     "encode_s": round(encoded_s, 1), "total_s": round(time.time() - started, 1)},
        "baselines": baselines, "table": table, "points": points}, indent=2) + "\n")
    plot(table, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
