"""From models to PPO tensors: sample responses, then score exactly those tokens.

Every response-aligned tensor here is ``(B, T)``, right-padded with the pad id, and ``mask`` is
1.0 on response tokens (the first EOS included) and 0.0 after, as in ``rlhf.ppo.functional``.
A ``Rollout`` is scored by ``rlhf.models.scoring`` (it has the fields of its ``ResponseTokens``),
which lines up seq2seq and causal outputs with the response tokens: ``response_logprobs`` is
that module's, the one DPO and eval read given summaries with; ``response_values`` feeds the
value model the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from rlhf.models.encoding import ModelKind
from rlhf.models.heads import ValueModel, positions_from_mask
from rlhf.models.policy import Policy
from rlhf.models.scoring import PromptGroups, module_device, policy_inputs_for, prompt_groups
from rlhf.models.scoring import response_logprobs as response_logprobs  # what PPO's roles import

# Hub generation configs often ask for beam search, repetition penalties, banned n-grams or a
# forced first/last token (BART configs force EOS at max length). Each changes the distribution
# tokens are drawn from, so the log-probs PPO computes would no longer be those of the samples.
# These values switch all of them off; passed as keyword arguments they override the model's
# generation config (a GenerationConfig object would inherit every field it leaves None).
_PLAIN_SAMPLING: dict[str, Any] = {
    "do_sample": True,
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "typical_p": 1.0,
    "min_p": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "exponential_decay_length_penalty": None,
    "guidance_scale": None,
}


@dataclass
class Rollout:
    """Sampled summaries of a batch of documents, as token tensors ready for scoring."""

    documents: list[str]
    summaries: list[str]  # decoded responses, special tokens skipped
    query: dict[str, torch.Tensor]  # policy inputs from Policy.encode_documents: (B, S) each
    response_ids: torch.Tensor  # (B, T) long, right-padded with the pad id
    mask: torch.Tensor  # (B, T) float, 1.0 on response tokens incl. the first EOS
    ended: torch.Tensor  # (B,) bool, True where the response emitted EOS
    pad_token_id: int  # fills response_ids and query input_ids, for ``concat``
    query_padding_side: Literal["left", "right"]  # causal prompts: left; encoder inputs: right

    def to(self, device: torch.device | str) -> Rollout:
        """A copy with every tensor on ``device``."""
        return replace(
            self,
            query={name: tensor.to(device) for name, tensor in self.query.items()},
            response_ids=self.response_ids.to(device),
            mask=self.mask.to(device),
            ended=self.ended.to(device),
        )

    @classmethod
    def concat(cls, parts: list[Rollout]) -> Rollout:
        """The rows of ``parts`` in order (e.g. shards from several rollout workers), each tensor
        padded to the widest part on its own padding side: (sum of B, max S) and (sum of B, max T).
        """
        first = parts[0]
        query = {
            name: _pad_cat(
                [part.query[name] for part in parts],
                first.pad_token_id if name == "input_ids" else 0,
                first.query_padding_side,
            )
            for name in first.query
        }
        return replace(
            first,
            documents=[document for part in parts for document in part.documents],
            summaries=[summary for part in parts for summary in part.summaries],
            query=query,
            response_ids=_pad_cat([part.response_ids for part in parts], first.pad_token_id, "right"),
            mask=_pad_cat([part.mask for part in parts], 0, "right"),
            ended=torch.cat([part.ended for part in parts]),
        )

    def select(self, index: torch.Tensor | slice) -> Rollout:
        """The rows ``index`` (a slice, or a (K,) tensor of row ids or (B,) bool mask).

        Widths are kept, not trimmed to the longest kept row, so the selection stays aligned
        with (B, T) tensors computed on the whole rollout (old log-probs, values, advantages)
        that the caller indexes with the same ``index``. Extra padding costs compute only.
        """
        rows = torch.arange(len(self.documents))[index].tolist()
        return replace(
            self,
            documents=[self.documents[i] for i in rows],
            summaries=[self.summaries[i] for i in rows],
            query={name: tensor[index] for name, tensor in self.query.items()},
            response_ids=self.response_ids[index],
            mask=self.mask[index],
            ended=self.ended[index],
        )


def _pad_cat(tensors: list[torch.Tensor], value: int, side: str) -> torch.Tensor:
    """(B_i, T_i) tensors -> (sum B_i, max T_i), each padded with ``value`` on ``side``."""
    width = max(tensor.shape[1] for tensor in tensors)
    pads = [(width - t.shape[1], 0) if side == "left" else (0, width - t.shape[1]) for t in tensors]
    return torch.cat([nn.functional.pad(t, pad, value=value) for t, pad in zip(tensors, pads)])


def response_mask(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, T) float: 1.0 up to and including each row's first EOS, 0.0 after it.

    Computed from EOS positions, never from ``!= pad``: many causal tokenizers use EOS as pad.
    """
    is_eos = (response_ids == eos_token_id).long()  # (B, T)
    eos_before = is_eos.cumsum(1) - is_eos  # (B, T) EOS count strictly before each column
    return (eos_before == 0).float()


