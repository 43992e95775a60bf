"""cluster.yaml passes Ray's own cluster-config checks offline, and fits the GPU configs.

Ray validates a launcher config in two steps, both without contacting AWS: ``prepare_config``
fills in the provider's defaults, then ``validate_config`` checks the result against the
JSON schema shipped in the package (``ray/autoscaler/ray-schema.json``) plus a few relations.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from support.paths import ROOT

from rlhf.config.core import load_config
from rlhf.ppo.config import PPOConfig
from rlhf.train.config import SFTConfig

CLUSTER = ROOT / "cluster.yaml"
DOC = ROOT / "docs" / "cluster.md"

# The GPU configs start from other jobs' outputs on the cluster; stand-ins for those folders.
GPU_CONFIGS = {
    "ppo_arxiv_led.yaml": ["policy.name_or_path=tiny-led", "value.name_or_path=tiny-led",
                           "reward.model.name_or_path=tiny-led"],
    "ppo_tldr_large.yaml": ["policy.name_or_path=tiny-t5", "value.name_or_path=tiny-t5",
                            "reward.model.name_or_path=tiny-t5"],
}


def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


def check(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before it touches the cloud: defaults, then schema and relations."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def node_types(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(head node type, the one worker node type)."""
    types = config["available_node_types"]
    head = config["head_node_type"]
    (worker,) = [t for name, t in types.items() if name != head]
    return types[head], worker


def test_cluster_yaml_passes_rays_validation() -> None:
    prepared = check(cluster())
    assert prepared["provider"]["type"] == "aws"
    # The head node type gets no workers of its own; the worker type keeps its bounds.
    head, worker = node_types(prepared)
    assert head["max_workers"] == 0
    assert worker["max_workers"] == cluster()["max_workers"]


def _unknown_top_level_key(c: dict[str, Any]) -> None:
    c["gpus_per_worker"] = 8


def _wrong_type(c: dict[str, Any]) -> None:
    c["max_workers"] = "two"


def _unknown_node_type_key(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu_worker"]["gpus"] = 8


def _fractional_gpu_resource(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5


def _min_workers_above_max(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu_worker"]["min_workers"] = c["max_workers"] + 1


def _unknown_head_type(c: dict[str, Any]) -> None:
    c["head_node_type"] = "gpu_head"


@pytest.mark.parametrize(("breakage", "error", "message"), [
    (_unknown_top_level_key, jsonschema.ValidationError, "Additional properties are not allowed"),
    (_wrong_type, jsonschema.ValidationError, "'two' is not of type 'integer'"),
    (_unknown_node_type_key, jsonschema.ValidationError, "Additional properties are not allowed"),
    (_fractional_gpu_resource, jsonschema.ValidationError, "0.5 is not of type 'integer'"),
    (_min_workers_above_max, ValueError, "smaller than the sum of `min_workers`"),
    (_unknown_head_type, ValueError, "`head_node_type` must be one of"),
])
def test_broken_copies_are_rejected(breakage: Callable[[dict[str, Any]], None], error: type[Exception],
                                    message: str) -> None:
    broken = cluster()
    breakage(broken)
    with pytest.raises(error, match=re.escape(message)):
        check(broken)


def test_cpu_head_and_autoscaled_gpu_workers() -> None:
    config = cluster()
    head, worker = node_types(config)
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("p", "g"))  # no GPU instance family
    assert worker["resources"]["GPU"] == 8
    assert worker["node_config"]["InstanceType"].startswith(("p4de.", "p5."))
    assert 1 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]


def test_setup_installs_torch_then_this_package_from_the_mounted_tree() -> None:
    config = cluster()
    assert config["file_mounts"] == {"~/rlhf": "."}
    assert ".gitignore" in config["rsync_filter"]  # .venv/ and runs/ stay behind
    commands = config["setup_commands"]
    torch = next(i for i, c in enumerate(commands) if "pip install" in c and "torch" in c)
    package = next(i for i, c in enumerate(commands) if "pip install" in c and "~/rlhf" in c)
    assert torch < package


def test_every_ray_process_has_auth_and_usage_stats_off() -> None:
    config = cluster()
    options = " ".join(config["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=disabled" in options
    assert "--env RAY_USAGE_STATS_ENABLED=0" in options
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("--disable-usage-stats" in c for c in starts if "ray start" in c)


def test_no_credentials_in_the_file() -> None:
    text = CLUSTER.read_text().lower()
    for word in ("aws_access_key", "aws_secret", "ssh_private_key", "password", "token:"):
        assert word not in text


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_gpu_ppo_configs_fit_one_worker_node(name: str) -> None:
    cfg = load_config(PPOConfig, str(ROOT / "configs" / name), GPU_CONFIGS[name])
    _, worker = node_types(cluster())
    roles = cfg.roles
    assert cfg.actors * roles.gpus_per_actor <= worker["resources"]["GPU"]
    assert cfg.actors * roles.cpus_per_actor <= worker["resources"]["CPU"]
    assert cfg.ppo.minibatch_size % roles.learner_workers == 0
    assert cfg.output_dir.startswith("/mnt/shared/")  # the file system every node mounts


def test_arxiv_ppo_config_is_the_long_document_setup() -> None:
    path = ROOT / "configs" / "ppo_arxiv_led.yaml"
    cfg = load_config(PPOConfig, str(path), GPU_CONFIGS[path.name])
    assert cfg.policy.max_source_length == cfg.value.max_source_length == 16384
    assert cfg.policy.gradient_checkpointing and cfg.value.gradient_checkpointing
    zero = cfg.roles.deepspeed
    assert (zero.zero_stage, zero.offload_optimizer, zero.offload_params) == (3, True, True)
    assert cfg.roles.gpus_per_actor == 1  # bf16 follows from running on GPUs
    sft = load_config(SFTConfig, str(ROOT / "configs" / "sft_arxiv_led.yaml"))
    assert yaml.safe_load(path.read_text())["policy"]["name_or_path"] == f"{sft.output_dir}/model"


def test_docs_show_the_memory_tables_the_benchmark_wrote(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    zero_memory = importlib.import_module("zero_memory")
    result = json.loads((ROOT / "benchmarks" / "results" / "zero_memory.json").read_text())
    doc = DOC.read_text()
    assert zero_memory.states_table(result["model_states"], "learner") in doc
    assert zero_memory.activations_table(result["models"]) in doc
    assert zero_memory.params_table(result["models"]) in doc
    for config in set(re.findall(r"configs/[\w.]+\.yaml", doc)):
        assert (ROOT / config).is_file(), config
