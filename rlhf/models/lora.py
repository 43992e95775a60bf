"""LoRA adapters through PEFT: which modules each architecture adapts, wrapping, saving, merging.

A policy with ``lora.r > 0`` is a ``peft.PeftModel`` around the base model: only the adapter
tensors train. It is saved either merged (a plain Hugging Face folder that loads without
``peft``) or as an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
whose ``base_model_name_or_path`` names the base it was trained on and whose ``base.json`` holds
that base's fingerprint. ``load_policy`` reads both; Serve attaches adapter versions to one base.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import transpose
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from transformers import PreTrainedModel

from rlhf.config.sections import LoraConfig
from rlhf.errors import InputError
from rlhf.models.offline import resolve_name_or_path
from rlhf.models.tiny import is_tiny_preset

ADAPTER_CONFIG = "adapter_config.json"
BASE_FILE = "base.json"  # beside ADAPTER_CONFIG: the base's name and fingerprint when it was saved
AdaptedModel = PeftModel  # what a policy's ``model`` is when it carries adapters
StateDict = dict[str, torch.Tensor]
PEFT_PREFIX = "base_model.model."  # before the base's own names in a PeftModel's state dict
ADAPTER_KEY = "lora_"  # in the state-dict name of every adapter tensor (PEFT's own filter)
# Families PEFT has no default for: the same choice as its own (queries and values), per attention.
EXTRA_TARGETS: dict[str, list[str]] = {
    "led": ["query", "value", "q_proj", "v_proj"],  # encoder (Longformer) and decoder attention
}
BASE_ROWS = "__base__"  # PEFT's adapter name for batch rows that run the base without an adapter
# Families whose adapted layers see (sequence, batch, features) inputs (LED's Longformer encoder
# attention): PEFT's per-row ``adapter_names`` assumes the batch first, so they run one adapter a call.
SEQUENCE_FIRST = {"led"}


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
        # peft annotates lora_alpha as int; it only divides it by r, so our float alpha is fine
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type=task,  # type: ignore[arg-type]
        target_modules=target_modules(cfg, model.config.model_type),
    )
    adapted = _wrap(model, peft_config)
    adapted.peft_config["default"].base_model_name_or_path = base_name
    return adapted


def add_backbone_adapter(backbone: PreTrainedModel, cfg: LoraConfig) -> PeftModel:
    """A scalar-head model's backbone (no LM head) with fresh adapters, base frozen; the head
    outside it stays fully trainable (reward and value models)."""
    peft_config = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,  # type: ignore[arg-type]  # as above
        target_modules=target_modules(cfg, backbone.config.model_type),
    )
    return _wrap(backbone, peft_config)


def _wrap(model: PreTrainedModel, peft_config: PeftLoraConfig) -> PeftModel:
    """``get_peft_model`` with the adapters in the base's dtype, in the mode ``model`` was in.

    Not PEFT's fp32 upcast of adapters on a bf16 base: ZeRO-3 flattens the learner's partitions
    one dtype per buffer (mixed dtypes fail in ``deepspeed.initialize``; ZeRO 0-2 cast them to bf16
    anyway), and the generators' adapters must have the learner's dtype for a weight sync.
    Under ZeRO-3 the adapters are created outside ``zero.Init`` (PEFT initialises them: A random,
    B = 0); ``deepspeed.initialize`` broadcasts rank 0's values and partitions them.
    """
    training = model.training
    try:
        adapted = get_peft_model(model, peft_config, autocast_adapter_dtype=False)
    except ValueError as failure:  # PEFT: "Target modules {...} not found in the base model"
        raise InputError(f"lora.target_modules: {failure}") from None
    return adapted.train(training)  # new adapter layers (their dropout) start in train mode


def without_dropout(cfg: LoraConfig) -> LoraConfig:
    """``cfg`` for an RL role: adapters without dropout, like every other module there."""
    return dataclasses.replace(cfg, dropout=0.0)


def is_adapter_folder(name_or_path: str) -> bool:
    return (Path(name_or_path) / ADAPTER_CONFIG).is_file()


def _named_base(folder: str | Path) -> str:
    base = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise InputError(f"{folder}: {ADAPTER_CONFIG} names no base_model_name_or_path; set it to the "
                         "base model's hub name or folder")
    return base


def adapter_base(folder: str | Path) -> str:
    """The base an adapter folder was trained on (its ``base_model_name_or_path``), refused when
    its weights are not those the adapter was saved with: the adapter would run on another model."""
    base = _named_base(folder)
    recorded = recorded_base_fingerprint(folder)
    if recorded is not None and (actual := base_fingerprint(base)) != recorded:
        raise InputError(f"{folder}: its base {base} changed since the adapter was saved ({BASE_FILE} "
                         f"records {recorded[:20]}..., the base is now {actual[:20]}...); point "
                         f"base_model_name_or_path in {ADAPTER_CONFIG} at the original base, or retrain")
    return base


def base_fingerprint(name_or_path: str) -> str:
    """What identifies a base's weights. Recorded in an adapter folder's ``base.json``, it lets
    Serve see that adapters share one base (loaded once) and refuse one whose base changed.

    A folder (a registry version too): ``sha256:`` over its ``*.safetensors`` files, names and
    bytes. A tiny preset: ``preset:NAME`` (always built from one seed). A hub name:
    ``name:NAME``, taken at its word (save the base to a folder to pin its content).
    """
    if is_tiny_preset(name_or_path):
        return f"preset:{name_or_path}"
    folder = Path(resolve_name_or_path(name_or_path))
    if not folder.is_dir():
        return f"name:{name_or_path}"
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder}: no *.safetensors weights to fingerprint the base by; save the base "
                         "with save_pretrained (safetensors)")
    return _sha256(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=16)
def _sha256(files: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over (name, bytes) of ``files``; cached by (path, size, mtime), so one base is read
    once per process however many adapters name it."""
    digest = hashlib.sha256()
    for path, _size, _mtime in files:
        digest.update(Path(path).name.encode())
        with open(path, "rb") as stream:
            while chunk := stream.read(1 << 24):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def record_base(folder: str | Path) -> None:
    """Write ``base.json`` into a saved adapter folder: its base's name and fingerprint."""
    base = _named_base(folder)
    identity = {"name_or_path": base, "fingerprint": base_fingerprint(base)}
    (Path(folder) / BASE_FILE).write_text(json.dumps(identity, indent=2) + "\n")


