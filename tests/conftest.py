"""Shared fixtures: one local Ray instance per test session, started only by tests that need it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
