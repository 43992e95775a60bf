"""rlhf.runtime: seeds derived from the run seed, joining Ray without hanging on a dead head, and
torch fitted to a reservation (device, threads)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support.paths import ROOT

from rlhf import runtime
from rlhf.errors import InputError
from rlhf.runtime import compute_device, derive_seed, init_ray, set_torch_threads, sigint_restored

# ---------------------------------------------------------------- derive_seed


def test_derive_seed_is_pinned_so_old_runs_resume_in_the_same_order() -> None:
    # Changing these values changes every data order and sample of every saved run.
    assert derive_seed(0) == 1137565557
    assert derive_seed(0, 0) == 768348812
    assert derive_seed(42, 3) == 1192593878


def test_derive_seed_is_the_same_in_a_fresh_process_with_another_hash_salt() -> None:
    code = "from rlhf.runtime import derive_seed; print(derive_seed(7, 1, 2))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(out.stdout) == derive_seed(7, 1, 2)


def test_derived_seeds_are_distinct_and_in_range() -> None:
    grid = [derive_seed(seed, part) for seed in range(50) for part in range(50)]
    assert len(set(grid)) == len(grid)  # no (seed, epoch) pair shares another's stream
    assert all(0 <= s < 2**31 for s in grid)
    # The old formulas collided: seed + epoch gave (1, 0) and (0, 1) the same order.
    assert derive_seed(1, 0) != derive_seed(0, 1)
    assert derive_seed(1, 2) != derive_seed(12) != derive_seed(1, 2, 0)
    assert 0 <= derive_seed(-1, 2**70) < 2**31  # any int goes in, a valid seed comes out


# ---------------------------------------------------------------- compute_device


def test_cuda_only_with_gpus_reserved_and_cuda_present() -> None:
    assert compute_device(0) == torch.device("cpu")
    assert compute_device(0, cuda_available=True) == torch.device("cpu")  # never an unreserved GPU
    assert compute_device(0.5, cuda_available=False) == torch.device("cpu")  # reserved, none here
    assert compute_device(0.5, cuda_available=True) == torch.device("cuda")
    assert compute_device(1) == torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- set_torch_threads


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """The test process's thread count back after the test, whatever it set."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("cpus", "threads", "expected"), [
    (2.0, 3, 3),  # the explicit count, even above the reservation
    (2.0, 0, 2),  # else the whole CPUs reserved
    (2.5, 0, 2),
    (0.5, 0, 1),  # at least 1
])
def test_torch_threads_follow_the_count_else_the_whole_cpus(
    torch_threads: None, monkeypatch: pytest.MonkeyPatch, cpus: float, threads: int, expected: int
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    set_torch_threads(cpus, threads)
    assert torch.get_num_threads() == expected
    assert "OMP_NUM_THREADS" not in os.environ  # only workers that ask export it


def test_a_worker_exports_its_thread_count_to_openmp_unless_set(
    torch_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    set_torch_threads(2.0, export_omp=True)
    assert os.environ["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    set_torch_threads(1.0, export_omp=True)
    assert os.environ["OMP_NUM_THREADS"] == "7" and torch.get_num_threads() == 1


# ---------------------------------------------------------------- sigint_restored


def test_freed_heap_memory_goes_back_to_the_system() -> None:
    """~300 MB of 1 KB objects on the heap, one in 64 kept: garbage collection alone leaves the
    freed pages resident (the kept objects pin the heap's top); release_freed_memory returns them."""
    code = (
        "import gc\nfrom rlhf.runtime import release_freed_memory\n"
        "def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
        "blocks = [bytes(1000) + bytes([i % 256]) for i in range(300_000)]\n"
        "kept = blocks[::64]\ndel blocks\ngc.collect()\nfreed = rss()\nrelease_freed_memory()\n"
        "print(freed, rss())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    freed, released = map(int, done.stdout.split())
    assert freed > 250 and released < freed - 200, (freed, released)


def test_the_ctrl_c_handler_comes_back_after_a_fit_that_replaced_it_and_failed() -> None:
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RuntimeError), sigint_restored():
        signal.signal(signal.SIGINT, lambda *_: None)  # what Ray Train's fit() does
        raise RuntimeError("training failed")
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------- init_ray


def _closed_port() -> int:
    """A port nothing listens on (bound on all interfaces, then released)."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return sock.getsockname()[1]


def _stale_record(ray_tmpdir: Path, port: int) -> Path:
    """What `ray start` leaves behind when its head dies: Ray's temp folder naming a dead GCS."""
    record = ray_tmpdir / "ray" / "ray_current_cluster"
    record.parent.mkdir(parents=True)
    record.write_text(f"127.0.0.1:{port}")
    return record


@pytest.fixture
def fake_ray_init(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Stands in for ``ray.init``: records the calls, starts nothing."""
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runtime, "GCS_PROBE_S", 0.5)
    return calls


def test_a_stale_record_is_an_input_error_naming_address_and_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_ray_init: list[dict]
) -> None:
    port = _closed_port()
    record = _stale_record(tmp_path, port)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    with pytest.raises(InputError) as raised:
        init_ray()
    assert f":{port} (recorded by `ray start` in {record}): run `ray stop`" in str(raised.value)
    assert str(raised.value).endswith("or set RAY_ADDRESS=local for a fresh local Ray")
    assert fake_ray_init == []


def test_a_dead_ray_address_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, fake_ray_init: list[dict]
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    with pytest.raises(InputError, match=r"\(RAY_ADDRESS\): start that cluster or fix RAY_ADDRESS"):
        init_ray(num_cpus=1)
    assert fake_ray_init == []


def test_a_live_head_and_local_go_to_ray_init_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_ray_init: list[dict]
) -> None:
    with socket.create_server(("0.0.0.0", 0)) as head:
        _stale_record(tmp_path, head.getsockname()[1])
        monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
        init_ray(num_cpus=1)  # the recorded head answers: Ray joins it as it would have
        monkeypatch.setenv("RAY_ADDRESS", "local")
        init_ray()  # a fresh local Ray: the record is not even read
    assert fake_ray_init == [{"num_cpus": 1}, {}]


def test_an_initialized_ray_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **_: pytest.fail("ray.init called twice"))
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    init_ray()


def test_a_job_facing_a_stale_record_exits_2_in_seconds_with_one_line(tmp_path: Path) -> None:
    port = _closed_port()
    _stale_record(tmp_path / "ray_tmp", port)
    # RAY_TMPDIR points Ray at our record only: no real cluster on this machine can be joined.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path / "ray_tmp")
    start = time.monotonic()
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "ppo.py"), f"output_dir={tmp_path / 'out'}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                           start_new_session=True)
    try:
        _, stderr = job.communicate(timeout=60)
    finally:  # a hung job and anything it started end here
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.wait()
    elapsed = time.monotonic() - start
    assert job.returncode == 2, stderr
    assert elapsed < 45
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("ppo.py: error: no Ray cluster answers at ") and f":{port} " in lines[0]
    assert "`ray stop`" in lines[0] and "RAY_ADDRESS=local" in lines[0]
    assert "Traceback" not in stderr
