"""check_url: a bad ``store.url`` fails in seconds with one line, before any job starts Ray."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from support.paths import ROOT

from rlhf.runtime import free_port
from rlhf.store import StoreInputError, check_url
from rlhf.store.connection import ACCEPTED_FORMS


def _check_fails(url: str, match: str, timeout_s: float = 5.0) -> str:
    """The one-line message check_url raises for ``url``; it names store.url and the accepted forms."""
    with pytest.raises(StoreInputError, match=match) as info:
        check_url(url, timeout_s=timeout_s)
    message = str(info.value)
    assert message.startswith("store.url: ") and "\n" not in message
    return message


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and then never says a word, like a hung server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("url", ["feedback.db", "postgresql+psycopg://u@h:${PORT}/db"])
def test_not_a_url(url: str):
    assert ACCEPTED_FORMS in _check_fails(url, "not a valid SQLAlchemy URL")


def test_unknown_dialect():
    assert ACCEPTED_FORMS in _check_fails("notaurl://x", "unknown database dialect or driver 'notaurl'")


def test_known_dialect_with_a_driver_that_is_not_installed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "MySQLdb", None)  # import fails as if it were not installed
    message = _check_fails("mysql+mysqldb://u@h/db", r"driver of 'mysql\+mysqldb' is not installed")
    assert "MySQLdb" in message and ACCEPTED_FORMS in message


def test_an_unset_variable_is_named(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("RLHF_TEST_UNSET", raising=False)
    _check_fails("postgresql+psycopg://u:${RLHF_TEST_UNSET}@127.0.0.1/db",
                 r"uses \$\{RLHF_TEST_UNSET\} but the environment variable RLHF_TEST_UNSET is not set")


def test_postgres_on_a_closed_port_fails_fast_without_the_password(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("psycopg")
    monkeypatch.setenv("RLHF_TEST_PASSWORD", "s3cret-Pa55")
    start = time.monotonic()
    message = _check_fails(f"postgresql+psycopg://u:${{RLHF_TEST_PASSWORD}}@127.0.0.1:{free_port()}/db",
                           "cannot connect to the database .*refused", timeout_s=3.0)
    assert time.monotonic() - start < 3.0
    assert "s3cret" not in message and ACCEPTED_FORMS in message


def test_a_server_that_does_not_answer_times_out(silent_port: int):
    pytest.importorskip("psycopg")
    start = time.monotonic()
    _check_fails(f"postgresql+psycopg://u@127.0.0.1:{silent_port}/db",
                 f"no answer from the database server at 127.0.0.1:{silent_port} within 1 s", timeout_s=1.0)
    assert 1.0 <= time.monotonic() - start < 2.5


def test_a_sqlite_folder_that_cannot_be_created(tmp_path: Path):
    (tmp_path / "file").write_text("not a folder")
    _check_fails(f"sqlite:///{tmp_path}/file/sub/feedback.db", "cannot create the folder of the SQLite file")


def test_a_good_sqlite_url_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RLHF_TEST_DIR", str(tmp_path))
    check_url("sqlite:///${RLHF_TEST_DIR}/new/feedback.db")
    assert (tmp_path / "new").is_dir()


def test_the_real_postgres_server_passes(postgres_url: str, monkeypatch: pytest.MonkeyPatch):
    url = sa.make_url(postgres_url)
    monkeypatch.setenv("RLHF_TEST_PASSWORD", "any")  # the test server trusts every password
    start = time.monotonic()
    check_url(f"postgresql+psycopg://postgres:${{RLHF_TEST_PASSWORD}}@{url.host}:{url.port}/{url.database}")
    assert time.monotonic() - start < 5.0


def test_serve_job_exits_2_before_ray_starts(tmp_path: Path):
    ray_tmp = tmp_path / "ray_tmp"  # ray.init() would create ray_tmp/ray/session_*
    ray_tmp.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "jobs/serve.py", "store.url=notaurl://x", f"output_dir={tmp_path / 'out'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "serve.py: error: store.url: unknown database dialect or driver 'notaurl'; "
        f"accepted forms: {ACCEPTED_FORMS}"
    ]
    assert list(ray_tmp.iterdir()) == []
    assert elapsed < 20, f"took {elapsed:.1f} s"
