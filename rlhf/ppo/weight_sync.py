"""Moving the learner's updated policy weights into the rollout workers.

One rule for both transports (:class:`SyncPlan`): the first sync moves every tensor, later ones
only the tensors the optimizer can change (trainable parameters: all of a full fine-tune, the
adapters alone when the rest is frozen); tied tensors (a shared embedding under several names)
move once. Nothing is copied to find out what changed, and a ZeRO-3 learner gathers its shards
one bucket at a time (``rlhf.train.zero_gather.gathered_buckets``), so neither the learner's host
memory nor any rank's device memory ever holds a second full copy of the policy for a sync.

- **Object store** (``roles.weight_sync: object_store``): learner rank 0 returns the changed
  tensors as a CPU dict; Ray ships that one object to every rollout worker.
- **Collective** (``collective``): learner rank 0 and the rollout workers form their own process
  group (NCCL on GPU, gloo on CPU), separate from the learners' gradient group, and rank 0
  broadcasts the changed tensors in flat buckets straight from device memory into the workers'
  parameters: no serialisation, no object store, one broadcast per bucket whatever the number
  of workers.

The collective is the default: on CPU, gloo moved GPT-2 small's 124M changed parameters to one
worker in 0.7 s against 1.9-2.2 s through the object store (benchmarks/weight_sync.py). NCCL cannot
hold two ranks on one GPU, so roles sharing a GPU (fractional ``gpus_per_actor``) use the object
store; see :func:`resolve_transport`.
"""

from __future__ import annotations

import datetime
import zlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from rlhf.config.core import ConfigError
from rlhf.errors import InputError
from rlhf.models.lora import StateDict
from rlhf.train.zero_gather import BUCKET_MB, Gather, full_shape, gathered_buckets, no_gather

WeightSync = Literal["auto", "object_store", "collective"]  # roles.weight_sync
Transport = Literal["object_store", "collective"]  # what ``auto`` resolves to
OBJECT_STORE: Transport = "object_store"
COLLECTIVE: Transport = "collective"
GROUP_TIMEOUT = datetime.timedelta(seconds=300)
_STORE_PREFIX = "rlhf-weights"


@dataclass(frozen=True)
class SyncReport:
    """One weight sync as learner rank 0 saw it (``IterationMetrics.sync_transfer_s/sync_bytes``)."""

    seconds: float  # gathering, checking and sending
    bytes: int  # sent to each rollout worker: the whole policy first, then its trainable tensors


def resolve_transport(setting: WeightSync, gpus_per_actor: float) -> Transport:
    """The transport ``roles.weight_sync`` asks for; ``auto`` = collective unless actors share a GPU."""
    if setting == "auto":
        return OBJECT_STORE if 0 < gpus_per_actor < 1 else COLLECTIVE
    if setting == COLLECTIVE and 0 < gpus_per_actor < 1:
        raise ConfigError(
            "weight_sync", f"collective needs a whole GPU per actor (NCCL cannot put two ranks on one "
            f"device), gpus_per_actor is {gpus_per_actor:g}; use object_store or auto"
        )
    return setting


class SyncPlan:
    """Which tensors a sync moves: every one the first time (and after :meth:`reset`), then the
    trainable parameters only.

    Buffers and frozen parameters cannot change while the learner trains, and after an optimizer
    step every trainable tensor has, so this needs no copy of what was sent. Every learner rank
    keeps one and calls it at each sync, so all ranks walk the same buckets.
    """

    def __init__(self) -> None:
        self.started = False

    def names(self, tensors: StateDict) -> list[str]:
        """Names in ``tensors`` to move now (state-dict order); marks the first sync done."""
        if not self.started:
            self.started = True
            return list(tensors)
        return [name for name, tensor in tensors.items() if tensor.requires_grad]

    def reset(self) -> None:
        self.started = False


def _signature(tensors: StateDict) -> list[int]:
    """Count, elements and a checksum of names, shapes and dtypes: equal iff the layouts match."""
    layout = ",".join(f"{name}:{tuple(full_shape(t))}:{t.dtype}" for name, t in tensors.items())
    numel = sum(full_shape(t).numel() for t in tensors.values())
    return [len(tensors), numel, zlib.crc32(layout.encode())]