def recorded_base_fingerprint(folder: str | Path) -> str | None:
    """The base fingerprint saved with an adapter; None for folders saved before ``base.json``."""
    path = Path(folder) / BASE_FILE
    return json.loads(path.read_text())["fingerprint"] if path.is_file() else None


def attach_saved_adapter(
    model: PreTrainedModel | PeftModel, folder: str | Path, name: str = "default"
) -> PeftModel:
    """The adapter saved in ``folder`` added to ``model`` as ``name`` (frozen: for inference or a
    merge); a ``PeftModel`` keeps the adapters it has, so one base serves several versions."""
    if isinstance(model, PeftModel):
        model.load_adapter(str(folder), adapter_name=name, is_trainable=False)  # and eval mode
        return model
    return PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)


def remove_adapter(model: PeftModel, name: str) -> PreTrainedModel | PeftModel:
    """``model`` without adapter ``name``; the bare base once it was the last one (a PeftModel
    with no adapter left cannot generate)."""
    if list(model.peft_config) == [name]:
        return model.unload()
    model.delete_adapter(name)
    return model


def mixes_adapters(model: PreTrainedModel | PeftModel) -> bool:
    """Whether one ``generate`` call can run a different adapter on each row of ``model``."""
    return model.config.model_type not in SEQUENCE_FIRST


@contextmanager
def adapters_for_rows(
    model: PreTrainedModel | PeftModel, adapters: list[str | None]
) -> Iterator[dict[str, list[str]]]:
    """``generate`` options that run row i with adapter ``adapters[i]`` (None: the bare base).

    PEFT's mixed-adapter batch (``adapter_names``) where ``mixes_adapters``; otherwise every row
    must name the same adapter, made the active one for the block (all off for the base), so the
    caller holds the model alone meanwhile. A model without adapters needs no option.
    """
    if not isinstance(model, PeftModel):
        yield {}
    elif mixes_adapters(model):
        yield {"adapter_names": [adapter or BASE_ROWS for adapter in adapters]}
    else:
        (adapter,) = set(adapters)  # one per call: the caller groups rows by adapter
        if adapter is None:
            with model.disable_adapter():
                yield {}
        else:
            model.set_adapter(adapter, inference_mode=True)
            yield {}


def adapter_names(names: Iterable[str]) -> list[str]:
    """The adapter tensors among a PeftModel's state-dict ``names``: what an adapter folder holds."""
    return [name for name in names if ADAPTER_KEY in name]


def base_of(model: AdaptedModel) -> PreTrainedModel:
    """The model under the adapters (peft types it as any ``nn.Module``)."""
    base = model.get_base_model()
    assert isinstance(base, PreTrainedModel)  # every adapted model here wraps a transformers model
    return base


def merged_state(model: AdaptedModel, tensors: StateDict) -> StateDict:
    """The base's state dict, under its own names, with the active adapters folded in: what
    ``merge_and_unload`` gives, computed from ``tensors`` (``model``'s state dict: live tensors, or
    a ZeRO-3 learner's gathered host copies), so the model is neither copied nor changed.

    Each adapted weight becomes W + scaling * B @ A (transposed for fan-in-fan-out layers such as
    GPT-2's Conv1D), in fp32 and rounded once to W's dtype; adapter tensors are dropped.
    """
    state = dict(tensors)
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if f"{name}.base_layer.weight" not in state:  # listed under the tensor it is tied to
            raise InputError(f"lora.target_modules: {name.removeprefix(PEFT_PREFIX)} shares its weight "
                             "with another module (tied embeddings), so a merged save would change both; "
                             "leave it out of lora.target_modules or set lora.publish=adapter")
        weight = state.pop(f"{name}.base_layer.weight")
        delta = sum(transpose(state[f"{name}.lora_B.{adapter}.weight"].float()
                              @ state[f"{name}.lora_A.{adapter}.weight"].float(),
                              layer.fan_in_fan_out)  # type: ignore[attr-defined]  # set by each layer kind
                    * layer.scaling[adapter] for adapter in layer.active_adapters)
        state[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
        if (bias := state.pop(f"{name}.base_layer.bias", None)) is not None:
            state[f"{name}.bias"] = bias
    return {name.removeprefix(PEFT_PREFIX): tensor for name, tensor in state.items()
            if ADAPTER_KEY not in name}