@torch.no_grad()
def generate_rollout(
    policy: Policy,
    documents: list[str],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int | None = None,
    min_new_tokens: int = 0,
    synced_gpus: bool = False,
    stop_at_eos: bool = True,
    share_prompts: bool = True,
) -> Rollout:
    """Sample one response per document from ``policy.model`` (plain ancestral sampling).

    Only ``temperature``, ``top_p``, ``top_k`` (0: off) and ``min_new_tokens`` (EOS banned
    before it) shape the distribution; the model's generation config cannot add anything (see
    ``_PLAIN_SAMPLING``). Ids the tokenizer cannot decode are never sampled: ``logits`` below
    are masked by ``rlhf.models.vocab`` (``response_logits`` in ``rlhf.models.scoring`` drops the
    same ids). With top_p=1, top_k=0 and min_new_tokens=0 the samples come exactly from
    ``softmax(logits / temperature)``, what ``response_logprobs`` scores.
    ``max_new_tokens`` defaults to ``policy.max_target_length``. ``synced_gpus`` must be True
    under ZeRO-3 so that ranks that finish early keep joining the sharded forward passes.

    stop_at_eos=False generates exactly ``max_new_tokens`` tokens per row (TRL's fixed-length
    benchmark setting): EOS is not a stop token, its probability is left untouched (rather than
    banned, which would change the distribution), every token is in the mask, and ``ended``
    says whether an EOS was sampled anywhere.

    Repeated documents (``ppo.samples_per_document``) are read once (``shared_prompt_inputs``)
    unless ``share_prompts`` is False; the samples are the same either way.
    """
    model, tokenizer = policy.model, policy.tokenizer
    query = {name: tensor.cpu() for name, tensor in policy.encode_documents(documents).items()}
    inputs = {name: tensor.to(model.device) for name, tensor in query.items()}
    groups = prompt_groups(query)
    if share_prompts and groups.shared:
        inputs.update(shared_prompt_inputs(policy, inputs, groups))
    # PeftModel forwards generate to the model it wraps (untyped __getattr__)
    output = model.generate(
        **inputs,
        **_PLAIN_SAMPLING,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens or policy.max_target_length,
        min_new_tokens=min_new_tokens,
        eos_token_id=tokenizer.eos_token_id if stop_at_eos else None,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=policy.logits_processors(),
        synced_gpus=synced_gpus,
    ).cpu()  # (B, prefix + T): seq2seq prefix is the start token, causal prefix the prompt
    return _sampled_rollout(policy, documents, query, output, stop_at_eos)


