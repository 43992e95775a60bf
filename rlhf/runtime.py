"""What every job does the same way at run time: join Ray, tame Ray Data and Ray Train, derive seeds,
fit torch to the resources a worker reserved (its device, its threads), and import DeepSpeed.

Jobs join Ray as Ray itself would (``RAY_ADDRESS``, else the head that ``ray start`` recorded,
else a fresh local Ray) but fail in seconds, with the fix, where Ray would retry a dead head forever.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

from rlhf.errors import InputError

if TYPE_CHECKING:  # torch is imported where used: seeds and joining Ray need none of it
    import torch

GCS_PROBE_S = 5.0  # a head that is restarting answers within seconds
SEED_BITS = 31


def init_ray(**kwargs: Any) -> None:
    """``ray.init(**kwargs)`` unless Ray is up already; an unreachable head is an :class:`InputError`.

    A head recorded by ``ray start`` that has since died (machine restarted, ``ray stop`` never run)
    makes plain ``ray.init()`` retry "Failed to connect to GCS" forever; a short TCP probe of the
    address Ray would join turns that into one line naming the address and the fix.
    """
    import ray

    if ray.is_initialized():
        return
    address, temp_dir = kwargs.get("address"), kwargs.get("_temp_dir")
    if os.environ.get("RAY_ADDRESS") and address in (None, "auto"):
        address = os.environ["RAY_ADDRESS"]
        source, fix = "RAY_ADDRESS", "start that cluster or fix RAY_ADDRESS"
    elif address in (None, "auto"):
        source, fix = f"recorded by `ray start` in {_address_file(temp_dir)}", "run `ray stop` to clear it"
    else:
        source, fix = "address=", "start that cluster or fix the address"
    if address is None or "://" not in address:  # ray:// (Ray Client) checks its own connection
        gcs = _bootstrap_address(address, temp_dir)
        if gcs is not None and not _reachable(gcs, GCS_PROBE_S):
            raise InputError(f"no Ray cluster answers at {gcs} ({source}): {fix}, "
                             "or set RAY_ADDRESS=local for a fresh local Ray")
    ray.init(**kwargs)


def _address_file(temp_dir: str | None) -> str:
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(temp_dir)


def _bootstrap_address(address: str | None, temp_dir: str | None) -> str | None:
    """The GCS ``host:port`` that ``ray.init(address=address)`` would join; None: it starts a local Ray."""
    from ray._private import services

    # Quiet: with several Ray instances on the machine, Ray warns here which one it would join;
    # ray.init() warns the same when it joins, and a dead one becomes our one-line error instead.
    log = logging.getLogger(services.__name__)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return services.canonicalize_bootstrap_address(address, temp_dir)  # None is its "auto"
    except ConnectionError as err:  # address="auto" and no Ray running on this machine
        raise InputError(f"ray address=auto: {err}") from None
    finally:
        log.setLevel(level)


def _reachable(gcs: str, within_s: float) -> bool:
    """Whether something accepts TCP connections at ``gcs`` within ``within_s`` seconds."""
    from ray._common.network_utils import parse_address

    host, port = parse_address(gcs)
    deadline = time.monotonic() + within_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, int(port)), timeout=max(left, 0.1)):
                return True
        except OSError:
            if left <= 0.5:
                return False
            time.sleep(0.5)


def import_deepspeed() -> ModuleType:
    """DeepSpeed, with its shared-memory comm op switched off before any process group starts.

    Gloo does not need the op, and on a CPU host DeepSpeed JIT-compiles it (about a minute of two
    cores, and again whenever a process's compiler flags differ from the cached build's) the first
    time ``deepspeed.comm`` initialises: in ``zero.Init`` (a ZeRO-3 model build) as much as in
    ``deepspeed.initialize``. Every import of DeepSpeed in rlhf goes through here.
    """
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def quiet_ray_data() -> None:
    """Ray Data's per-dataset progress bars drown the training progress lines; turn them off."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_operator_progress_bars = False


@contextlib.contextmanager
def sigint_restored() -> Iterator[None]:
    """Put back the Ctrl-C handler that Ray Train's ``fit()`` replaces and never restores.

    Its handler holds the finished run's ``TrainController`` actor, so that process outlives the
    run for the rest of the driver's life, and a later Ctrl-C (a job's next step, a test session)
    "aborts" that finished run instead of interrupting.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None  # fit() sets none off the main thread
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def rendezvous_address() -> tuple[str, int]:
    """This node's address and a free port on it: where a process group's rank 0 listens.

    Run as a Ray task on rank 0's node; it lives here, beside no torch import, so the task's
    worker loads only this module (from rlhf.ppo it paid ~5 CPU-s of torch and transformers imports).
    """
    import ray

    return ray.util.get_node_ip_address(), free_port()


def derive_seed(seed: int, *parts: int) -> int:
    """A seed for one stream of randomness (an epoch, iteration, rank, shard, cycle) of a run.

    BLAKE2b of the decimal integers joined by commas, first 8 bytes big-endian, kept to the low
    31 bits: stable across processes and Python versions (unlike the salted ``hash``), so a resumed
    run replays the same order; well mixed, so neighbouring runs (seed 1, epoch 0 vs. seed 0,
    epoch 1) share no stream; non-negative and below 2**31 so every consumer takes it (torch,
    NumPy, Ray Data's ``local_shuffle_seed``, ``random``).
    """
    key = ",".join(str(int(p)) for p in (seed, *parts)).encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << SEED_BITS) - 1)


def compute_device(gpus: float, cuda_available: bool | None = None) -> torch.device:
    """The device of a worker that reserved ``gpus`` GPUs: CUDA only with GPUs reserved and CUDA present.

    Reserved but absent (a role or replica built outside Ray on a CPU-only machine, as tests and
    the single-process benchmark do) falls back to CPU rather than failing on the first ``.to``;
    nothing reserved stays on CPU even where CUDA exists, so co-located CPU workers never take a
    GPU they did not ask Ray for. ``cuda_available`` (default: ask torch) lets a caller decide
    for the worker a config will run on instead of for the process it is built in.
    """
    import torch

    present = torch.cuda.is_available() if cuda_available is None else cuda_available
    return torch.device("cuda" if gpus > 0 and present else "cpu")


def release_freed_memory() -> None:
    """Hand the system the heap pages a finished pass freed, before a larger one begins.

    glibc keeps freed heap memory for reuse, and a pass of no-grad forwards leaves it too scattered
    to serve a training step: a DPO rank that scored its reference first peaked at 11.1 GB instead
    of 7.9 GB (SmolLM2, stop 35). ``malloc_trim`` returns every whole free page; elsewhere than
    glibc it is a garbage collection only.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def thread_count(cpus: float, threads: int = 0) -> int:
    """``threads``, else (0) one per whole CPU reserved, at least 1."""
    return threads or max(1, int(cpus))


def set_torch_threads(cpus: float, threads: int = 0, *, export_omp: bool = False) -> None:
    """Torch intra-op threads: ``threads``, else (0) one per whole CPU reserved, at least 1.

    Sized to the reservation so co-located workers do not oversubscribe cores. ``export_omp``
    also sets ``OMP_NUM_THREADS`` (unless set) for OpenMP code loaded later and processes started
    later: Ray Train and Ray Data workers want that; roles and replicas leave the environment
    alone, since tests build them in the pytest process, whose environment later Ray workers
    would inherit.
    """
    import torch

    count = thread_count(cpus, threads)
    torch.set_num_threads(count)
    if export_omp:
        os.environ.setdefault("OMP_NUM_THREADS", str(count))
