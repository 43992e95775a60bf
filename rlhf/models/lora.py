"""LoRA adapters through PEFT: which modules each architecture adapts, wrapping, saving, merging.

A policy with ``lora.r > 0`` is a ``peft.PeftModel`` around the base model: only the adapter
tensors train. It is saved either merged (a plain Hugging Face folder that loads without
``peft``) or as an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
whose ``base_model_name_or_path`` names the base it was trained on. ``load_policy`` reads both.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from transformers import PreTrainedModel

from rlhf.config.sections import LoraConfig
from rlhf.errors import InputError

ADAPTER_CONFIG = "adapter_config.json"
AdaptedModel = PeftModel  # what a policy's ``model`` is when it carries adapters
# Families PEFT has no default for: the same choice as its own (queries and values), per attention.
EXTRA_TARGETS: dict[str, list[str]] = {
    "led": ["query", "value", "q_proj", "v_proj"],  # encoder (Longformer) and decoder attention
}


def target_modules(cfg: LoraConfig, model_type: str) -> list[str]:
    """``lora.target_modules``, or the family default (PEFT's table, then ``EXTRA_TARGETS``)."""
    if cfg.target_modules:
        return list(cfg.target_modules)
    default = EXTRA_TARGETS.get(model_type) or PEFT_TARGETS.get(model_type)
    if not default:
        raise InputError(f"lora.target_modules: no default for model type {model_type!r}; name the "
                         "linear layers to adapt, e.g. lora.target_modules=[q_proj,v_proj]")
    return list(default)


def add_adapter(model: PreTrainedModel, cfg: LoraConfig, base_name: str) -> PeftModel:
    """``model`` with fresh LoRA adapters (B = 0, so outputs are unchanged); base weights frozen.

    ``base_name`` (the preset, folder or hub name the base was loaded from) is what a saved
    adapter folder names as its base.
    """
    task = TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM
    peft_config = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type=task,
        target_modules=target_modules(cfg, model.config.model_type),
    )
    training = model.training
    try:
        adapted = get_peft_model(model, peft_config)
    except ValueError as failure:  # PEFT: "Target modules {...} not found in the base model"
        raise InputError(f"lora.target_modules: {failure}") from None
    adapted.peft_config["default"].base_model_name_or_path = base_name
    return adapted.train(training)  # new adapter layers (their dropout) start in train mode


def is_adapter_folder(name_or_path: str) -> bool:
    return (Path(name_or_path) / ADAPTER_CONFIG).is_file()


def adapter_base(folder: str | Path) -> str:
    """The base an adapter folder was trained on (its ``base_model_name_or_path``)."""
    base = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise InputError(f"{folder}: {ADAPTER_CONFIG} names no base_model_name_or_path; set it to the "
                         "base model's hub name or folder")
    return base


def attach_saved_adapter(base: PreTrainedModel, folder: str | Path) -> PeftModel:
    """The adapter saved in ``folder`` on ``base`` (frozen: for inference or a merge)."""
    return PeftModel.from_pretrained(base, str(folder), is_trainable=False)


def merged(model: AdaptedModel) -> PreTrainedModel:
    """A copy of the base with the adapter folded into its weights; ``model`` is left as it is."""
    return copy.deepcopy(model).merge_and_unload()
