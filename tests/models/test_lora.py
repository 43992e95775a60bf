"""LoRA through PEFT: family defaults, adapter folders, the merge command, SFT with adapters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.cli import run_cli
from support.paths import ROOT
from support.train import easy_preferences

from rlhf.config.core import load_config
from rlhf.config.sections import DeepSpeedConfig, LoraConfig, ModelConfig
from rlhf.dpo.config import DPOAlgoConfig
from rlhf.dpo.pairs import pair_logprobs
from rlhf.dpo.task import DPOTask
from rlhf.errors import InputError
from rlhf.models import load_policy, load_reward_model
from rlhf.models.lora import target_modules
from rlhf.models.scoring import load_frozen_policy
from rlhf.models.tiny import build_tiny_lm
from rlhf.ppo.roles import init_process_group
from rlhf.runtime import free_port
from rlhf.train.config import SFTConfig
from rlhf.train.deepspeed_setup import deepspeed_config, initialize, zero3_init_context
from rlhf.train.reward import bradley_terry_loss
from rlhf.train.sft import run_sft
from rlhf.train.zero_gather import cpu_copies, parameter_gather, save_gathered, unique_tensors

DATA = ROOT / "tests" / "fixtures"
POSTS = ["the cat sat on the mat all day long", "a short post about a long walk in the hills"]


def _logits(policy, documents: list[str] = POSTS) -> torch.Tensor:
    batch = policy.encode_pairs(documents, ["a summary"] * len(documents))
    with torch.no_grad():
        return policy.model(**batch).logits


def _perturb_adapters(policy) -> None:
    """LoRA starts with B = 0 (no change); give every adapter a visible update."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


@pytest.mark.parametrize(("preset", "adapted"), [
    ("tiny-t5", {"q", "v"}), ("tiny-bart", {"q_proj", "v_proj"}), ("tiny-gpt2", {"c_attn"}),
    ("tiny-llama", {"q_proj", "v_proj"}), ("tiny-led", {"query", "value", "q_proj", "v_proj"}),
])
def test_adapters_on_every_family_train_alone_and_start_as_the_base(preset: str, adapted: set[str]) -> None:
    cfg = ModelConfig(name_or_path=preset, max_source_length=64, max_target_length=16)
    base, policy = load_policy(cfg), load_policy(cfg, lora=LoraConfig(r=4))
    trainable = [name for name, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert {name.split(".lora_")[0].split(".")[-1] for name in trainable} == adapted
    assert policy.adapted and not base.adapted
    torch.testing.assert_close(_logits(policy), _logits(base), rtol=0, atol=1e-6)  # B = 0 at the start


def test_a_family_without_a_default_needs_target_modules() -> None:
    with pytest.raises(InputError, match=r"^lora\.target_modules: no default for model type 'longt5'"):
        target_modules(LoraConfig(r=8), "longt5")
    assert target_modules(LoraConfig(r=8, target_modules=["q", "k"]), "longt5") == ["q", "k"]
    with pytest.raises(InputError, match=r"^lora\.target_modules: .*not found"):
        load_policy(ModelConfig(name_or_path="tiny-t5"), lora=LoraConfig(r=8, target_modules=["nope"]))


def test_an_adapter_folder_names_its_base_and_merges_into_a_plain_model(tmp_path: Path) -> None:
    cfg = ModelConfig(name_or_path="tiny-t5", max_source_length=64, max_target_length=16)
    policy = load_policy(cfg, lora=LoraConfig(r=4))
    _perturb_adapters(policy)
    expected = _logits(policy)
    assert not torch.allclose(expected, _logits(load_policy(cfg)))  # the adapters changed outputs

    adapter = tmp_path / "adapter"
    policy.save_adapter(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-t5"
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)  # the adapter only, not the base
    torch.testing.assert_close(_logits(load_policy(ModelConfig(name_or_path=str(adapter)))), expected,
                               rtol=1e-4, atol=1e-4)  # merged: W + BA in one matmul

    merged = tmp_path / "merged"
    run = run_cli("rlhf.models", "merge", str(adapter), str(merged))
    assert run.returncode == 0, run.stderr
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    # It loads with transformers alone (peft made unimportable) and gives the adapted outputs.
    probe = (f"import sys; sys.modules['peft'] = None\n"
             f"import torch; from transformers import AutoModelForSeq2SeqLM\n"
             f"m = AutoModelForSeq2SeqLM.from_pretrained({str(merged)!r})\n"
             f"print(sum(p.numel() for p in m.parameters()))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert int(loaded.stdout.split()[-1]) == sum(p.numel() for p in build_tiny_lm("tiny-t5").parameters())
    torch.testing.assert_close(_logits(load_policy(ModelConfig(name_or_path=str(merged)))), expected,
                               rtol=1e-4, atol=1e-4)  # merged: W + BA in one matmul

    wrong = run_cli("rlhf.models", "merge", str(merged), str(tmp_path / "x"))
    assert wrong.returncode == 2 and "has no adapter_config.json" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_the_dpo_reference_of_an_adapted_policy_is_its_base_with_the_adapter_off() -> None:
    """No second copy: the adapted policy, adapters disabled and dropout off, scores exactly as a
    frozen copy of the initial policy does, while training mode and the adapters stay as they were."""
    cfg = ModelConfig(name_or_path="tiny-t5", max_source_length=64, max_target_length=16)
    task = DPOTask(cfg, DPOAlgoConfig(reference="online", dropout=True), batch_size=2, dtype="fp32",
                   lora=LoraConfig(r=4, dropout=0.3))
    model = task.build_model().train()
    _perturb_adapters(task.policy)
    rows = {"original_text": POSTS, "summary_0": ["a cat", "a walk"], "summary_1": ["the mat", "hills"],
            "choice": [0, 1]}
    reference = task._reference(rows, torch.device("cpu"))
    frozen = load_frozen_policy(cfg)
    with torch.no_grad():
        expected = pair_logprobs(frozen.model, frozen, rows)
    for got, want in zip(reference, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert model.training  # put back for the next training step
    with torch.no_grad():
        adapted = pair_logprobs(model.eval(), task.policy, rows)
    assert not torch.allclose(adapted[0], expected[0])  # the adapters are on again


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 0.05)],
                         ids=["fp32", "bf16"])
