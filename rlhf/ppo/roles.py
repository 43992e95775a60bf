"""The PPO roles as plain classes: generation, reward scoring, reference log-probs, learning.

No Ray in here. :mod:`rlhf.ppo.actors` wraps each class in a Ray actor; tests and the
single-process benchmark drive them directly. Every role loads its own models from config, so
an actor needs nothing from the driver but the config and the data it works on.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from rlhf.config.sections import LoraConfig
from rlhf.models import (
    Policy,
    RewardModel,
    load_policy,
    load_reward_model,
    load_value_model,
    resolve_dtype,
)
from rlhf.models.lora import StateDict, without_dropout
from rlhf.ppo import functional as F
from rlhf.ppo.batch import PPOBatch
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.experience import Rollout, generate_rollout, response_logprobs, response_values
from rlhf.ppo.rewards import load_reward_fn
from rlhf.ppo.weight_sync import SyncPlan, SyncReport, WeightGroup
from rlhf.runtime import compute_device, derive_seed, free_port, set_torch_threads
from rlhf.train.deepspeed_setup import deepspeed_config, initialize, zero3_init_context
from rlhf.train.zero_gather import cpu_copies, follow_gathers, parameter_gather, save_policy, unique_tensors


def rl_lora(cfg: PPOConfig) -> LoraConfig | None:
    """The adapters the learner trains and the generators mirror (no dropout), or None."""
    return without_dropout(cfg.lora) if cfg.lora.r else None


def _frozen_policy(
    cfg: PPOConfig, threads: int, lora: LoraConfig | None = None
) -> tuple[Policy, torch.device]:
    """The initial policy in eval mode on this actor's device (generation and reference); with
    ``lora`` it carries the learner's adapter layout, so a sync can move the adapters alone.

    Every PPO role loads without dropout (``rlhf.models.dropout``): pi/pi_old must be exactly 1
    before an update, whichever role computed which side.
    """
    set_torch_threads(cfg.roles.cpus_per_actor, threads)
    device = compute_device(cfg.roles.gpus_per_actor)
    policy = load_policy(cfg.policy, dtype=resolve_dtype(cfg.roles.dtype, device), dropout=False, lora=lora)
    policy.model.to(device).eval()
    return policy, device


def forward_chunks(rows: int, size: int) -> list[slice]:
    """Row slices of at most ``size`` rows (0: one slice of all), in order: ``roles.forward_batch_size``.

    Forward passes over a whole shard of long documents can exceed device memory; each role runs
    one pass per slice and joins the results, which equal a single pass's.
    """
    step = size if size > 0 else max(rows, 1)
    return [slice(start, min(start + step, rows)) for start in range(0, max(rows, 1), step)]


@torch.no_grad()
def chunked_logprobs(policy: Policy, device: torch.device, rollout: Rollout, cfg: PPOConfig) -> torch.Tensor:
    """(B, T) log-probs of the rollout's tokens under ``policy.model`` on the CPU, one forward per
    ``roles.forward_batch_size`` rows (``select`` keeps the widths, so the chunks join as one pass)."""
    return torch.cat([
        response_logprobs(policy.model, policy, rollout.select(rows).to(device), cfg.ppo.temperature)[0].cpu()
        for rows in forward_chunks(len(rollout.documents), cfg.roles.forward_batch_size)
    ])


@dataclass
class BehaviourRollout:
    """A rollout and the log-probs of its tokens under the weights that sampled it (async_rollout)."""

    rollout: Rollout
    logprobs: torch.Tensor  # (B, T) log pi_behaviour of the sampled tokens, 0 where mask == 0
    version: int  # weight syncs the sampling generator had received

    @classmethod
    def concat(cls, parts: list[BehaviourRollout]) -> BehaviourRollout:
        """The rows of ``parts`` in order (shards of several generators), log-probs zero-padded to the
        joined rollout's width; the oldest shard's version."""
        rollout = Rollout.concat([part.rollout for part in parts])
        width = rollout.response_ids.shape[1]
        logprobs = torch.cat([nn.functional.pad(part.logprobs, (0, width - part.logprobs.shape[1]))
                              for part in parts])
        return cls(rollout, logprobs, min(part.version for part in parts))


class PendingRollout(Protocol):
    """A rollout being sampled (on Ray, while the learner trains); ``result`` waits for it."""

    def result(self) -> BehaviourRollout: ...


@dataclass
class Sampled:
    """A rollout sampled before it was asked for (local roles)."""

    value: BehaviourRollout

    def result(self) -> BehaviourRollout:
        return self.value


class StaleWeightsError(RuntimeError):
    """A generator holds older weights than the learner's last sync (e.g. after a restart)."""


