"""DeepSpeed on top of a Ray Train worker or a PPO learner: its JSON config, the LR schedule, the engine.

Kept apart from the loop so the PPO learner builds its engines the same way as SFT and reward training.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from rlhf.config.sections import DeepSpeedConfig
from rlhf.models.policy import resolve_dtype
from rlhf.runtime import compute_device, import_deepspeed
from rlhf.train.config import TrainConfig


def deepspeed_config(
    zero: DeepSpeedConfig, *, micro_batch_size: int, lr: float, max_grad_norm: float, bf16: bool,
    grad_accum_steps: int = 1, weight_decay: float = 0.0,
) -> dict[str, Any]:
    """The DeepSpeed JSON config of a learner: ZeRO settings ``zero`` with AdamW.

    ``torch_adam`` and ``zero_force_ds_cpu_optimizer: false`` avoid JIT-compiling DeepSpeed's
    CPU Adam op (30-60 s).
    """
    section: dict[str, Any] = {"stage": zero.zero_stage}
    if zero.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": bf16}
    if zero.offload_params:
        section["offload_param"] = {"device": "cpu", "pin_memory": bf16}
    if zero.zero_stage == 3:
        # Partition every parameter, even tiny ones, so small runs exercise real sharding.
        section["stage3_param_persistence_threshold"] = 0
        section["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": max_grad_norm,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True},
        },
        "zero_optimization": section,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def training_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config of a supervised run; bf16 as ``train.dtype`` resolves (auto: GPU only).

    Decided from the config alone (Ray Train gives a ``use_gpu`` worker its GPU), so the flag is
    the same wherever the config is built.
    """
    device = compute_device(1.0 if cfg.use_gpu else 0.0, cuda_available=True)
    return deepspeed_config(
        cfg.deepspeed, micro_batch_size=cfg.batch_size, lr=cfg.lr, max_grad_norm=cfg.max_grad_norm,
        bf16=resolve_dtype(cfg.dtype, device) == torch.bfloat16, grad_accum_steps=cfg.grad_accum_steps,
        weight_decay=cfg.weight_decay,
    )


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step ``s``: warmup, then linear/cosine/constant."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


@contextlib.contextmanager
def zero3_init_context(ds_config: dict[str, Any]) -> Iterator[None]:
    """While open, Hugging Face ``from_pretrained``/``from_config`` partition weights at init."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    import_deepspeed()  # before transformers' zero.Init starts deepspeed.comm

    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds a weak reference to it
    try:
        yield
    finally:
        del keep_alive


def initialize(
    model: nn.Module, ds_config: dict[str, Any], lr_factor: Callable[[int], float] | None = None
) -> tuple[Any, Any]:
    """A DeepSpeed engine for ``model``; ``lr_factor(step)`` scales the LR (None = constant)."""
    engine, optimizer, _, scheduler = import_deepspeed().initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor or (lambda _: 1.0)),
    )
    if ds_config["bf16"]["enabled"]:
        cast_state_buffers(model, torch.bfloat16)
    return engine, scheduler


def cast_state_buffers(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating buffers saved in the state dict (BART/LED ``final_logits_bias``) to ``dtype``.

    DeepSpeed's bf16 casts parameters only, so without this the learner's state dict mixes
    dtypes and neither matches a bf16 rollout copy (weight sync) nor saves as one dtype.
    Non-persistent buffers (rotary ``inv_freq``) keep their precision.
    """
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if (buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype
                    and name not in module._non_persistent_buffers_set):
                module._buffers[name] = buffer.to(dtype)
