"""The summarization policy: a seq2seq (T5/BART/LED) or causal (GPT-2/Llama) LM plus its tokenizer."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BatchEncoding,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.config.sections import DType, LoraConfig, LoraPublish, ModelConfig
from rlhf.models.dropout import (
    checkpoint_config,
    checkpoint_dropout_restored,
    disable_dropout_modules,
)
from rlhf.models.encoding import (
    Limits,
    encode_causal_pairs,
    encode_causal_prompts,
    encode_seq2seq_pairs,
    encode_sources,
    led_attention_window,
    limits_for,
    new_token_room,
    truncated_documents,
)
from rlhf.models.lora import (
    AdaptedModel,
    adapter_base,
    add_adapter,
    attach_saved_adapter,
    base_of,
    is_adapter_folder,
    merged_state,
    record_base,
)
from rlhf.models.offline import resolve_name_or_path
from rlhf.models.tiny import build_tiny_lm, is_tiny_preset
from rlhf.models.tokenizer import load_tokenizer
from rlhf.models.vocab import with_known_ids_only

logger = logging.getLogger(__name__)


class Policy:
    """A language model with the encoding rules that go with it.

    Not an nn.Module: trainers and DeepSpeed wrap ``model`` itself; this class only keeps the
    model, its tokenizer and its length limits together so every role encodes text the same way.
    """

    def __init__(
        self,
        model: PreTrainedModel | AdaptedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_source_length: int,
        max_target_length: int,
        checkpoint_dropout: dict[str, float] | None = None,
    ) -> None:
        self.model = model
        # The dropout the checkpoint has when this copy was built without it (RL roles): saved
        # back into its config, so the published folder is the same model for a later SFT run.
        self.checkpoint_dropout = checkpoint_dropout or {}
        self.tokenizer = tokenizer
        self.is_encoder_decoder: bool = bool(model.config.is_encoder_decoder)
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.limits: Limits = limits_for(model.config, max_source_length, max_target_length)
        self.led_window = led_attention_window(model.config)

    def encode_documents(self, documents: list[str]) -> BatchEncoding:
        """Generation inputs for ``model.generate``, documents cut to ``limits.source``.

        Seq2seq: encoder inputs, right-padded (+ ``global_attention_mask`` for LED).
        Causal: ``document + CAUSAL_SEPARATOR``, LEFT-padded, so generated tokens follow each
        prompt directly; the generated part of a row starts at column ``input_ids.shape[1]``.
        """
        if self.is_encoder_decoder:
            return encode_sources(self.tokenizer, documents, self.limits.source, self.led_window)
        return encode_causal_prompts(self.tokenizer, documents, self.limits.source)

    def truncated(self, documents: list[str]) -> list[bool]:
        """Which documents ``encode_documents`` cuts to ``limits.source`` (the API reports it)."""
        return truncated_documents(self.tokenizer, documents, self.limits.source, not self.is_encoder_decoder)

    def encode_pairs(self, documents: list[str], summaries: list[str]) -> dict[str, torch.Tensor]:
        """Training inputs with ``labels`` (right-padded); ``model(**batch).loss`` is the SFT loss.

        Seq2seq: labels are the summary + eos, -100 on padding. Causal: ``input_ids`` is prompt +
        summary + eos and labels are -100 on the prompt and padding, so the loss is on the
        summary only. Only documents are cut to fit; summaries only to ``max_target_length``.
        """
        if self.is_encoder_decoder:
            return encode_seq2seq_pairs(
                self.tokenizer, documents, summaries, self.limits, self.led_window
            )
        return encode_causal_pairs(self.tokenizer, documents, summaries, self.limits)

    def logits_processors(self, extra: LogitsProcessorList | None = None) -> LogitsProcessorList:
        """``logits_processor=`` for every ``model.generate`` of this policy: ``extra``, then the
        mask of ids its tokenizer cannot decode (``rlhf.models.vocab``; the embedding may be larger)."""
        return with_known_ids_only(len(self.tokenizer), extra)

    @torch.no_grad()
    def generate(self, documents: list[str], **gen_kwargs: Any) -> list[str]:
        """Summaries as text, without the prompt; ``gen_kwargs`` go to ``model.generate``, which
        never picks an id the tokenizer cannot decode (``logits_processors``)."""
        batch = self.encode_documents(documents).to(self.model.device)
        gen_kwargs.setdefault("max_new_tokens", self.max_target_length)
        room = new_token_room(self.model.config, self.limits)
        if room is not None and gen_kwargs["max_new_tokens"] > room:  # past the position table
            gen_kwargs["max_new_tokens"] = room
        gen_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        gen_kwargs["logits_processor"] = self.logits_processors(gen_kwargs.get("logits_processor"))
        # PeftModel forwards generate to the model it wraps (untyped __getattr__)
        output = self.model.generate(**batch, **gen_kwargs)  # (B, T_out)
        if not self.is_encoder_decoder:
            output = output[:, batch["input_ids"].shape[1]:]  # drop the left-padded prompt
        return self.tokenizer.batch_decode(output, skip_special_tokens=True)

    @property
    def adapted(self) -> bool:
        """True when ``model`` carries LoRA adapters (``lora.r > 0``)."""
        return isinstance(self.model, AdaptedModel)

    def save(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Hugging Face layout (config, safetensors, generation config, tokenizer); the config
        records the checkpoint's dropout even when this copy runs without it (RL roles).

        ``state_dict`` replaces the model's own tensors (a ZeRO-3 learner's gathered copies, under
        the model's names). An adapted model is saved merged (``merged_state``): the folder loads
        without ``peft``.
        """
        model = self.model
        if isinstance(model, AdaptedModel):
            state_dict = merged_state(model, model.state_dict() if state_dict is None else state_dict)
            model = base_of(model)
        with checkpoint_dropout_restored(model.config, self.checkpoint_dropout):
            model.save_pretrained(str(path), state_dict=state_dict)
        self.tokenizer.save_pretrained(str(path))

    def saves_adapter(self, publish: LoraPublish) -> bool:
        """Whether ``save_trained`` writes an adapter folder (else a full model)."""
        return self.adapted and publish == "adapter"

    def save_trained(
        self, path: str | Path, publish: LoraPublish, state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """A trained policy as ``lora.publish`` says: the adapter folder, or a full (merged) model;
        ``state_dict``: gathered copies of what that needs (the adapters alone for an adapter folder)."""
        if self.saves_adapter(publish):
            self.save_adapter(path, state_dict)
        else:
            self.save(path, state_dict)

    def save_adapter(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The adapter folder (``adapter_config.json`` naming its base, adapter weights, ``base.json``
        with the base's fingerprint, so a changed base is refused) + tokenizer; ``state_dict``: the
        adapters' gathered copies under the model's names (ZeRO-3), else the live ones are saved."""
        if not isinstance(self.model, AdaptedModel):
            raise ValueError("Policy.save_adapter: this policy has no adapter (lora.r is 0)")
        self.model.save_pretrained(str(path), state_dict=state_dict)
        record_base(path)
        self.tokenizer.save_pretrained(str(path))


def _load_model(
    name_or_path: str, dtype: torch.dtype | None, dropout: bool = True
) -> tuple[PreTrainedModel, dict[str, float]]:
    """(model, the checkpoint's dropout probabilities that were zeroed: empty with ``dropout``).

    Preset, folder or hub name; seq2seq vs causal is read from the config, never guessed. An
    adapter folder (``lora.publish=adapter``) loads its base with the adapter merged in.
    ``use_safetensors=True`` refuses pickled ``.bin`` weights, which could run code on load.
    ``dropout`` False zeroes every dropout probability before the model is built (RL roles).
    """
    zeroed: dict[str, float] = {}
    if is_adapter_folder(name_or_path):
        base, zeroed = _load_model(resolve_name_or_path(adapter_base(name_or_path)), dtype, dropout)
        return attach_saved_adapter(base, name_or_path).merge_and_unload(), zeroed
    if is_tiny_preset(name_or_path):
        model = build_tiny_lm(name_or_path, dropout=dropout)
        model = model if dtype is None else model.to(dtype)
    else:
        config, zeroed = checkpoint_config(name_or_path, dropout)
        auto_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto_class.from_pretrained(name_or_path, config=config, dtype=dtype, use_safetensors=True)
    if not dropout:
        disable_dropout_modules(model)
    return model, zeroed


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in backward; transformers 5 renamed the method (old name warns)."""
    model.config.use_cache = False  # a KV cache is useless, and refused, when recomputing
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()


def resolve_dtype(setting: DType, device: torch.device) -> torch.dtype:
    """``roles.dtype``/``train.dtype`` on ``device``: ``auto`` is bf16 on GPU and fp32 on CPU.

    One rule for every role, so frozen copies hold the dtype the DeepSpeed learner trains in and
    a weight sync moves tensors as they are.
    """
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if setting == "bf16" and device.type == "cpu":
        _warn_if_slow_bf16(cpu_flags())
    return torch.bfloat16 if setting == "bf16" else torch.float32


@functools.cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (empty where the system does not list them); read once."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def has_native_bf16(flags: frozenset[str]) -> bool | None:
    """Whether the CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX); None: unknown."""
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@functools.cache
def _warn_if_slow_bf16(flags: frozenset[str]) -> None:
    """Once per process: bf16 on a CPU without native bf16 falls back to a kernel that measured
    ~70x slower than fp32 (a 2048x768x768 matmul: 2.2 s against 31 ms, AVX2-only EPYC, torch 2.13)."""
    if has_native_bf16(flags) is False:
        logger.warning("dtype=bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 flag): its "
                       "matrix products run ~70x slower than fp32 here; set the dtype to fp32 (or auto) "
                       "on this machine, bf16 on a GPU or a CPU that has them")


def inference_dtype(device: torch.device) -> torch.dtype:
    """Weights for generation and scoring where no dtype is configured (Serve): ``auto``."""
    return resolve_dtype("auto", device)


def load_policy(
    cfg: ModelConfig, dtype: torch.dtype | None = None, dropout: bool = True, lora: LoraConfig | None = None
) -> Policy:
    """The policy named by ``cfg.name_or_path``; ``dtype`` None keeps the checkpoint's dtype.

    ``dropout`` True keeps the checkpoint's dropout (SFT); PPO roles pass False, see
    ``rlhf.models.dropout``. ``lora`` with ``r > 0`` adds fresh adapters and freezes the base.
    """
    name = resolve_name_or_path(cfg.name_or_path)
    base, zeroed = _load_model(name, dtype, dropout)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(base)
    model: PreTrainedModel | AdaptedModel = base
    if lora is not None and lora.r > 0:
        if cfg.gradient_checkpointing:
            base.enable_input_require_grads()  # frozen embeddings: recomputed blocks still need grads
        model = add_adapter(base, lora, cfg.name_or_path)
    tokenizer = load_tokenizer(name)
    return Policy(model, tokenizer, cfg.max_source_length, cfg.max_target_length, zeroed)
