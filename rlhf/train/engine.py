"""DeepSpeed on top of a Ray Train worker: config, engine, and gathering full weights.

Kept apart from the loop so the PPO learner can build its engines the same way, and sync and save
a ZeRO-3 model with the same bucket-by-bucket gathers (``gathered_buckets``, ``save_gathered``).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rlhf.config.sections import DeepSpeedConfig, LoraPublish
from rlhf.models.lora import StateDict, adapter_names
from rlhf.models.policy import Policy, resolve_dtype
from rlhf.train.config import TrainConfig

Gather = Callable[[list[torch.Tensor]], AbstractContextManager[None]]  # full values inside (ZeRO-3 shards)
BUCKET_MB = 256.0  # roles.sync_bucket_mb: keeps the link busy without a second copy of the model


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
    """The DeepSpeed config of a supervised run; bf16 as ``train.dtype`` resolves (auto: GPU only)."""
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    return deepspeed_config(
        cfg.deepspeed, micro_batch_size=cfg.batch_size, lr=cfg.lr, max_grad_norm=cfg.max_grad_norm,
        bf16=resolve_dtype(cfg.dtype, device) == torch.bfloat16, grad_accum_steps=cfg.grad_accum_steps,
        weight_decay=cfg.weight_decay,
    )


def lr_lambda(cfg: TrainConfig):
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


def disable_shm_comm_op() -> None:
    """Skip DeepSpeed's shared-memory comm op: gloo does not need it and it JIT-compiles ~43 s."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@contextlib.contextmanager
def zero3_init_context(ds_config: dict[str, Any]) -> Iterator[None]:
    """While open, Hugging Face ``from_pretrained``/``from_config`` partition weights at init."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds a weak reference to it
    try:
        yield
    finally:
        del keep_alive


def initialize(model: nn.Module, ds_config: dict[str, Any], lr_factor: Callable[[int], float] | None = None):
    """A DeepSpeed engine for ``model``; ``lr_factor(step)`` scales the LR (None = constant)."""
    import deepspeed

    disable_shm_comm_op()
    engine, optimizer, _, scheduler = deepspeed.initialize(
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


def parameter_gather(zero_stage: int) -> Gather:
    """A context factory giving the listed ZeRO-3 parameters their full values for its block.

    Below stage 3 parameters are never partitioned and it does nothing; non-parameters in the
    list (buffers) are left alone. Every rank must enter it with the same parameters.
    """
    if zero_stage != 3:
        return lambda tensors: contextlib.nullcontext()
    import deepspeed

    return lambda tensors: deepspeed.zero.GatheredParameters(tensors, modifier_rank=None)



def unique_tensors(model: nn.Module) -> StateDict:
    """The model's live parameters and buffers by state-dict name, tied ones under their first name.

    Both sides of a sync call it on the same architecture, so positions identify tensors. Under
    ZeRO-3 the parameters are partitioned (empty) outside a :data:`Gather`.
    """
    seen: set[int] = set()
    unique: StateDict = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor
    return unique


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The unpartitioned shape (a ZeRO-3 parameter is empty outside a gather)."""
    return getattr(tensor, "ds_shape", tensor.shape)


def full_bytes(tensor: torch.Tensor) -> int:
    return full_shape(tensor).numel() * tensor.element_size()


def no_gather(tensors: list[torch.Tensor]) -> AbstractContextManager[None]:
    """The :data:`Gather` of an unpartitioned model."""
    return contextlib.nullcontext()


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> Iterator[list[int]]:
    """Positions of runs of same-dtype tensors of at most ``bucket_bytes`` (a bigger one goes alone)."""
    bucket: list[int] = []
    size = 0
    for position, tensor in enumerate(tensors):
        nbytes = full_bytes(tensor)
        if bucket and (tensor.dtype != tensors[bucket[0]].dtype or size + nbytes > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(position)
        size += nbytes
    if bucket:
        yield bucket


def gathered_buckets(
    tensors: StateDict, names: list[str], gather: Gather = no_gather, bucket_mb: float = BUCKET_MB
) -> Iterator[list[str]]:
    """``names`` in buckets, each gathered to full values only while the caller handles it.

    With ZeRO-3 every learner rank must walk the same buckets (the gather is a collective); the
    peak extra memory is one bucket, not the model.
    """
    for bucket in _buckets([tensors[name] for name in names], int(bucket_mb * 2**20)):
        bucket_names = [names[i] for i in bucket]
        with gather([tensors[name] for name in bucket_names]):
            yield bucket_names


def cpu_copies(
    tensors: StateDict, names: list[str], gather: Gather = no_gather, bucket_mb: float = BUCKET_MB
) -> StateDict:
    """Detached CPU copies of ``tensors[names]``, gathered bucket by bucket (see gathered_buckets)."""
    copies: StateDict = {}
    for bucket in gathered_buckets(tensors, names, gather, bucket_mb):
        copies.update({name: tensors[name].detach().to("cpu", copy=True) for name in bucket})
    return copies


def follow_gathers(
    tensors: StateDict, names: list[str], gather: Gather, bucket_mb: float = BUCKET_MB
) -> None:
    """A rank other than 0 joins each bucket's ZeRO-3 gather while rank 0 uses the values."""
    for _ in gathered_buckets(tensors, names, gather, bucket_mb):
        pass


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def save_gathered(
    model: nn.Module, save: Callable[[StateDict], None], gather: Gather = no_gather,
    adapters_only: bool = False, bucket_mb: float = BUCKET_MB,
) -> None:
    """``save(copies)`` on rank 0 with host copies of ``model``'s tensors (its LoRA adapters alone
    with ``adapters_only``), gathered bucket by bucket: every rank must call it (the ZeRO-3 gathers
    are collectives), and no device ever holds more than a bucket beyond its own shards.
    """
    tensors = unique_tensors(model)
    names = adapter_names(tensors) if adapters_only else list(tensors)
    if rank() != 0:
        follow_gathers(tensors, names, gather, bucket_mb)
        return
    save(cpu_copies(tensors, names, gather, bucket_mb))


def save_policy(
    policy: Policy, path: str | Path, publish: LoraPublish, gather: Gather = no_gather,
    bucket_mb: float = BUCKET_MB,
) -> None:
    """``policy`` saved as ``lora.publish`` says from every rank (see ``save_gathered``): an adapter
    folder gathers the adapters alone; a merged one folds them in on rank 0's host copies."""
    save_gathered(policy.model, lambda state: policy.save_trained(path, publish, state), gather,
                  policy.saves_adapter(publish), bucket_mb)


def set_threads_for_worker(cpus: float) -> None:
    """One intra-op thread per reserved CPU, so co-located workers do not oversubscribe cores."""
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
