"""The PPO roles as Ray actors in one placement group, and the fan-out to each role's actors.

Actors are thin: each wraps a plain role class from :mod:`rlhf.ppo.roles`. ``RayRoles`` offers
the same methods as ``LocalRoles``, so :class:`rlhf.ppo.trainer.PPOTrainer` runs unchanged on a
laptop (fractional CPUs) or a GPU cluster (fractional GPUs or whole nodes per role).
``ColocatedRoles`` (``roles.colocate``) puts ``LocalRoles`` itself in one actor instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf.errors import InputError
from rlhf.ppo.batch import PPOBatch
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.experience import Rollout
from rlhf.ppo.roles import (
    BehaviourRollout,
    Generator,
    Learner,
    LearnStats,
    LocalRoles,
    PendingRollout,
    ReferenceScorer,
    RewardScorer,
    StaleWeightsError,
)
from rlhf.ppo.weight_sync import COLLECTIVE, SyncReport, resolve_transport
from rlhf.runtime import derive_seed, rendezvous_address, thread_count

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120
RESTART_WAIT_S = 120


def _threads(cfg: PPOConfig) -> int:
    return thread_count(cfg.roles.cpus_per_actor, cfg.roles.threads_per_actor)


def check_placement(cfg: PPOConfig) -> None:
    """Fail before any model loads when the cluster cannot hold every role's actors.

    The checks that need no cluster (worker counts, transport) ran in config validation.
    """
    r = cfg.roles
    need_cpu, need_gpu = cfg.actors * r.cpus_per_actor, cfg.actors * r.gpus_per_actor
    have = ray.cluster_resources()
    if need_cpu > have.get("CPU", 0) or need_gpu > have.get("GPU", 0):
        raise InputError(
            f"roles: {cfg.actors} actors need {need_cpu:g} CPUs and {need_gpu:g} GPUs, the cluster has "
            f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs; lower roles.cpus_per_actor, "
            "roles.gpus_per_actor or the worker counts"
        )


def _split(n: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices covering range(n), sizes differing by at most one."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


class RayRoles:
    """Every role as Ray actors, placed by ``roles.placement``; same methods as LocalRoles."""

    def __init__(self, cfg: PPOConfig):
        check_placement(cfg)
        self.cfg = cfg
        r = cfg.roles
        bundle = {"CPU": r.cpus_per_actor, **({"GPU": r.gpus_per_actor} if r.gpus_per_actor else {})}
        self.pg = placement_group([bundle] * cfg.actors, strategy=r.placement)
        if not self.pg.wait(PLACEMENT_TIMEOUT_S):
            remove_placement_group(self.pg)
            raise InputError(f"roles.placement: {r.placement} placement of {cfg.actors} actors "
                             f"could not be met within {PLACEMENT_TIMEOUT_S}s")
        bundles = iter(range(cfg.actors))
        restartable = {"max_restarts": r.max_restarts, "max_task_retries": 0}
        self.generators = [self._actor(Generator, next(bundles), restartable, cfg, _threads(cfg))
                           for _ in range(r.rollout_workers)]
        self.scorers = [self._actor(RewardScorer, next(bundles), restartable, cfg, _threads(cfg))
                        for _ in range(cfg.reward_actors)]  # none for a rule-based reward.fn
        self.rule = None if self.scorers else RewardScorer(cfg)  # that function, in this process
        self.references = [self._actor(ReferenceScorer, next(bundles), restartable, cfg, _threads(cfg))
                           for _ in range(cfg.reference_actors)]  # none with LoRA
        first_learner = next(bundles)
        address, port = ray.get(self._task(rendezvous_address, first_learner).remote())
        learner_bundles = [first_learner] + [next(bundles) for _ in range(r.learner_workers - 1)]
        self.learners = [
            self._actor(Learner, bundle, {}, cfg, rank, r.learner_workers, address, port, _threads(cfg))
            for rank, bundle in enumerate(learner_bundles)
        ]
        self.version = 0  # syncs sent to the generators
        self.transport = resolve_transport(r.weight_sync, r.gpus_per_actor)
        self._regroup = self.transport == COLLECTIVE  # the broadcast group must be (re)built
        self.sync()

    def _task(self, fn: Callable[..., Any], bundle: int, **options: Any) -> Any:
        """``fn`` (a class or function) as a Ray remote pinned to one bundle of the group."""
        r = self.cfg.roles
        strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle)
        return ray.remote(fn).options(num_cpus=r.cpus_per_actor, num_gpus=r.gpus_per_actor,
                                      scheduling_strategy=strategy, **options)

    def _actor(self, cls: type, bundle: int, options: dict[str, Any], *args: Any) -> Any:
        return self._task(cls, bundle, **options).remote(*args)

    # ------------------------------------------------------------ generation with recovery

    def generate(self, documents: list[str], seed: int) -> Rollout:
        refs = self._submit(documents, seed, "generate")
        return Rollout.concat(self._gather(documents, seed, "generate", refs))

    def start_generate(self, documents: list[str], seed: int) -> PendingRollout:
        """Sampling starts now with the generators' weights, while the caller goes on (training);
        ``result`` waits. A sync sent meanwhile queues behind it on each generator."""
        refs = self._submit(documents, seed, "generate_scored")
        return RayPendingRollout(
            lambda: BehaviourRollout.concat(self._gather(documents, seed, "generate_scored", refs)))

    def _submit(self, documents: list[str], seed: int, method: str) -> list[Any]:
        """One shard per generator, each with its own seed, through generator ``method``."""
        shards = _split(len(documents), len(self.generators))
        return [getattr(g, method).remote(documents[s], derive_seed(seed, i), self.version)
                for i, (g, s) in enumerate(zip(self.generators, shards))]

    def _gather(self, documents: list[str], seed: int, method: str, refs: list[Any]) -> list[Any]:
        """The shards of ``_submit``, in order; a failed shard is rerun (``_retry``)."""
        shards = _split(len(documents), len(self.generators))
        parts = []
        for i, ref in enumerate(refs):
            try:
                parts.append(ray.get(ref))
            except (RayActorError, StaleWeightsError) as err:
                parts.append(self._retry(i, documents[shards[i]], derive_seed(seed, i), method, err))
        return parts

    def _retry(self, index: int, documents: list[str], seed: int, method: str, error: Exception) -> Any:
        """Wait for Ray to restart a dead generator, give it every current tensor, rerun its shard."""
        logger.warning("rollout worker %d failed (%s); retrying its batch", index, type(error).__name__)
        actor = self.generators[index]
        deadline = time.time() + RESTART_WAIT_S
        while True:
            try:
                self._bring_up_to_date([actor])
                return ray.get(getattr(actor, method).remote(documents, seed, self.version))
            except RayActorError:
                if time.time() > deadline:
                    raise
                time.sleep(1)

    # ------------------------------------------------------------ scoring and learning

    def score(self, documents: list[str], summaries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rule is not None:
            return self.rule.score(documents, summaries)
        shards = _split(len(documents), len(self.scorers))
        parts = ray.get([w.score.remote(documents[s], summaries[s]) for w, s in zip(self.scorers, shards)])
        return torch.cat([raw for raw, _ in parts]), torch.cat([used for _, used in parts])

    def ref_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """Reference actors' log-probs, or with LoRA the learners' base with the adapter off."""
        workers = self.references or self.learners
        method = "logprobs" if self.references else "ref_logprobs"
        shards = _split(len(rollout.documents), len(workers))
        parts = ray.get([getattr(w, method).remote(rollout.select(s)) for w, s in zip(workers, shards)])
        return _pad_cat(parts, rollout.response_ids.shape[1])

    def evaluate(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        shards = _split(len(rollout.documents), len(self.learners))
        parts = ray.get([a.evaluate.remote(rollout.select(s)) for a, s in zip(self.learners, shards)])
        width = rollout.response_ids.shape[1]
        return _pad_cat([p[0] for p in parts], width), _pad_cat([p[1] for p in parts], width)

    def train(self, batch: PPOBatch) -> LearnStats:
        shards = _split(len(batch), len(self.learners))
        stats = ray.get([a.train.remote(batch.select(torch.arange(len(batch))[s]))
                         for a, s in zip(self.learners, shards)])
        return LearnStats.mean([vars(s) for s in stats])

    def _send_through_object_store(self, generators: list, every: bool) -> SyncReport:
        """Learner rank 0's outgoing tensors as one object to ``generators``; rank 0's report.

        Every learner rank takes part (ZeRO-3 gathers), and the learners hold no copy after.
        """
        results = [a.outgoing_weights.options(num_returns=2).remote(every) for a in self.learners]
        weights_ref, report_ref = results[0]
        ray.get([g.load_weights.remote(weights_ref, self.version) for g in generators])
        ray.get([ref for pair in results for ref in pair])  # every rank finished its gathers
        return ray.get(report_ref)

    def _bring_up_to_date(self, generators: list) -> None:
        """Every tensor of the learner's policy, through the object store, to generators that
        missed syncs: between syncs (generation) it is what was last sent; at a sync it is the
        newer policy the broadcast then completes."""
        self._send_through_object_store(generators, every=True)
        self._regroup = self.transport == COLLECTIVE  # the old group lost a member

    def sync(self) -> SyncReport:
        """Changed policy tensors from learner rank 0 to every generator; rank 0's report.

        A generator restarted since the last sync (after its last batch, e.g. while the learner
        trained) holds the initial weights: it gets every tensor first, since the changed ones
        alone would leave it with a mix.
        """
        versions = ray.get([g.weights_version.remote() for g in self.generators])
        restarted = [g for g, v in zip(self.generators, versions) if v != self.version]
        if restarted:
            logger.warning("%d rollout worker(s) restarted since the last weight sync; resending "
                           "every tensor to them", len(restarted))
            self._bring_up_to_date(restarted)
        self.version += 1
        if self.transport == COLLECTIVE:
            if self._regroup:
                self._open_weight_group()
            reports = [a.broadcast_weights.remote() for a in self.learners]
            ray.get([g.receive_weights.remote(self.version) for g in self.generators])
            return ray.get(reports)[0]
        return self._send_through_object_store(self.generators, every=False)

    def _open_weight_group(self) -> None:
        """Learner rank 0 and every generator join a fresh broadcast group (also after a restart)."""
        source, size = self.learners[0], 1 + len(self.generators)
        port = ray.get(source.host_weight_group.remote(size))
        address = ray.get(source.__ray_call__.remote(lambda _: ray.util.get_node_ip_address()))
        ray.get([a.join_weight_group.remote(address, port, size) for a in self.learners]
                + [g.join_weight_group.remote(address, port, rank, size)
                   for rank, g in enumerate(self.generators, 1)])
        self._regroup = False

    def save_policy(self, path: str) -> None:
        ray.get([a.save_policy.remote(path) for a in self.learners])

    def save_checkpoint(self, path: str) -> None:
        ray.get([a.save_checkpoint.remote(path) for a in self.learners])

    def load_checkpoint(self, path: str) -> None:
        ray.get([a.load_checkpoint.remote(path) for a in self.learners])
        self.sync()

    def shutdown(self) -> None:
        for actor in self.generators + self.scorers + self.references + self.learners:
            ray.kill(actor)
        remove_placement_group(self.pg)


class ColocatedRoles:
    """Every role in one Ray actor (``roles.colocate``): :class:`LocalRoles` inside it, so the
    roles share one process and take turns, and a weight sync is an in-process copy. Same methods
    as RayRoles; the actor runs calls in the order they are sent, so a sampling started before an
    update (``ppo.async_rollout``) still uses the weights it was started with."""

    def __init__(self, cfg: PPOConfig):
        check_placement(cfg)
        r = cfg.roles
        remote: Any = ray.remote(LocalRoles)  # Any, as for RayRoles' actors: Ray's stubs type no methods
        self.actor = remote.options(num_cpus=r.cpus_per_actor, num_gpus=r.gpus_per_actor,
                                    max_restarts=0).remote(cfg, _threads(cfg))
        self.version = self._version()

    def _version(self) -> int:
        return ray.get(self.actor.__ray_call__.remote(lambda roles: roles.version))

    def generate(self, documents: list[str], seed: int) -> Rollout:
        return ray.get(self.actor.generate.remote(documents, seed))

    def start_generate(self, documents: list[str], seed: int) -> PendingRollout:
        sampled = self.actor.start_generate.remote(documents, seed)
        return RayPendingRollout(lambda: ray.get(sampled).result())

    def score(self, documents: list[str], summaries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return ray.get(self.actor.score.remote(documents, summaries))

    def ref_logprobs(self, rollout: Rollout) -> torch.Tensor:
        return ray.get(self.actor.ref_logprobs.remote(rollout))

    def evaluate(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        return ray.get(self.actor.evaluate.remote(rollout))

    def train(self, batch: PPOBatch) -> LearnStats:
        return ray.get(self.actor.train.remote(batch))

    def sync(self) -> SyncReport:
        report = ray.get(self.actor.sync.remote())
        self.version = self._version()
        return report

    def save_policy(self, path: str) -> None:
        ray.get(self.actor.save_policy.remote(path))

    def save_checkpoint(self, path: str) -> None:
        ray.get(self.actor.save_checkpoint.remote(path))

    def load_checkpoint(self, path: str) -> None:
        ray.get(self.actor.load_checkpoint.remote(path))  # syncs the generator too
        self.version = self._version()

    def shutdown(self) -> None:
        ray.kill(self.actor)


def start_roles(cfg: PPOConfig) -> RayRoles | ColocatedRoles:
    """The roles as ``roles.colocate`` places them: one actor, or actors per role."""
    return ColocatedRoles(cfg) if cfg.roles.colocate else RayRoles(cfg)


@dataclass
class RayPendingRollout:
    """Generators sampling on Ray; ``result`` waits for their shards (and reruns a failed one)."""

    gather: Callable[[], BehaviourRollout]

    def result(self) -> BehaviourRollout:
        return self.gather()


def _pad_cat(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """Concatenate (b_i, t_i) shards into (B, width), zero-padding shorter ones on the right."""
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])