class Generator:
    """A policy copy that samples summaries; receives new weights after each learner update.

    ``version`` counts the syncs it has received; a restarted actor starts again at 0, so the
    driver can tell it missed updates instead of sampling from stale weights.
    """

    def __init__(self, cfg: PPOConfig, threads: int = 1):
        self.cfg = cfg
        self.policy, self.device = _frozen_policy(cfg, threads, rl_lora(cfg))
        self.version = 0
        self.weights: WeightGroup | None = None  # set by join_weight_group (collective sync)

    def generate(self, documents: list[str], seed: int, version: int) -> Rollout:
        """Sampled summaries of ``documents``; ``seed`` makes a retried batch identical.

        Chunks of ``roles.rows_per_generate`` are generated in order after one seeding, so a batch
        is still reproducible from its seed; ``Rollout.concat`` re-pads them to common widths.
        """
        if version != self.version:
            raise StaleWeightsError(f"generator has weights v{self.version}, the learner is at v{version}")
        torch.manual_seed(seed)
        algo = self.cfg.ppo
        parts = [
            generate_rollout(
                self.policy, documents[rows], temperature=algo.temperature, top_p=algo.top_p,
                max_new_tokens=algo.max_new_tokens, stop_at_eos=algo.stop_at_eos,
            ).to("cpu")
            for rows in forward_chunks(len(documents), self.cfg.roles.rows_per_generate)
        ]
        return Rollout.concat(parts)

    @torch.no_grad()
    def generate_scored(self, documents: list[str], seed: int, version: int) -> BehaviourRollout:
        """``generate``, then the log-probs of the sampled tokens under these same weights: the
        behaviour policy of an off-policy update (``ppo.async_rollout``)."""
        rollout = self.generate(documents, seed, version)
        return BehaviourRollout(rollout, chunked_logprobs(self.policy, self.device, rollout, self.cfg),
                                self.version)

    def load_weights(self, weights: StateDict, version: int) -> None:
        """Copy in the tensors that changed since the last sync (a subset of the state dict)."""
        missing = set(weights) - set(self.policy.model.state_dict())
        if missing:
            raise KeyError(f"weights for unknown parameters: {sorted(missing)[:3]}")
        self.policy.model.load_state_dict(weights, strict=False)
        self.version = version

    def weights_version(self) -> int:
        """Syncs received; 0 in an actor Ray has restarted."""
        return self.version

    def join_weight_group(self, address: str, port: int, rank: int, size: int) -> None:
        """Become rank ``rank`` of the learner's broadcast group (collective weight sync)."""
        self.weights = WeightGroup(address, port, rank, size, self.device, self.cfg.roles.sync_bucket_mb)
        self.weights.check_layout(unique_tensors(self.policy.model))

    def receive_weights(self, version: int) -> None:
        """Take the learner's broadcast of changed tensors into this policy, in place."""
        _joined(self.weights).broadcast(unique_tensors(self.policy.model))
        self.version = version


def _joined(group: WeightGroup | None) -> WeightGroup:
    """The broadcast group this role joined; collective sync joins it before the first broadcast."""
    if group is None:
        raise RuntimeError("join_weight_group has not run on this role: collective weight sync starts "
                           "with it")
    return group