def _sampled_rollout(
    policy: Policy, documents: list[str], query: dict[str, torch.Tensor], output: torch.Tensor,
    stop_at_eos: bool,
) -> Rollout:
    """The ``Rollout`` of ``generate``'s ``output`` (B, prefix + T) for ``query`` (on the CPU)."""
    tokenizer = policy.tokenizer
    prefix = 1 if policy.is_encoder_decoder else query["input_ids"].shape[1]
    response_ids = output[:, prefix:]  # (B, T), generate pads each row after its EOS
    if stop_at_eos:
        mask = response_mask(response_ids, tokenizer.eos_token_id)  # (B, T)
    else:
        mask = torch.ones(response_ids.shape)  # (B, T)
    return Rollout(
        documents=list(documents),
        summaries=tokenizer.batch_decode(response_ids, skip_special_tokens=True),
        query=query,
        response_ids=response_ids,
        mask=mask,
        ended=(response_ids == tokenizer.eos_token_id).any(1),  # (B,)
        pad_token_id=tokenizer.pad_token_id,
        query_padding_side="right" if policy.is_encoder_decoder else "left",
    )


@torch.no_grad()
def shared_prompt_inputs(
    policy: Policy, inputs: dict[str, torch.Tensor], groups: PromptGroups
) -> dict[str, Any]:
    """What ``generate`` takes to skip reading a prompt more than once: the encoder's states of the
    distinct documents (seq2seq), or the KV cache of each distinct prompt but its last token
    (causal: ``generate`` then reads that one column per row), indexed out to every row.

    For GRPO's k samples per document this turns k prompt passes into one, the bulk of the
    rollout's compute when prompts are long and responses short.
    """
    first, of_row = groups.first.to(policy.model.device), groups.of_row.to(policy.model.device)
    if policy.is_encoder_decoder:
        states = policy.model.get_encoder()(**{name: tensor[first] for name, tensor in inputs.items()})
        return {"encoder_outputs": BaseModelOutput(last_hidden_state=states.last_hidden_state[of_row])}
    prefix_mask = inputs["attention_mask"][first, :-1]  # (G, P-1)
    if prefix_mask.shape[1] == 0:
        return {}
    prefix = policy.model(
        input_ids=inputs["input_ids"][first, :-1], attention_mask=prefix_mask,
        position_ids=positions_from_mask(prefix_mask), use_cache=True, logits_to_keep=1,
    )
    prefix.cache.batch_select_indices(of_row)  # (G, ...) -> (B, ...)
    return {"cache": prefix.cache}


def _check_value_model(value_model: ValueModel, policy: Policy) -> None:
    """The value model must read the policy's tokens the policy's way (reward models need not)."""
    if len(value_model.tokenizer) != len(policy.tokenizer):
        raise ValueError(
            f"the value model's tokenizer has {len(value_model.tokenizer)} tokens, the policy's "
            f"{len(policy.tokenizer)}: PPO values the policy's own response tokens, so the value "
            "model must use the policy's tokenizer"
        )
    wanted = ModelKind.ENCODER_DECODER if policy.is_encoder_decoder else ModelKind.DECODER
    if value_model.kind is not wanted:
        raise ValueError(
            f"the value model is {value_model.kind.value!r} but the policy is {wanted.value!r}: "
            "per-token values need a backbone that reads the response the way the policy does"
        )


def response_values(value_model: ValueModel, rollout: Rollout, policy: Policy) -> torch.Tensor:
    """Values (B, T): ``values[:, t]`` is the value of the state before ``response_ids[:, t]``
    (document + response[:t]), 0 where ``mask == 0``. Differentiable, like ``response_logprobs``.

    The value model gets the policy's inputs (``policy_inputs`` in ``rlhf.models.scoring``), so it
    must share the policy's tokenizer and kind; otherwise ValueError.
    """
    _check_value_model(value_model, policy)
    inputs = policy_inputs_for(policy, rollout, module_device(value_model))
    values = value_model(**inputs)  # (B, P+T-1) or (B, T)
    values = values[:, -rollout.response_ids.shape[1]:]  # (B, T)
    return values.masked_fill(rollout.mask.to(values.device) == 0, 0.0)
