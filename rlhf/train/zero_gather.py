"""Full weights out of a (ZeRO-3 partitioned) learner, one bucket at a time: weight sync and saving.

Under ZeRO-3 each rank holds a shard of every parameter; PPO's weight sync and every save gather
them bucket by bucket (``gathered_buckets``, ``save_gathered``), so no device holds more than one
bucket beyond its own shards. Below stage 3 the same calls run and gather nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rlhf.config.sections import LoraPublish
from rlhf.models.lora import StateDict, adapter_names
from rlhf.models.policy import Policy
from rlhf.runtime import import_deepspeed

Gather = Callable[[list[torch.Tensor]], AbstractContextManager[None]]  # full values inside (ZeRO-3 shards)
BUCKET_MB = 256.0  # roles.sync_bucket_mb: keeps the link busy without a second copy of the model


def parameter_gather(zero_stage: int) -> Gather:
    """A context factory giving the listed ZeRO-3 parameters their full values for its block.

    Below stage 3 parameters are never partitioned and it does nothing; non-parameters in the
    list (buffers) are left alone. Every rank must enter it with the same parameters.
    """
    if zero_stage != 3:
        return lambda tensors: contextlib.nullcontext()
    deepspeed = import_deepspeed()
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
