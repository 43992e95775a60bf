"""Log-probs of given response tokens under a policy, the one way every user reads a response:
PPO's roles (sampled rollouts), DPO and its reference, and the implicit-reward eval (given
summaries).

Every response-aligned tensor here is ``(B, T)``, right-padded with the pad id, and ``mask`` is
1.0 on response tokens (the first EOS included) and 0.0 after, as in ``rlhf.models.logprobs``.
One code path serves encoder-decoder (T5/BART/LED) and decoder-only (GPT-2/Llama) policies:

* seq2seq: the document goes to the encoder; the decoder reads ``start + response[:-1]``, so
  decoder position ``t`` predicts (and values the state before) ``response[t]``;
* causal: the decoder reads ``left-padded prompt + response[:-1]`` (one contiguous run of real
  tokens), with position ids counted from the attention mask, so the last ``T`` columns predict
  (and value the state before) ``response[0..T-1]``. The last response token is never an input:
  nothing a score needs is predicted from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from rlhf.config.sections import ModelConfig, RewardHeads, RewardScore
from rlhf.models.encoding import IGNORE_INDEX, pad_rows, shift_right
from rlhf.models.heads import positions_from_mask
from rlhf.models.logprobs import sequence_logprobs, temper_logits_, token_entropy, token_logprobs
from rlhf.models.policy import Policy, load_policy
from rlhf.models.vocab import known_logits


class ResponseTokens(Protocol):
    """What scoring reads of a batch of responses: a PPO ``Rollout`` (sampled) or ``SummaryTokens``
    (given) has these fields."""

    query: dict[str, torch.Tensor]  # policy inputs from Policy.encode_documents: (B, S) each
    response_ids: torch.Tensor  # (B, T) long, right-padded with the pad id
    mask: torch.Tensor  # (B, T) float, 1.0 on response tokens


@dataclass
class SummaryTokens:
    """Given summaries as a policy's response tokens, with no sampling (and no PPO rollout) behind them."""

    query: dict[str, torch.Tensor]  # the policy's own generation inputs: (B, S) each
    response_ids: torch.Tensor  # (B, T) long, right-padded with the pad id
    mask: torch.Tensor  # (B, T) float, 1.0 on every summary token and its EOS


def encode_summaries(policy: Policy, documents: list[str], summaries: list[str]) -> SummaryTokens:
    """The tokens SFT trains on (``Policy.encode_pairs``' labels: the summary cut to
    ``max_target_length``, then EOS) as responses to the policy's generation inputs."""
    labels = policy.encode_pairs(documents, summaries)["labels"]  # (B, L)
    answers = [row[row != IGNORE_INDEX].tolist() for row in labels]
    return SummaryTokens(
        query=dict(policy.encode_documents(documents)),
        response_ids=pad_rows(answers, policy.tokenizer.pad_token_id),  # (B, T)
        mask=pad_rows([[1] * len(answer) for answer in answers], 0).float(),  # (B, T)
    )