class RewardScorer:
    """Scores (document, summary) pairs with a reward model or a rule-based function."""

    def __init__(self, cfg: PPOConfig, threads: int = 1):
        self.cfg = cfg.reward
        self.roles = cfg.roles  # forward_batch_size
        self.model: RewardModel | None = None
        if cfg.reward.model is not None:  # a function leaves the threads of its process alone
            set_torch_threads(cfg.roles.cpus_per_actor, threads)
            device = compute_device(cfg.roles.gpus_per_actor)
            dtype = resolve_dtype(cfg.roles.dtype, device)
            self.model = load_reward_model(cfg.reward.model, dtype=dtype, dropout=False)
            self.model.to(device).eval()
        self.fn = load_reward_fn(cfg.reward.fn) if cfg.reward.fn else None

    def score(self, documents: list[str], summaries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw, used) scores (B,) of ``reward.head``'s score: ``used`` is normalised with that
        score's stored mean/std."""
        if self.fn is not None:
            raw = torch.tensor(self.fn(documents, summaries), dtype=torch.float32)
            return raw, raw.clone()
        model = self.model
        assert model is not None  # reward.validate: a model wherever there is no fn
        chunks = forward_chunks(len(documents), self.roles.forward_batch_size)
        head = self.cfg.head  # its own statistics normalise it
        raw = torch.cat([model.score(documents[rows], summaries[rows], head).cpu() for rows in chunks])
        return raw, model.normalize(raw, head) if self.cfg.normalize else raw.clone()


class ReferenceScorer:
    """Log-probs of the frozen initial policy, for the KL penalty."""

    def __init__(self, cfg: PPOConfig, threads: int = 1):
        self.cfg = cfg
        self.policy, self.device = _frozen_policy(cfg, threads)

    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        """(B, T) log pi_ref of the sampled tokens, one forward per ``roles.forward_batch_size`` rows."""
        return chunked_logprobs(self.policy, self.device, rollout, self.cfg)


