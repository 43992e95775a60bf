"""GPU and CPU memory of the ArXiv/LED workload under DeepSpeed ZeRO, to size cluster runs.

Model states (bf16 parameters and gradients, fp32 master weights, Adam moments) come from
DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs``, the functions behind the ``..._all_cold`` reports, with
their default 1.5x CPU buffer factor). Parameter counts come from LED-base-16384 and
LED-large-16384 built from ``LEDConfig`` with the hub checkpoints' sizes on the meta device, so
nothing is downloaded or allocated. ``..._all_live`` is not used: it de-duplicates tied weights
by data pointer, and every meta tensor has pointer 0.

Activations are an estimate, not a GPU measurement: the bytes autograd saves for backward in one
bf16 training forward on this CPU (16,384 document + 512 summary tokens, micro-batch 1, dropout
on, global attention on the first token), counted with saved-tensor hooks, parameters excluded.
Models of the real width with 1-2 encoder/decoder layers give the bytes per layer, which are
scaled to the real layer count. With gradient checkpointing, backward also recomputes one layer
at a time, so the largest full layer is added. Transient buffers of backward (activation
gradients, attention workspaces) are not counted: real peaks are higher.

    python benchmarks/zero_memory.py [--deepspeed-report] [--out benchmarks/results/zero_memory.json]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import deepspeed
import torch
from architectures import LED_SIZES as ALL_LED_SIZES
from architectures import LedSize, led_config
from deepspeed.runtime.zero.stage3 import (
    estimate_zero3_model_states_mem_needs,
    estimate_zero3_model_states_mem_needs_all_cold,
)
from deepspeed.runtime.zero.stage_1_and_2 import (
    estimate_zero2_model_states_mem_needs,
    estimate_zero2_model_states_mem_needs_all_cold,
)
from transformers import LEDForConditionalGeneration, LEDModel

from rlhf.models.policy import enable_activation_checkpointing

GIB = 2**30
GPUS_PER_NODE = 8
GPU_COUNTS = (1, 8, 16)
SOURCE_TOKENS = 16384
TARGET_TOKENS = 512


LED_SIZES = {name: size for name, size in ALL_LED_SIZES.items() if name.startswith("allenai/")}


@dataclass(frozen=True)
class ZeroSetup:
    """One DeepSpeed ZeRO configuration, as ``roles.deepspeed.*`` would set it."""

    label: str
    stage: int
    offload_optimizer: bool
    offload_params: bool


SETUPS = (
    ZeroSetup("ZeRO-2", 2, False, False),
    ZeroSetup("ZeRO-2, optimizer offload", 2, True, False),
    ZeroSetup("ZeRO-3", 3, False, False),
    ZeroSetup("ZeRO-3, optimizer offload", 3, True, False),
    ZeroSetup("ZeRO-3, optimizer + param offload", 3, True, True),
)


def parameter_counts(size: LedSize) -> dict[str, int]:
    """Parameters of the policy, of the value model (backbone + scalar head) and the largest layer.

    ``parameters()`` yields the tied LM head once, as DeepSpeed sees it.
    """
    with torch.device("meta"):
        policy = LEDForConditionalGeneration(led_config(size, size.layers, size.layers))
        backbone = LEDModel(led_config(size, size.layers, size.layers))
    policy_params = sum(p.numel() for p in policy.parameters())
    value_params = sum(p.numel() for p in backbone.parameters()) + size.d_model + 1
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in policy.modules())
    return {"policy": policy_params, "value": value_params, "learner": policy_params + value_params,
            "largest_layer": largest}


def nodes_for(gpus: int) -> tuple[int, int]:
    """(nodes, GPUs per node) for ``gpus`` GPUs packed onto 8-GPU nodes."""
    return math.ceil(gpus / GPUS_PER_NODE), min(gpus, GPUS_PER_NODE)


def model_states(total: int, largest: int, gpus: int, setup: ZeroSetup) -> tuple[float, float]:
    """(GiB per GPU, GiB of CPU RAM per node) from DeepSpeed's estimator for ``setup``."""
    nodes, per_node = nodes_for(gpus)
    if setup.stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=setup.offload_optimizer)
    else:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, num_gpus_per_node=per_node, num_nodes=nodes,
            cpu_offload=setup.offload_optimizer, cpu_offload_params=setup.offload_params, zero_init=True)
    return gpu / GIB, cpu / GIB