def test_a_zero3_reward_model_with_adapters_starts_as_its_base_and_saves_merged_from_gathered_buckets(
    tmp_path: Path, dtype: torch.dtype, atol: float
) -> None:
    """ZeRO-3 partitions the adapters (in the base's dtype: mixed dtypes fail in bf16) with their
    PEFT init (A random, B = 0); after a step the folder written from buckets of gathered copies,
    as the training loop saves, is the engine's model merged (no peft), in fp32 to 1e-5."""
    init_process_group(0, 1, "127.0.0.1", free_port(), False)  # one rank, as a Learner opens it
    cfg = ModelConfig(name_or_path="tiny-gpt2", max_source_length=64, max_target_length=32)
    config = deepspeed_config(DeepSpeedConfig(zero_stage=3), micro_batch_size=2, lr=1e-2,
                              max_grad_norm=1.0, bf16=dtype == torch.bfloat16)
    with zero3_init_context(config):
        model = load_reward_model(cfg, lora=LoraConfig(r=4, dropout=0.0))
    engine, _ = initialize(model, config)
    gather = parameter_gather(3)
    start = cpu_copies(unique_tensors(model), list(unique_tensors(model)), gather)
    assert {t.dtype for t in start.values()} == {dtype}
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())  # all partitioned
    lora_a, lora_b = ([t for name, t in start.items() if f".lora_{m}." in name] for m in "AB")
    assert lora_a and all(t.abs().sum() > 0 for t in lora_a) and all(not t.any() for t in lora_b)
    batch = model.encode_pairs(["one document", "another document"], ["a summary", "b"])
    engine.eval()
    with torch.no_grad(), model.backbone.disable_adapter():
        base = engine(**batch)
    with torch.no_grad():
        torch.testing.assert_close(engine(**batch), base, rtol=0, atol=0)
    engine.train()
    engine.backward(engine(**batch).float().pow(2).mean())
    engine.step()
    engine.eval()
    save_gathered(model, lambda state: model.save(tmp_path / "reward", state), gather)
    saved = load_reward_model(ModelConfig(name_or_path=str(tmp_path / "reward"), max_source_length=64))
    assert not (tmp_path / "reward" / "adapter_config.json").exists()
    assert not any(".lora_" in name for name, _ in saved.named_parameters())
    with torch.no_grad():
        trained = engine(**batch).float()
        torch.testing.assert_close(saved(**batch).float(), trained, rtol=0, atol=atol)
        assert not torch.allclose(trained, base.float(), atol=atol)  # the step changed it


def test_sft_with_lora_lowers_validation_loss_and_leaves_the_base_untouched(ray_local, tmp_path: Path):
    cfg = load_config(SFTConfig, None, [
        f"output_dir={tmp_path}", f"data.path={DATA / 'tldr_sft_sample.jsonl'}", "data.limit=40",
        "model.name_or_path=tiny-t5", "model.max_source_length=192", "model.max_target_length=48",
        "rouge_rows=0", "train.batch_size=4", "train.lr=1e-2", "train.max_steps=12", "train.eval_every=12",
        "train.save_every=12", "train.log_every=4", "lora.r=8", "lora.alpha=16",
    ])
    result = run_sft(cfg)
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if r["event"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3, evals
    trained, base = load_file(result.model_dir / "model.safetensors"), build_tiny_lm("tiny-t5").state_dict()
    assert not (result.model_dir / "adapter_config.json").exists()  # lora.publish=merged by default
    changed = {key for key in trained if not torch.equal(trained[key], base[key])}
    # Only the adapted projections moved (their merged weights); everything else is the base, exactly.
    assert changed and all(key.endswith((".q.weight", ".v.weight")) for key in changed), sorted(changed)[:5]


def test_a_reward_model_with_adapters_trains_adapters_and_heads_and_saves_merged(tmp_path: Path) -> None:
    """Adapters on the backbone, both ODIN heads whole; twenty steps fit an easy preference, and the
    saved folder (merged) loads without peft and scores as the adapted model did."""
    cfg = ModelConfig(name_or_path="tiny-gpt2", max_source_length=64, max_target_length=32)
    model = load_reward_model(cfg, heads="disentangled", lora=LoraConfig(r=4, dropout=0.0)).train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name or name.startswith("head.") for name in trainable)
    pairs = easy_preferences(tmp_path / "easy.jsonl", 16)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    documents = [r["original_text"] for r in rows]
    chosen = [r[f"summary_{r['choice']}"] for r in rows]
    rejected = [r[f"summary_{1 - r['choice']}"] for r in rows]
    batch = model.encode_pairs(documents + documents, chosen + rejected)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        scores = model(score="total", **batch)  # (2B,)
        loss, _, _ = bradley_terry_loss(scores[:16], scores[16:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    model.eval().save(tmp_path / "reward")
    assert not (tmp_path / "reward" / "adapter_config.json").exists()
    plain = load_reward_model(ModelConfig(name_or_path=str(tmp_path / "reward"), max_source_length=64,
                                          max_target_length=32))
    assert not any(".lora_" in name for name, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(score="total", **batch), model(score="total", **batch),
                                   rtol=0, atol=1e-5)
