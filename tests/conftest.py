"""Shared fixtures: one local Ray instance per test session, started only by tests that need it.

The session fails if a process it started is still running at its end (see pytest_sessionfinish).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

if TYPE_CHECKING:
    from rlhf.store import FeedbackStore

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "fixtures"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train's controller polls its workers every 2 s, so each of the suite's ~15 tiny Ray Train runs
# waits ~2.5 s more for its start and end to be seen; every 0.5 s costs the polls nothing measurable.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train also starts a PreemptionWatcher actor per run to follow node drains (spot instances); on
# one local node there is nothing to watch, and the actor's process cost ~4.5 CPU-s of every run.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray's log monitor lists the log folder anew 10 times a second while it holds under 1,000 files, and
# a session's hundreds of worker processes leave hundreds there: at 0 it lists every 0.5 s instead.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")

# Every process this session starts inherits this mark, Ray's raylet and workers too (Ray puts
# workers in process groups of their own, and they outlive their parent when they leak), so the
# end-of-session check finds them, and never another session's processes.
SESSION_MARK = "RLHF_TEST_SESSION"
os.environ[SESSION_MARK] = f"{os.getpid()}-{time.time_ns()}"
LEFTOVER_GRACE_S = 15  # ray.shutdown() returns before its workers have seen the raylet go


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A private local Ray (never joins a running cluster), shut down after the session."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


def _postgres_bindir() -> Path | None:
    """The server binaries, or None; `pg_config` alone is not enough: libpq-dev ships it without
    the server."""
    import shutil
    import subprocess

    if shutil.which("pg_config") is None:
        return None
    bindir = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip())
    return bindir if (bindir / "initdb").exists() else None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server (initdb + pg_ctl in a temp dir) for the session; its URL.

    initdb refuses to run as root, so as root the server runs as the `postgres` user the Debian
    package creates. fsync is off: the tests check behaviour, not disk durability.
    """
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL not installed; .ci/run installs it")
    pytest.importorskip("psycopg", reason="psycopg not installed; pip install 'psycopg[binary]'")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = Path(tempfile.mkdtemp(prefix="rlhf-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(workdir, "postgres")

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], cwd=workdir, check=True, capture_output=True)

    data = workdir / "data"
    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
    server_options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = (str(bindir / "pg_ctl"), "-D", str(data), "-w")
    run(*pg_ctl, "-l", str(workdir / "log"), "-o", server_options, "start")
    try:
        run(str(bindir / "createdb"), "-h", str(workdir), "-p", str(port), "-U", "postgres", "rlhf")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/rlhf"
    finally:
        run(*pg_ctl, "-m", "fast", "stop")
        shutil.rmtree(workdir, ignore_errors=True)


def _fresh_postgres_database(server_url: str) -> str:
    """A new, empty database on the session's server, so tests do not see each other's rows."""
    import sqlalchemy as sa

    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgres"])
def new_url(request: pytest.FixtureRequest, tmp_path) -> Callable[[], str]:
    """Makes URLs of empty feedback databases (not yet created by the store), of each kind:
    a SQLite file, and a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return lambda: f"sqlite:///{tmp_path}/{uuid.uuid4().hex[:8]}/feedback.db"
    server_url = request.getfixturevalue("postgres_url")
    return lambda: _fresh_postgres_database(server_url)


@pytest.fixture
def url(new_url: Callable[[], str]) -> str:
    """The URL of an empty feedback database of each kind."""
    return new_url()


@pytest.fixture
def store(url: str) -> Iterator[FeedbackStore]:
    """A feedback store on ``url``, closed after the test."""
    from rlhf.store import FeedbackStore

    opened = FeedbackStore(url)
    yield opened
    opened.close()


# Test files taking longest (pytest --durations), run first: `pytest -n 2 --dist loadfile` hands
# out whole files in collection order, so starting the long ones first lets both workers finish
# together instead of one waiting on the end-to-end test alone. pyproject's addopts pass
# --no-loadscope-reorder: by default pytest-xdist re-sorts files by their number of tests.
LONGEST_FIRST = ("online/test_e2e.py", "train/test_train.py", "ppo/test_ppo.py", "models/test_offline.py",
                 "dpo/test_dpo.py", "online/test_loop.py", "ppo/test_lora.py", "serve/test_app.py",
                 "serve/test_front_door.py", "models/test_lora.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Reorder by LONGEST_FIRST; the rest keep their order (a stable sort)."""
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.relative_to(ROOT / "tests").as_posix(), len(rank)))


def _running(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.status() != psutil.STATUS_ZOMBIE
    return False


def _started_by_this_session() -> list[psutil.Process]:
    """Running processes this session started: its descendants, and any carrying its mark."""
    me = psutil.Process()
    found = {proc.pid: proc for proc in me.children(recursive=True)}
    for proc in psutil.process_iter():
        if proc.pid != me.pid and proc.pid not in found:
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(SESSION_MARK) == os.environ[SESSION_MARK]:
                    found[proc.pid] = proc
    return [proc for proc in found.values() if _running(proc)]


@pytest.hookimpl(trylast=True)  # after the runner has torn down the session fixtures (Ray, PostgreSQL)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the run when a process it started outlives it, then kill that process.

    A leaked Ray worker holds memory and CPU on a small machine, unseen until someone runs ps,
    and slows or breaks every later run there.
    """
    _, alive = psutil.wait_procs(_started_by_this_session(), timeout=LEFTOVER_GRACE_S)
    leftovers = []
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            if _running(proc):
                leftovers.append(f"pid {proc.pid}: {' '.join(proc.cmdline()).strip()[:200]}")
                proc.kill()
    if not leftovers:
        return
    header = f"{len(leftovers)} process(es) started by the tests outlived them; killed now"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        print(header, *leftovers, sep="\n", file=sys.stderr)
    else:
        reporter.ensure_newline()
        reporter.write_sep("=", header, red=True)
        for line in leftovers:
            reporter.write_line(line)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
