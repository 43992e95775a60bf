"""Weight sync from the learner to rollout workers: what moves, tied tensors, buckets, and the
collective transport on a real gloo group (ranks as threads here, as Ray actors in test_ppo)."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rlhf.config.core import ConfigError
from rlhf.config.sections import DeepSpeedConfig, ModelConfig
from rlhf.errors import InputError
from rlhf.models import load_policy, resolve_dtype
from rlhf.ppo.roles import init_process_group
from rlhf.ppo.weight_sync import SyncPlan, WeightGroup, resolve_transport
from rlhf.runtime import free_port
from rlhf.train.deepspeed_setup import deepspeed_config, initialize
from rlhf.train.zero_gather import _buckets, cpu_copies, gathered_buckets, unique_tensors

CPU = torch.device("cpu")


def _model(seed: int, preset: str = "tiny-t5") -> torch.nn.Module:
    torch.manual_seed(seed)
    return load_policy(ModelConfig(name_or_path=preset)).model


def test_tied_tensors_are_listed_once_under_their_first_name() -> None:
    model = _model(0)
    names = list(model.state_dict())
    unique = unique_tensors(model)
    assert model.lm_head.weight is model.shared.weight  # the tiny T5 ties its embeddings
    assert "shared.weight" in unique
    assert not {"lm_head.weight", "encoder.embed_tokens.weight"} & set(unique)
    assert list(unique) == [n for n in names if n in unique]  # state-dict order kept
    assert len(unique) < len(names)


def test_sync_plan_moves_everything_first_then_only_trainable_parameters() -> None:
    model = _model(0)
    model.encoder.final_layer_norm.weight.requires_grad_(False)  # frozen: never changes
    plan = SyncPlan()
    tensors = unique_tensors(model)
    assert plan.names(tensors) == list(tensors)
    later = plan.names(tensors)
    assert "encoder.final_layer_norm.weight" not in later
    assert later == [n for n, t in tensors.items() if n != "encoder.final_layer_norm.weight"]
    buffers = {"final_logits_bias": torch.zeros(1, 4)}  # a buffer (BART/LED) moves the first time only
    assert SyncPlan().names(buffers) == ["final_logits_bias"]
    plan.reset()
    assert plan.names(tensors) == list(tensors)


def test_buckets_split_by_dtype_and_size() -> None:
    f32 = [torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(20)]  # 16 bytes each, then 80
    half = [torch.zeros(2, dtype=torch.bfloat16)]
    sizes = [[i for i in b] for b in _buckets(f32 + half + f32[:1], 40)]
    assert sizes == [[0, 1], [2], [3], [4], [5]]


def test_each_bucket_is_gathered_alone_and_every_tensor_once() -> None:
    """A ZeRO-3 learner holds one bucket of full values at a time, never the model."""
    model = _model(0)
    tensors = unique_tensors(model)
    held: list[int] = []
    peak = [0]

    @contextlib.contextmanager
    def gather(bucket: list[torch.Tensor]):
        held.append(sum(t.numel() * t.element_size() for t in bucket))
        peak[0] = max(peak[0], sum(held))
        yield
        held.pop()

    bucket_mb = 64 * 1024 / 2**20  # 64 KiB
    seen = [name for bucket in gathered_buckets(tensors, list(tensors), gather, bucket_mb) for name in bucket]
    assert seen == list(tensors)
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    assert 0 < peak[0] <= max(64 * 1024, max(sizes)) < sum(sizes)
    copies = cpu_copies(tensors, list(tensors), gather, bucket_mb)
    assert all(torch.equal(copies[n], t) and copies[n].data_ptr() != t.data_ptr() for n, t in tensors.items())


def test_transport_rule() -> None:
    assert resolve_transport("auto", 0) == "collective"  # gloo on CPU
    assert resolve_transport("auto", 0.25) == "object_store"  # NCCL: one rank per GPU
    assert resolve_transport("auto", 1) == "collective"
    assert resolve_transport("object_store", 1) == "object_store"
    with pytest.raises(ConfigError, match=r"weight_sync: collective needs a whole GPU per actor"):
        resolve_transport("collective", 0.5)


def _group_run(models: list[torch.nn.Module], changed: list[str] | None, check: bool = True) -> list:
    """Every model as one rank of a real gloo group (threads); rank 0 sends ``changed``."""
    store, port = WeightGroup.host(len(models))

    def member(rank: int):
        group = WeightGroup("127.0.0.1", port, rank, len(models), CPU, bucket_mb=16 / 1024)  # many buckets
        tensors = unique_tensors(models[rank])
        if check:
            group.check_layout(tensors)
        return group.broadcast(tensors, changed if rank == 0 else None)

    with ThreadPoolExecutor(len(models)) as pool:
        futures = [pool.submit(member, rank) for rank in range(len(models))]
        results = [f.exception() or f.result() for f in futures]
    del store
    return results


def test_collective_broadcast_moves_changed_tensors_into_every_worker() -> None:
    learner, workers = _model(1), [_model(2), _model(3)]
    moved = _group_run([learner, *workers], list(unique_tensors(learner)))
    total = sum(t.numel() * t.element_size() for t in unique_tensors(learner).values())
    assert moved == [total] * 3
    for worker in workers:
        for name, tensor in learner.state_dict().items():
            assert torch.equal(worker.state_dict()[name], tensor), name
        assert worker.lm_head.weight is worker.shared.weight  # received in place: ties intact

    with torch.no_grad():
        learner.shared.weight.mul_(0.5)
        learner.decoder.final_layer_norm.weight.add_(1.0)
    changed = ["shared.weight", "decoder.final_layer_norm.weight"]
    moved = _group_run([learner, *workers], changed, check=False)
    assert moved[0] == learner.shared.weight.numel() * 4 + learner.decoder.final_layer_norm.weight.numel() * 4
    for worker in workers:
        assert torch.equal(worker.lm_head.weight, learner.shared.weight)
        assert torch.equal(worker.decoder.final_layer_norm.weight, learner.decoder.final_layer_norm.weight)
    assert _group_run([learner, *workers], [], check=False) == [0, 0, 0]


def test_a_worker_with_another_architecture_fails_with_one_clear_error() -> None:
    results = _group_run([_model(1), _model(2, "tiny-gpt2")], None)
    assert all(isinstance(r, InputError) for r in results), results
    assert "roles.weight_sync: a rollout worker's policy" in str(results[1])
    assert "both must load the same policy config" in str(results[1])


@pytest.mark.parametrize("preset", ["tiny-bart", "tiny-led"])
def test_a_bf16_deepspeed_learner_syncs_buffers_too(preset: str) -> None:
    """ZeRO 0-2 bf16 casts parameters only; ``final_logits_bias`` (a buffer) must follow, or the
    bf16 rollout copy's layout differs and the group refuses to open."""
    init_process_group(0, 1, "127.0.0.1", free_port(), False)  # one learner rank, as a Learner opens it
    config = deepspeed_config(DeepSpeedConfig(zero_stage=2), micro_batch_size=1, lr=1e-3,
                              max_grad_norm=1.0, bf16=True)
    learner = _model(1, preset)
    initialize(learner, config)
    generator = load_policy(ModelConfig(name_or_path=preset), dtype=resolve_dtype("bf16", CPU)).model
    tensors = unique_tensors(learner)
    assert tensors["final_logits_bias"].dtype == torch.bfloat16
    with torch.no_grad():
        learner.final_logits_bias.add_(0.25)
    moved = _group_run([learner, generator], SyncPlan().names(tensors))
    assert moved == [sum(t.numel() * 2 for t in tensors.values())] * 2, moved
    for name, tensor in learner.state_dict().items():
        assert torch.equal(generator.state_dict()[name], tensor), name
    other = _model(2, "tiny-t5").to(torch.bfloat16)  # another architecture, same dtype: still refused
    assert all(isinstance(r, InputError) for r in _group_run([learner, other], None))
