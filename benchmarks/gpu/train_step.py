"""One SFT or reward training step of an LED-base-16384-sized model at 16k input tokens, in bf16.

The product path on one rank: the task (``SFTTask`` / ``RewardTask``) builds the model from a saved
random-weight checkpoint of the real architecture's config (``benchmarks/architectures.py``), and
``rlhf.train.deepspeed_setup`` wraps it in DeepSpeed with the ZeRO stage and offload given here. Each run is
one setup in its own process, since an out-of-memory error leaves CUDA's allocator in no state to
measure the next one; a setup that does not fit is reported (peak memory when it failed), not fatal.

Reported per setup: seconds per optimizer step, tokens/s (document + summary tokens; a reward
step reads each document twice, once per summary), peak GPU memory, and model FLOPs utilisation:
the FLOPs of one forward+backward counted by ``torch.utils.flop_counter`` on the plain model
(no recomputation, so gradient checkpointing does not inflate it) over the step time, against the
bf16 matmul peak measured on the same card (8192^3 matmuls). On CPU it runs in fp32 and is only a
smoke test of the script (``--arch tiny-led``).

    for setup in "--zero 3 --offload-optimizer" "--zero 3" "--zero 2" "--zero 0"; do
      python benchmarks/gpu/train_step.py --task sft --arch led-base $setup --out results/gpu_train.jsonl
      python benchmarks/gpu/train_step.py --task reward --arch led-base $setup --out results/gpu_train.jsonl
    done
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from architectures import save_random  # noqa: E402
from gpu_common import bf16_matmul_peak, device_report, emit, peak_memory_gib, reset_peak_memory  # noqa: E402

from rlhf.config.sections import DeepSpeedConfig, ModelConfig  # noqa: E402
from rlhf.models import load_reward_model  # noqa: E402
from rlhf.ppo.roles import free_port, init_process_group  # noqa: E402
from rlhf.train.deepspeed_setup import deepspeed_config, initialize, zero3_init_context  # noqa: E402
from rlhf.train.reward import RewardTask  # noqa: E402
from rlhf.train.sft import SFTTask  # noqa: E402


def rows_for(task: str, batch: int, source_tokens: int, target_tokens: int) -> dict[str, list]:
    """A batch of canonical rows whose byte-level encodings (EOS included) fill the limits exactly."""
    document = ("the method improves the bound. " * (source_tokens // 31 + 1))[: source_tokens - 1]
    summary = ("we prove a tighter bound. " * (target_tokens // 26 + 1))[: target_tokens - 1]
    rows: dict[str, list] = {"original_text": [document] * batch, "summary": [summary] * batch}
    if task == "reward":
        rows = {"original_text": rows["original_text"], "summary_0": rows["summary"],
                "summary_1": [summary[::-1]] * batch, "choice": [1] * batch}
    return rows


def make_task(task: str, checkpoint: Path, args: argparse.Namespace):
    model_cfg = ModelConfig(name_or_path=str(checkpoint), max_source_length=args.source_tokens,
                            max_target_length=args.target_tokens,
                            gradient_checkpointing=args.gradient_checkpointing)
    if task == "sft":
        return SFTTask(model_cfg, batch_size=args.batch, rouge_rows=0, zero_stage=args.zero)
    return RewardTask(model_cfg, batch_size=args.batch, seed=0)


def step_flops(task, rows: dict[str, list], device: torch.device, dtype: torch.dtype) -> int:
    """FLOPs of one forward+backward of the plain model (no DeepSpeed, no recomputation)."""
    model = task.build_model().to(device, dtype)
    if hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = task.loss(model, rows)
        loss.backward()
    del model, loss
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("sft", "reward"), default="sft")
    parser.add_argument("--arch", default="led-base", help="see benchmarks/architectures.py")
    parser.add_argument("--source-tokens", type=int, default=16384)
    parser.add_argument("--target-tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1, help="micro-batch (pairs for the reward task)")
    parser.add_argument("--zero", type=int, default=3, choices=(0, 1, 2, 3))
    parser.add_argument("--offload-optimizer", action="store_true")
    parser.add_argument("--offload-params", action="store_true")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, help="append the result as one JSON line")
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    init_process_group(0, 1, "127.0.0.1", free_port(), gpu)
    result: dict = {"task": args.task, "arch": args.arch, "zero": args.zero,
                    "offload_optimizer": args.offload_optimizer, "offload_params": args.offload_params,
                    "gradient_checkpointing": args.gradient_checkpointing, "batch": args.batch,
                    "source_tokens": args.source_tokens, "target_tokens": args.target_tokens,
                    "dtype": str(dtype), **device_report()}
    rows = rows_for(args.task, args.batch, args.source_tokens, args.target_tokens)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint, result["parameters"] = save_random(args.arch, Path(folder))
        if args.task == "reward":  # a reward checkpoint: the backbone plus a scalar head
            load_reward_model(ModelConfig(name_or_path=str(checkpoint))).save(checkpoint)
        task = make_task(args.task, checkpoint, args)
        result["flops_per_step"] = step_flops(task, rows, device, dtype)
        result["peak_flops"] = bf16_matmul_peak(device)
        zero = DeepSpeedConfig(zero_stage=args.zero, offload_optimizer=args.offload_optimizer,
                               offload_params=args.offload_params)
        ds_config = deepspeed_config(zero, micro_batch_size=args.batch, lr=1e-5, max_grad_norm=1.0,
                                     bf16=gpu)
        reset_peak_memory(device)
        try:
            with zero3_init_context(ds_config):
                model = task.build_model()
            engine, _ = initialize(model, ds_config)
            result["memory_after_init_gib"] = peak_memory_gib(device)
            times = []
            for step in range(args.warmup + args.steps):
                start = time.perf_counter()
                loss, _ = task.loss(engine, rows)
                engine.backward(loss)
                engine.step()
                if gpu:
                    torch.cuda.synchronize()
                if step >= args.warmup:
                    times.append(time.perf_counter() - start)
            step_s = sorted(times)[len(times) // 2]
            reads = 2 if args.task == "reward" else 1  # chosen and rejected
            tokens = args.batch * (args.source_tokens + args.target_tokens) * reads
            result.update(fits=True, step_s=step_s, tokens_per_s=tokens / step_s, loss=loss.item(),
                          mfu=result["flops_per_step"] / step_s / result["peak_flops"])
        except torch.OutOfMemoryError as error:
            result.update(fits=False, error=str(error).splitlines()[0])
        result["peak_memory_gib"] = peak_memory_gib(device)
    emit(result, args.out)


if __name__ == "__main__":
    main()