class WeightGroup:
    """The broadcast group of learner rank 0 (group rank 0, the source) and the rollout workers.

    Built from its own TCP store so it never touches the learners' default process group.
    Every member calls :meth:`broadcast` at the same time; rank 0's ``changed`` names decide
    what moves, the others learn them from the first two broadcasts.
    """

    def __init__(self, address: str, port: int, rank: int, size: int, device: torch.device,
                 bucket_mb: float = BUCKET_MB):
        self.rank, self.device, self.bucket_mb = rank, device, bucket_mb
        tcp_store = dist.TCPStore(address, port, size, is_master=False, timeout=GROUP_TIMEOUT)
        store = dist.PrefixStore(_STORE_PREFIX, tcp_store)
        self.group: dist.ProcessGroupNCCL | dist.ProcessGroupGloo
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = GROUP_TIMEOUT
            self.group = dist.ProcessGroupNCCL(store, rank, size, options)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, size, GROUP_TIMEOUT)

    @staticmethod
    def host(world_size: int) -> tuple[dist.TCPStore, int]:
        """The rendezvous store on learner rank 0 (keep it alive) and its port."""
        store = dist.TCPStore("0.0.0.0", 0, world_size, is_master=True, timeout=GROUP_TIMEOUT,
                              wait_for_workers=False)
        return store, store.port

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        # torch's stubs give these backends no collectives; they have them (ProcessGroup's signatures)
        self.group.broadcast(tensor, 0).wait()  # type: ignore[union-attr]
        return tensor

    def check_layout(self, tensors: StateDict) -> None:
        """Every member fails with one clear line unless all policies match the learner's layout."""
        mine = torch.tensor(_signature(tensors), dtype=torch.int64, device=self.device)
        learner = self._broadcast(mine.clone())
        same = torch.tensor([int(torch.equal(learner, mine))], dtype=torch.int64, device=self.device)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN  # type: ignore[assignment]  # stub: MIN is a RedOpType
        self.group.allreduce([same], options).wait()  # type: ignore[union-attr]  # as in _broadcast
        if not same.item():
            count, numel, _ = learner.tolist()
            raise InputError(
                f"roles.weight_sync: a rollout worker's policy differs from the learner's ({count} "
                f"tensors, {numel} elements) in names, shapes or dtypes; both must load the same "
                "policy config"
            )

    @torch.no_grad()
    def broadcast(
        self, tensors: StateDict, names: list[str] | None = None, gather: Gather = no_gather
    ) -> int:
        """Rank 0 sends ``tensors[names]``; the others receive into their ``tensors`` in place.

        ``tensors`` is ``unique_tensors`` of the local policy; rank 0's ``gather`` brings each
        bucket's full values in (the other learner ranks walk :func:`gathered_buckets` beside it).
        Returns the bytes moved.
        """
        positions = {name: i for i, name in enumerate(tensors)}
        count = self._broadcast(torch.tensor([len(names or ())], dtype=torch.int64, device=self.device))
        if not count.item():
            return 0
        index = torch.empty(int(count), dtype=torch.int64, device=self.device)
        if self.rank == 0:
            assert names is not None  # rank 0 sent len(names) above and returned if it was 0
            index.copy_(torch.tensor([positions[n] for n in names], dtype=torch.int64))
        order = list(tensors)
        names = [order[i] for i in self._broadcast(index).tolist()]
        moved = 0
        gather = gather if self.rank == 0 else no_gather
        for bucket in gathered_buckets(tensors, names, gather, self.bucket_mb):
            targets = [tensors[name] for name in bucket]
            if self.rank == 0:
                flat = torch.cat([t.detach().to(self.device).reshape(-1) for t in targets])
            else:
                numel = sum(t.numel() for t in targets)
                flat = torch.empty(numel, dtype=targets[0].dtype, device=self.device)
            self._broadcast(flat)
            moved += flat.numel() * flat.element_size()
            if self.rank:
                for target, part in zip(targets, flat.split([t.numel() for t in targets])):
                    target.copy_(part.view_as(target))
        return moved