def saved_activation_bytes(size: LedSize, encoder_layers: int, decoder_layers: int,
                           checkpointing: bool) -> int:
    """Bytes autograd holds for backward after one bf16 training forward, parameters excluded."""
    torch.manual_seed(0)
    model = LEDForConditionalGeneration(led_config(size, encoder_layers, decoder_layers))
    model = model.to(torch.bfloat16).train()
    if checkpointing:
        enable_activation_checkpointing(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}  # storage address -> bytes: views of one storage count once

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    input_ids = torch.randint(4, 50000, (1, SOURCE_TOKENS))
    global_attention_mask = torch.zeros_like(input_ids)
    global_attention_mask[:, 0] = 1
    labels = torch.randint(4, 50000, (1, TARGET_TOKENS))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                     global_attention_mask=global_attention_mask, labels=labels).loss
    total = sum(saved.values())  # counted while ``loss`` keeps the graph (and its storages) alive
    del loss
    return total


def activation_estimate(size: LedSize) -> dict[str, float]:
    """GiB of saved activations per layer and for the whole policy / PPO learner, with and without
    gradient checkpointing (see the module doc for the method)."""
    parts = {}
    # A fresh process per forward: freed 16k-token activations fragment the heap, and six of them
    # in one process outgrow a 24 GiB machine.
    context = multiprocessing.get_context("spawn")
    for checkpointing in (False, True):
        with context.Pool(1, maxtasksperchild=1) as pool:
            one, two_encoder, two_decoder = pool.starmap(saved_activation_bytes, [
                (size, 1, 1, checkpointing), (size, 2, 1, checkpointing), (size, 1, 2, checkpointing)])
        encoder_layer, decoder_layer = two_encoder - one, two_decoder - one
        rest = one - encoder_layer - decoder_layer  # embeddings, LM head, loss
        parts[checkpointing] = (encoder_layer, decoder_layer, rest)
    (enc, dec, rest), (enc_ck, dec_ck, rest_ck) = parts[False], parts[True]
    recompute = max(enc, dec)
    policy = rest + size.layers * (enc + dec)
    policy_ck = rest_ck + size.layers * (enc_ck + dec_ck)
    # The PPO learner runs policy and value (an LED backbone of the same size) on each sample; the
    # value side is counted like the policy, a slight overestimate (no vocabulary logits).
    return {
        "encoder_layer": enc / GIB, "decoder_layer": dec / GIB, "other": rest / GIB,
        "encoder_layer_checkpointed": enc_ck / GIB,
        "policy": policy / GIB, "policy_checkpointed": (policy_ck + recompute) / GIB,
        "learner": 2 * policy / GIB, "learner_checkpointed": (2 * policy_ck + recompute) / GIB,
    }


def deepspeed_report(counts: dict[str, int]) -> None:
    """DeepSpeed's own printed tables for the PPO learner at each GPU count."""
    for gpus in GPU_COUNTS:
        nodes, per_node = nodes_for(gpus)
        estimate_zero2_model_states_mem_needs_all_cold(counts["learner"], per_node, nodes)
        estimate_zero3_model_states_mem_needs_all_cold(counts["learner"], counts["largest_layer"], per_node,
                                                       nodes)


def states_table(rows: list[dict], which: str) -> str:
    """Markdown: one row per model and ZeRO setup, one column per GPU count."""
    header = "| model | ZeRO | " + " | ".join(
        f"{g} GPU{'s' if g > 1 else ''} ({nodes_for(g)[0]} node{'s' if nodes_for(g)[0] > 1 else ''})"
        for g in GPU_COUNTS) + " |"
    lines = [header, "|---|---|" + "---|" * len(GPU_COUNTS)]
    cell = {(r["model"], r["setup"], r["gpus"]): r for r in rows if r["trained"] == which}
    for model in LED_SIZES:
        for setup in SETUPS:
            cells = [cell[model, setup.label, g] for g in GPU_COUNTS]
            lines.append(f"| {model.split('/')[1]} | {setup.label} | " + " | ".join(
                f"{c['gpu_gib']:.1f} / {c['cpu_per_node_gib']:.0f}" for c in cells) + " |")
    return "\n".join(lines)