def policy_inputs(
    policy_is_encoder_decoder: bool, responses: ResponseTokens, start_token_id: int | None, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Forward-pass inputs whose outputs at the response positions predict the response tokens.

    Seq2seq: the query (encoder inputs, LED's global mask) + ``decoder_input_ids`` =
    start + response[:-1] (B, T). No decoder attention mask: its causal attention never lets a
    response position see the padding after it, and without a mask attention kernels can take
    their fast causal path.
    Causal: ``input_ids`` = prompt (B, P) + response[:-1] (B, T-1), the prompt left-padded and
    the response right-padded, ``attention_mask`` likewise, and ``position_ids`` counted from
    the mask (a plain forward pass would number columns, shifting left-padded rows). Outputs
    at the last T columns then line up with the response; ``start_token_id`` may be None.
    """
    if policy_is_encoder_decoder:
        if start_token_id is None:
            raise ValueError("an encoder-decoder policy needs a decoder start token id "
                             "(config.decoder_start_token_id)")
        return {
            **responses.query,
            "decoder_input_ids": shift_right(responses.response_ids, start_token_id, pad_token_id),
        }
    input_ids = torch.cat([responses.query["input_ids"], responses.response_ids[:, :-1]], 1)  # (B, P+T-1)
    attention_mask = torch.cat(
        [responses.query["attention_mask"], responses.mask[:, :-1].long()], 1
    )  # (B, P+T-1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": positions_from_mask(attention_mask),  # (B, P+T-1)
    }


def policy_inputs_for(
    policy: Policy, responses: ResponseTokens, device: torch.device
) -> dict[str, torch.Tensor]:
    """``policy_inputs`` with the policy's own start and pad ids, on ``device``."""
    start = getattr(policy.model.config, "decoder_start_token_id", None)  # causal configs lack it
    inputs = policy_inputs(policy.is_encoder_decoder, responses, start, policy.tokenizer.pad_token_id)
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def module_device(module: nn.Module) -> torch.device:
    """Where inputs must go: ``.device`` of a HF model or DeepSpeed engine, else the parameters'."""
    device = getattr(module, "device", None)
    return device if isinstance(device, torch.device) else next(module.parameters()).device


@dataclass(frozen=True)
class PromptGroups:
    """Rows that read the same prompt (GRPO's k samples per document, DPO's chosen and rejected):
    ``first`` (G,) is the row each distinct prompt is read from, ``of_row`` (B,) each row's group."""

    first: torch.Tensor
    of_row: torch.Tensor

    @property
    def shared(self) -> bool:
        """Some prompt serves more than one row, so reading each once saves work."""
        return len(self.first) < len(self.of_row)


def prompt_groups(query: dict[str, torch.Tensor]) -> PromptGroups:
    """Group the rows of ``query`` (the policy's inputs, (B, S) each) whose every input is equal."""
    key = torch.cat([query[name].long() for name in sorted(query)], 1)  # (B, sum of S)
    _, of_row = torch.unique(key, dim=0, return_inverse=True)  # (B,) group ids, 0..G-1
    rows = torch.arange(len(of_row))
    first = torch.full((int(of_row.max()) + 1,), len(of_row)).scatter_reduce(0, of_row, rows, "amin")
    return PromptGroups(first=first, of_row=of_row)


def _shares_prompts(policy: Policy, groups: PromptGroups) -> bool:
    """Whether to read each distinct prompt once. Causal models carry the prompt to its responses
    in a KV cache, which Hugging Face drops under gradient checkpointing in training."""
    if not groups.shared:
        return False
    if policy.is_encoder_decoder:
        return True
    model = policy.model
    return not (model.is_activation_checkpointing and model.training and torch.is_grad_enabled())


def _shared_prompt_logits(
    model: nn.Module, policy: Policy, responses: ResponseTokens, groups: PromptGroups, device: torch.device
) -> torch.Tensor:
    """``response_logits`` reading each distinct prompt once: (B, T, V).

    Seq2seq: the encoder runs on the G distinct documents and its states are indexed out to the B
    rows. Causal: the G prompts run once into a KV cache (their last column predicts
    ``response[0]``), the cache is indexed out to the B rows, and the responses run on it with the
    positions and mask a single pass would give. Gradients flow back through both indexings into
    the shared prompt, so loss and gradients equal a plain pass's up to float rounding; GRPO's
    k samples per document then cost one prompt pass instead of k (8 x 197 + 32 x 48 tokens
    instead of 32 x 245 in the TL;DR benchmark).
    """
    first, of_row = groups.first.to(device), groups.of_row.to(device)
    query = {name: tensor.to(device) for name, tensor in responses.query.items()}
    response_ids = responses.response_ids.to(device)  # (B, T)
    if policy.is_encoder_decoder:
        inputs = policy_inputs_for(policy, responses, device)  # the query + decoder_input_ids (B, T)
        encoder = policy.model.get_encoder()
        states = encoder(**{name: inputs[name][first] for name in responses.query})  # (G, S, H)
        return model(
            encoder_outputs=(states.last_hidden_state[of_row],),  # (B, S, H)
            attention_mask=inputs["attention_mask"],
            decoder_input_ids=inputs["decoder_input_ids"],
        ).logits  # (B, T, V)
    prompt_mask = query["attention_mask"][first]  # (G, P)
    prompt = model(
        input_ids=query["input_ids"][first], attention_mask=prompt_mask,
        position_ids=positions_from_mask(prompt_mask), use_cache=True, logits_to_keep=1,
    )
    first_logits = prompt.logits[of_row]  # (B, 1, V): the last prompt column predicts response[0]
    if response_ids.shape[1] == 1:
        return first_logits
    cache = prompt.cache
    cache.batch_select_indices(of_row)  # (G, ...) -> (B, ...), differentiable
    response_mask = responses.mask[:, :-1].long().to(device)  # (B, T-1)
    attention_mask = torch.cat([query["attention_mask"], response_mask], 1)  # (B, P+T-1)
    rest = model(
        input_ids=response_ids[:, :-1], attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask)[:, query["input_ids"].shape[1]:],  # (B, T-1)
        cache=cache, use_cache=True,
    ).logits  # (B, T-1, V)
    return torch.cat([first_logits, rest], 1)  # (B, T, V)


def response_logits(
    model: nn.Module, policy: Policy, responses: ResponseTokens, share_prompts: bool = True
) -> torch.Tensor:
    """Logits (B, T, V) with ``logits[:, t]`` predicting ``responses.response_ids[:, t]``.

    ``model`` is ``policy.model`` or a wrapper of it (a DeepSpeed engine): only ``model(**inputs)``
    (and ``policy.model``'s encoder) is called on it; ``policy`` supplies the config and tokenizer.
    Causal models compute logits for the response columns only (``logits_to_keep``), never for
    the (long) prompt. Rows that share a prompt read it once (``_shared_prompt_logits``) unless
    ``share_prompts`` is False (the plain pass it must equal, for tests and benchmarks).
    ``V`` is at most ``len(policy.tokenizer)``: the columns of ids it cannot decode (a padded
    embedding) are sliced off (a view), the ids sampling masks (``rlhf.models.vocab``), so
    log-probs and entropy are those of the sampler's distribution.
    """
    device = module_device(model)
    groups = prompt_groups(responses.query)
    if share_prompts and _shares_prompts(policy, groups):
        logits = _shared_prompt_logits(model, policy, responses, groups, device)
    elif policy.is_encoder_decoder:
        logits = model(**policy_inputs_for(policy, responses, device)).logits  # (B, T, V)
    else:
        inputs = policy_inputs_for(policy, responses, device)
        logits = model(**inputs, logits_to_keep=responses.response_ids.shape[1]).logits  # (B, T, V)
    return known_logits(logits, len(policy.tokenizer))  # (B, T, V), V at most len(tokenizer)


def response_logprobs(
    model: nn.Module,
    policy: Policy,
    responses: ResponseTokens,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, T) of the response tokens under ``softmax(logits / temperature)``, the
    distribution they were sampled from, and its entropy (B, T) if ``with_entropy``, else None.

    Differentiable (call under ``torch.no_grad()`` for the old or reference log-probs); both are
    0 where ``mask == 0``, on the model's device. ``entropy_grad`` False builds the entropy
    without a graph: a reported-only entropy (``entropy_coef == 0``) then keeps no (B, T, V)
    softmax alive for backward. ``share_prompts``: see ``response_logits``.
    """
    logits = response_logits(model, policy, responses, share_prompts)  # (B, T, V)
    logits = temper_logits_(logits, temperature)  # no copy
    padding = responses.mask.to(logits.device) == 0  # (B, T)
    labels = responses.response_ids.to(logits.device)  # (B, T)
    logprobs = token_logprobs(logits, labels).masked_fill(padding, 0.0)  # (B, T)
    if not with_entropy:
        return logprobs, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = token_entropy(logits).masked_fill(padding, 0.0)  # (B, T)
    return logprobs, entropy


def summary_logprobs(
    model: nn.Module, policy: Policy, documents: list[str], summaries: list[str]
) -> torch.Tensor:
    """(B,) sequence log-probs of ``summaries`` under ``model`` (``policy.model`` or its DeepSpeed
    engine); differentiable, on the model's device. Read as PPO reads a sampled response, so
    seq2seq and causal policies, DPO's reference and the implicit-reward eval agree."""
    tokens = encode_summaries(policy, documents, summaries)
    logprobs, _ = response_logprobs(model, policy, tokens)  # (B, T)
    return sequence_logprobs(logprobs, tokens.mask.to(logprobs.device))


def load_frozen_policy(cfg: ModelConfig, dtype: torch.dtype | None = None) -> Policy:
    """A policy that only scores: dropout zeroed, eval mode, no gradients. The DPO reference is a
    fixed target per pair, so it must be deterministic; a cached value computed with dropout would
    be one noisy draw. Also what the implicit-reward eval reads, for the same reason."""
    policy = load_policy(cfg, dtype, dropout=False)
    policy.model.eval().requires_grad_(False)
    return policy


class ImplicitReward:
    """A DPO policy read as a reward model, r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)): the
    ``PairScorer`` (``rlhf.eval.evaluate``) that jobs/eval.py's ``dpo_policy`` and the online loop's
    ``method=dpo`` gate judge, so its numbers are the ones a reward model gets. One score, so one head.
    """

    heads: RewardHeads = "single"

    def __init__(self, policy: Policy, reference: Policy, beta: float):
        self.policy, self.reference, self.beta = policy, reference, beta

    @torch.no_grad()
    def score(
        self, documents: list[str], summaries: list[str], score: RewardScore | None = "total"
    ) -> torch.Tensor:
        """Implicit rewards on the CPU: (B,), or (B, 1) for ``score=None`` (as ``RewardModel.score``)."""
        policy = summary_logprobs(self.policy.model, self.policy, documents, summaries)
        reference = summary_logprobs(self.reference.model, self.reference, documents, summaries)
        reward = (self.beta * (policy - reference)).float().cpu()  # (B,)
        return reward[:, None] if score is None else reward

    def select(self, per_head: torch.Tensor, score: RewardScore) -> torch.Tensor:
        """The one score, whichever kind is asked for."""
        return per_head[:, 0]


def load_implicit_reward(policy: ModelConfig, reference: ModelConfig, beta: float) -> ImplicitReward:
    """Both policies frozen, in eval mode without dropout, in their checkpoints' dtype."""
    return ImplicitReward(load_frozen_policy(policy), load_frozen_policy(reference), beta)