class ActorCritic(nn.Module):
    """Policy and value model under one DeepSpeed engine: one optimizer, one backward."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy = policy
        self.value = value


def trained_module(policy: nn.Module, value: nn.Module | None) -> nn.Module:
    """What the learner's engine trains, saves and restores: policy + value, or the policy alone
    for a critic-free estimator (no value model to load, step, sync or checkpoint)."""
    return policy if value is None else ActorCritic(policy, value)


def init_process_group(rank: int, world_size: int, address: str, port: int, gpu: bool) -> None:
    """The learner ranks' own process group (DeepSpeed gradient all-reduce).

    DeepSpeed reads the rank from the environment. LOCAL_RANK is 0 because Ray shows each actor
    only its own GPU (as device 0), also when fractional GPUs put several actors on one device.
    """
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                      MASTER_ADDR=address, MASTER_PORT=str(port))
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if gpu else "gloo", init_method=f"tcp://{address}:{port}",
            rank=rank, world_size=world_size,
        )


@dataclass
class LearnStats:
    """Means over all minibatch updates of one iteration."""

    policy_loss: float
    value_loss: float
    entropy: float
    clip_fraction: float
    approx_kl: float
    # KL(pi || pi_ref) per summary (k1, summed over its tokens) under the weights each update started
    # from: the rollout's KL when one update is all (ppo.single_update skips the old-log-prob pass)
    update_kl: float

    @staticmethod
    def mean(rows: list[dict[str, float]]) -> LearnStats:
        return LearnStats(**{k: sum(r[k] for r in rows) / len(rows) for k in rows[0]})


class Learner:
    """One data-parallel rank training the policy (+ the value model for gae) on DeepSpeed."""

    def __init__(self, cfg: PPOConfig, rank: int = 0, world_size: int = 1,
                 address: str = "127.0.0.1", port: int | None = None, threads: int = 1):
        set_torch_threads(cfg.roles.cpus_per_actor, threads)
        torch.manual_seed(cfg.seed)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        gpu = cfg.roles.gpus_per_actor > 0
        init_process_group(rank, world_size, address, port or free_port(), gpu)
        self.zero_stage = cfg.roles.deepspeed.zero_stage
        dtype = resolve_dtype(cfg.roles.dtype, compute_device(cfg.roles.gpus_per_actor))
        ds_config = deepspeed_config(
            cfg.roles.deepspeed, micro_batch_size=max(1, cfg.ppo.minibatch_size // world_size),
            lr=cfg.ppo.lr, max_grad_norm=cfg.ppo.max_grad_norm, bf16=dtype == torch.bfloat16,
        )
        with zero3_init_context(ds_config):
            # Train mode (gradient checkpointing needs it) with dropout off: see _frozen_policy.
            # Loaded in roles.dtype like the frozen copies, whatever dtype the checkpoint was saved in.
            lora = rl_lora(cfg)
            self.policy: Policy = load_policy(cfg.policy, dtype=dtype, dropout=False, lora=lora)
            self.value = (load_value_model(cfg.value or cfg.policy, dtype=dtype, dropout=False, lora=lora)
                          if cfg.ppo.uses_critic else None)
        self.engine, _ = initialize(trained_module(self.policy.model, self.value), ds_config)
        self.device = self.engine.device
        self.rng = torch.Generator().manual_seed(derive_seed(cfg.seed, rank))
        self.plan = SyncPlan()
        self.gather = parameter_gather(self.zero_stage)  # ZeRO-3: one bucket of full values at a time
        self.bucket_mb = cfg.roles.sync_bucket_mb
        self.weights: WeightGroup | None = None  # rank 0, collective sync only
        self._weight_store: object | None = None  # the group's rendezvous, hosted by rank 0

    @torch.no_grad()
    def evaluate(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi_old, V_old), each (B, T), for the rollout as sampled; V_old is 0 without a value
        model (critic-free estimators). One forward per ``roles.forward_batch_size`` rows."""
        self.engine.eval()
        logprobs = chunked_logprobs(self.policy, self.device, rollout, self.cfg)
        if self.value is None:
            return logprobs, torch.zeros_like(logprobs)
        values = [response_values(self.value, rollout.select(rows).to(self.device), self.policy).float().cpu()
                  for rows in forward_chunks(len(rollout.documents), self.cfg.roles.forward_batch_size)]
        return logprobs, torch.cat(values)

    @torch.no_grad()
    def ref_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """(B, T) log pi_ref with the adapter off (lora.r > 0): the frozen base the adapters were
        added to is the initial policy, so no reference copy of the model is loaded."""
        self.engine.eval()
        with self.policy.model.disable_adapter():
            return chunked_logprobs(self.policy, self.device, rollout, self.cfg)

    def train(self, batch: PPOBatch) -> LearnStats:
        """PPO epochs over minibatches of this rank's shard of the batch."""
        self.engine.train()
        algo = self.cfg.ppo
        size = max(1, algo.minibatch_size // self.world_size)
        rows = []
        for _ in range(algo.epochs):
            order = torch.randperm(len(batch), generator=self.rng)
            for index in order.split(size):
                # rows in rollout order: a document's k samples stay together, to share its prompt pass
                rows.append(self._update(batch.select(index.sort().values).to(self.device)))
        return LearnStats.mean(rows)

    def _update(self, mb: PPOBatch) -> dict[str, float]:
        """One optimizer step on a minibatch: clipped policy loss + clipped value loss (gae; 0
        without a value model) - entropy (+ the KL to the reference with ``ppo.kl_in=loss``).

        The minibatch runs forward and backward in chunks of ``roles.forward_batch_size`` rows, each
        loss weighted by its share of the minibatch's (``F.loss_share``), so the accumulated
        gradient is one pass's and only a chunk's activations are alive at a time.
        """
        algo = self.cfg.ppo
        chunks = forward_chunks(len(mb), self.cfg.roles.forward_batch_size)
        stats = dict.fromkeys(("policy_loss", "value_loss", "entropy", "clip_fraction", "approx_kl",
                               "update_kl"), 0.0)
        for number, rows in enumerate(chunks):
            part = mb.select(rows)
            self.engine.set_gradient_accumulation_boundary(number == len(chunks) - 1)
            share = F.loss_share(part.mask, mb.mask, algo.loss_aggregation)
            loss, part_stats = self._loss(part, share, F.loss_share(part.mask, mb.mask), len(part) / len(mb))
            self.engine.backward(loss)
            for key, value in part_stats.items():
                stats[key] += value
        self.engine.step()
        return stats

    def _loss(self, part: PPOBatch, share: float, token_share: float, row_share: float
              ) -> tuple[torch.Tensor, dict[str, float]]:
        """A chunk's loss and stats, each weighted by the chunk's share of the minibatch's: ``share``
        of the policy loss and KL (``ppo.loss_aggregation``), ``token_share`` of token means,
        ``row_share`` of per-summary means.

        With ``entropy_coef == 0`` the entropy is only reported, so it is built without a graph.
        """
        algo = self.cfg.ppo
        logprobs, entropy = response_logprobs(
            self.policy.model, self.policy, part.rollout, algo.temperature, with_entropy=True,
            entropy_grad=algo.entropy_coef > 0,
        )
        assert entropy is not None  # with_entropy=True
        # None: ppo.single_update, where the policy before this step is pi_old
        old_logprobs = logprobs.detach() if part.logprobs is None else part.logprobs
        pg_loss, clip_fraction, approx_kl = F.policy_loss(
            logprobs, old_logprobs, part.advantages, part.mask, algo.clip_eps, algo.loss_aggregation
        )
        v_loss = torch.zeros((), device=pg_loss.device)
        if self.value is not None:
            values = response_values(self.value, part.rollout, self.policy)
            v_loss = F.value_loss(values, part.values, part.returns, part.mask, algo.value_clip_eps)
        mean_entropy = F.masked_mean(entropy, part.mask)
        loss = share * pg_loss + token_share * (algo.vf_coef * v_loss - algo.entropy_coef * mean_entropy)
        if algo.kl_in == "loss":
            kl = F.kl_penalty(logprobs, part.ref_logprobs, algo.kl_kind)  # (B, T), differentiable
            loss = loss + share * part.loss_kl_coef * F.aggregate_loss(kl, part.mask, algo.loss_aggregation)
        with torch.no_grad():
            update_kl = (F.kl_penalty(logprobs, part.ref_logprobs, "k1") * part.mask).sum(1).mean().item()
        return loss, {"policy_loss": share * pg_loss.item(), "value_loss": token_share * v_loss.item(),
                      "entropy": token_share * mean_entropy.item(),
                      "clip_fraction": token_share * clip_fraction.item(),
                      "approx_kl": token_share * approx_kl.item(), "update_kl": row_share * update_kl}

    def outgoing_weights(self, every: bool = False) -> tuple[StateDict, SyncReport]:
        """CPU copies of what this sync moves (see SyncPlan; ``every`` tensor for a restarted
        worker, leaving the plan alone), and its report.

        Every rank must call it (ZeRO-3 gathers bucket by bucket); only rank 0 returns tensors.
        """
        start = time.perf_counter()
        tensors = unique_tensors(self.policy.model)
        names = list(tensors) if every else self.plan.names(tensors)
        if self.rank != 0:
            follow_gathers(tensors, names, self.gather, self.bucket_mb)
            return {}, SyncReport(time.perf_counter() - start, 0)
        copies = cpu_copies(tensors, names, self.gather, self.bucket_mb)
        sent = sum(t.numel() * t.element_size() for t in copies.values())
        return copies, SyncReport(time.perf_counter() - start, sent)

    def host_weight_group(self, size: int) -> int:
        """Rank 0: open the broadcast group's rendezvous here; returns its port."""
        self._weight_store, port = WeightGroup.host(size)
        return port

    def join_weight_group(self, address: str, port: int, size: int) -> None:
        """Rank 0 joins the broadcast group as its source (the layout check needs no gather)."""
        if self.rank == 0:
            self.weights = WeightGroup(address, port, 0, size, self.device, self.bucket_mb)
            self.weights.check_layout(unique_tensors(self.policy.model))

    def broadcast_weights(self) -> SyncReport:
        """Every rank calls it (ZeRO-3 gathers bucket by bucket); rank 0 broadcasts."""
        start = time.perf_counter()
        tensors = unique_tensors(self.policy.model)
        names = self.plan.names(tensors)
        sent = 0
        if self.rank == 0:
            sent = _joined(self.weights).broadcast(tensors, names, self.gather)
        else:
            follow_gathers(tensors, names, self.gather, self.bucket_mb)
        return SyncReport(time.perf_counter() - start, sent)

    def save_policy(self, path: str) -> None:
        """The current policy in Hugging Face layout (all ranks call; rank 0 writes); with adapters,
        as ``lora.publish`` says. ZeRO-3 shards are gathered into host memory bucket by bucket
        (the adapters alone for an adapter folder), never all on a device.
        """
        save_policy(self.policy, path, self.cfg.lora.publish, self.gather, self.bucket_mb)

    def save_checkpoint(self, path: str) -> None:
        """Optimizer, weights and RNG for an exact resume (every rank writes its shard)."""
        self.engine.save_checkpoint(path, tag="learner", client_state={"rng": self.rng.get_state()})

    def load_checkpoint(self, path: str) -> None:
        _, client = self.engine.load_checkpoint(path, tag="learner")
        self.rng.set_state(client["rng"])
        self.plan.reset()


class LocalRoles:
    """Every role in this process: inside one Ray actor with ``roles.colocate``, and for tests, the
    no-Ray benchmark twin and debugging."""

    def __init__(self, cfg: PPOConfig, threads: int = 1):
        self.generator = Generator(cfg, threads)
        self.scorer = RewardScorer(cfg, threads)
        self.reference = ReferenceScorer(cfg, threads) if cfg.reference_actors else None
        self.learner = Learner(cfg, threads=threads)
        self.version = 0
        self.sync()  # the generator starts from exactly the learner's weights

    def generate(self, documents: list[str], seed: int) -> Rollout:
        return self.generator.generate(documents, seed, self.version)

    def start_generate(self, documents: list[str], seed: int) -> PendingRollout:
        """Sample now, with the current weights: what Ray roles overlap with training, in order."""
        return Sampled(self.generator.generate_scored(documents, seed, self.version))

    def score(self, documents: list[str], summaries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scorer.score(documents, summaries)

    def ref_logprobs(self, rollout: Rollout) -> torch.Tensor:
        if self.reference is None:  # lora.r > 0: the learner's base with the adapter off
            return self.learner.ref_logprobs(rollout)
        return self.reference.logprobs(rollout)

    def evaluate(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        return self.learner.evaluate(rollout)

    def train(self, batch: PPOBatch) -> LearnStats:
        return self.learner.train(batch)

    def sync(self) -> SyncReport:
        weights, report = self.learner.outgoing_weights()
        self.version += 1
        self.generator.load_weights(weights, self.version)
        return report

    def save_policy(self, path: str) -> None:
        self.learner.save_policy(path)

    def save_checkpoint(self, path: str) -> None:
        self.learner.save_checkpoint(path)

    def load_checkpoint(self, path: str) -> None:
        self.learner.load_checkpoint(path)
        self.sync()