def activations_table(models: dict[str, dict]) -> str:
    """Markdown: activation estimates per model."""
    lines = ["| model | per encoder layer | per decoder layer | policy | policy, checkpointed "
             "| PPO learner (policy + value) | PPO learner, checkpointed |",
             "|---|---|---|---|---|---|---|"]
    for model, info in models.items():
        a = info["activations_gib"]
        lines.append(f"| {model.split('/')[1]} | {a['encoder_layer']:.2f} | {a['decoder_layer']:.2f} "
                     f"| {a['policy']:.1f} | {a['policy_checkpointed']:.1f} | {a['learner']:.1f} "
                     f"| {a['learner_checkpointed']:.1f} |")
    return "\n".join(lines)


def params_table(models: dict[str, dict]) -> str:
    """Markdown: parameter counts and the size of a frozen bf16 copy (rollout, reference, reward)."""
    lines = ["| model | policy params | value params | learner params | frozen bf16 policy copy |",
             "|---|---|---|---|---|"]
    for model, info in models.items():
        p = info["params"]
        lines.append(f"| {model.split('/')[1]} | {p['policy'] / 1e6:.0f}M | {p['value'] / 1e6:.0f}M "
                     f"| {p['learner'] / 1e6:.0f}M | {2 * p['policy'] / GIB:.2f} GiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/zero_memory.json")
    parser.add_argument("--deepspeed-report", action="store_true",
                        help="Also print DeepSpeed's own all_cold tables for the PPO learner.")
    args = parser.parse_args()

    models, rows = {}, []
    for model, size in LED_SIZES.items():
        counts = parameter_counts(size)
        if args.deepspeed_report:
            deepspeed_report(counts)
        for which in ("policy", "learner"):
            for setup in SETUPS:
                for gpus in GPU_COUNTS:
                    gpu_gib, cpu_gib = model_states(counts[which], counts["largest_layer"], gpus, setup)
                    rows.append({"model": model, "trained": which, "setup": setup.label, **asdict(setup),
                                 "gpus": gpus, "nodes": nodes_for(gpus)[0], "gpu_gib": round(gpu_gib, 2),
                                 "cpu_per_node_gib": round(cpu_gib, 2)})
        start = time.perf_counter()
        activations = activation_estimate(size)
        print(f"{model}: activations measured in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        models[model] = {"size": asdict(size), "params": counts,
                         "activations_gib": {k: round(v, 3) for k, v in activations.items()}}

    result = {
        "source_tokens": SOURCE_TOKENS, "target_tokens": TARGET_TOKENS, "micro_batch": 1,
        "gpus_per_node": GPUS_PER_NODE, "models": models, "model_states": rows,
        "method": "model states: DeepSpeed estimate_zero{2,3}_model_states_mem_needs (buffer factor 1.5, "
                  "zero_init for ZeRO-3); activations: estimate from saved-tensor bytes of a bf16 CPU "
                  "forward per layer, scaled to the layer count (+ one recomputed layer when checkpointed)",
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("Model states, PPO learner (policy + value), GiB per GPU / GiB CPU RAM per node:\n")
    print(states_table(rows, "learner"))
    print("\nModel states, policy alone (SFT), GiB per GPU / GiB CPU RAM per node:\n")
    print(states_table(rows, "policy"))
    print(f"\nActivations (estimate), GiB, {SOURCE_TOKENS} + {TARGET_TOKENS} tokens, micro-batch 1, bf16:\n")
    print(activations_table(models))
    print("\nParameters:\n")
    print(params_table(models))


if __name__ == "__main__":
    main()
