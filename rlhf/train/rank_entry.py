"""The function Ray Train runs on each rank, in a module that imports nothing heavy.

Ray Train's controller unpickles the train function and its config to start the ranks. Defined
beside the loop, the function made that process import transformers, PEFT and our training code
(~3 CPU-s and ~0.4 GiB per run) although it never trains; the loop's inputs now travel as one
object-store reference that only the ranks resolve.
"""

from __future__ import annotations

from typing import Any


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Body of each Ray Train rank: the loop's inputs (``config["run"]``, an object ref), then the loop."""
    import ray

    from rlhf.train.supervised_loop import run_rank

    run_rank(ray.get(config["run"]))
