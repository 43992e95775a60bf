"""The serving front door under attack, against one real Serve app over HTTPS (a self-signed
certificate): parser bombs, bodies over their limit, generation past the model's positions, gold
pairs told apart by latency, the Host header, rate limits behind a proxy, input that is JSON but
not text, and what must never leak; the store-side rules on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import json
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from support.cli import run_cli
from support.pdf import piled_lines, short_word_lines
from support.serve import publish_tiny, serve_config, start_with_admin

from rlhf.serve.access import RateLimiter, client_address
from rlhf.store import FeedbackStore, InvalidFeedbackError
from rlhf.store.queue import GoldPair, LabelingQueue

ADMIN_TOKEN = "front-door-admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
LONG_TEXT = " ".join(f"word{i} of the harbour report" for i in range(600))
PER_ADDRESS = 6
MAX_JSON_BYTES = 100_000
PDF_TIMEOUT_S = 4


@dataclass
class App:
    url: str
    cert: str
    store: FeedbackStore
    port: int
    addresses: Iterator[int] = field(default_factory=itertools.count)

    def call(
        self, method: str, path: str, token: str | None = None, client: str | None = None, **kwargs
    ) -> requests.Response:
        """A request as from its own client address (X-Forwarded-For from the trusted loopback
        proxy), so only the rate-limit test shares a bucket."""
        headers = {"X-Forwarded-For": client or f"10.1.{next(self.addresses)}.1", **kwargs.pop("headers", {})}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return requests.request(
            method, self.url + path, headers=headers, verify=self.cert, timeout=120, **kwargs
        )

    def labeler(self, name: str) -> str:
        answer = self.call("POST", "/admin/labelers", json={"name": name}, headers=ADMIN)
        assert answer.status_code == 200, answer.text
        return answer.json()["token"]


def _certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """Labeler auth, HTTPS, a causal tiny policy whose prompt leaves 32 positions, half the queue
    gold, per-address limits behind the loopback proxy, and a PDF parse stopped after a few seconds
    (its page caps raised, so a bomb runs into the time limit)."""
    from ray import serve

    root = tmp_path_factory.mktemp("front_door")
    cert, key = _certificate(root)
    publish_tiny(root / "registry", seed=1, preset="tiny-gpt2")
    cfg = serve_config(
        root / "registry",
        root / "feedback.db",
        "policy.name_or_path=tiny-gpt2",
        "policy.max_source_length=480",
        "serve.max_new_tokens=600",
        "serve.labeler_auth=true",
        "serve.gold_rate=0.5",
        f"serve.requests_per_minute_per_address={PER_ADDRESS}",
        "serve.trusted_proxies=[127.0.0.1]",
        f"serve.max_json_bytes={MAX_JSON_BYTES}",
        "serve.max_upload_bytes=300000",
        f"serve.ssl_certfile={cert}",
        f"serve.ssl_keyfile={key}",
        f"serve.pdf.timeout_s={PDF_TIMEOUT_S}",
        "serve.pdf.max_chars_per_page=1000000",
        "serve.pdf.max_boxes_per_page=1000000",
    )
    url = start_with_admin(cfg, ADMIN_TOKEN)
    store = FeedbackStore(cfg.store.url)
    yield App(url, str(cert), store, cfg.serve.port)
    store.close()
    serve.shutdown()


def test_the_app_speaks_https_only_and_answers_only_its_own_host_names(app: App):
    assert app.url.startswith("https://")
    with pytest.raises(requests.ConnectionError):
        requests.get(app.url.replace("https://", "http://") + "/healthz", timeout=10)
    assert app.call("GET", "/healthz").json() == {"status": "ok"}
    assert app.call("GET", "/healthz", headers={"Host": f"localhost:{app.port}"}).status_code == 200
    rebound = app.call("GET", "/v1/policy", headers={"Host": "attacker.example"})  # DNS rebinding
    assert rebound.status_code == 400


def test_a_pdf_bomb_is_stopped_at_its_time_limit_while_other_requests_are_answered(app: App):
    token = app.labeler("pdf")
    assert app.call("POST", "/v1/documents", files={"file": ("a.pdf", b"%PDF-1.4")}).status_code == 401
    answers: list[requests.Response] = []
    upload = threading.Thread(
        target=lambda: answers.append(
            app.call(
                "POST",
                "/v1/documents",
                token,
                files={"file": ("bomb.pdf", piled_lines(6000), "application/pdf")},
            )
        )
    )
    started = time.monotonic()
    upload.start()
    latencies = []
    while upload.is_alive():
        sent = time.monotonic()
        assert app.call("GET", "/v1/labeler/me", token).status_code == 200
        latencies.append(time.monotonic() - sent)
        time.sleep(0.2)
    upload.join()
    assert answers[0].status_code == 422 and "timeout_s" in answers[0].json()["detail"], answers[0].text
    assert PDF_TIMEOUT_S <= time.monotonic() - started < PDF_TIMEOUT_S + 10
    assert len(latencies) >= 5 and max(latencies) < 1.5, latencies
    few_words = app.call("POST", "/v1/documents", token, files={"file": ("w.pdf", short_word_lines())})
    assert few_words.status_code == 422 and few_words.json()["detail"].startswith("file: "), few_words.text


def _raw_request(app: App, head: str, body_chunks: Iterator[bytes]) -> tuple[str, float]:
    """Send ``head`` and then ``body_chunks`` over TLS until the server answers; (its status line,
    seconds from the first byte sent to the answer)."""
    context = ssl.create_default_context(cafile=app.cert)
    with (
        socket.create_connection(("127.0.0.1", app.port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        started = time.monotonic()
        conn.sendall(head.encode())
        conn.settimeout(0.05)
        answer = b""
        for chunk in body_chunks:
            try:
                answer += conn.recv(4096)
            except (TimeoutError, ssl.SSLWantReadError):
                pass
            if answer:
                break
            try:
                conn.sendall(chunk)
            except OSError:
                break
        conn.settimeout(30)
        while b"\r\n" not in answer:
            answer += conn.recv(4096)
        return answer.split(b"\r\n", 1)[0].decode(), time.monotonic() - started


def test_a_body_over_its_routes_limit_answers_413_before_it_is_read(app: App):
    declared = (
        f"POST /v1/compare HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\nContent-Type: application/json\r\n"
        "Content-Length: 5000000000\r\n\r\n"
    )
    status, seconds = _raw_request(app, declared, iter([b"{" + b" " * 1024] * 1000))
    assert status.startswith("HTTP/1.1 413") and seconds < 5, (status, seconds)
    chunked = (
        f"POST /v1/compare HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b" " * 16384
    chunks = (b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(10_000))  # 160 MB if never stopped
    status, seconds = _raw_request(app, chunked, chunks)
    assert status.startswith("HTTP/1.1 413") and seconds < 10, (status, seconds)
    big_pdf = app.call(
        "POST", "/v1/documents", app.labeler("big"), files={"file": ("x.pdf", b"%PDF" + b"0" * 400_000)}
    )
    assert big_pdf.status_code == 413 and "limit" in big_pdf.json()["detail"]
    assert app.call("GET", "/healthz").status_code == 200


def test_generation_is_cut_to_the_models_positions_and_a_long_request_fails_nobody(app: App):
    token = app.labeler("gen")
    results: dict[int, requests.Response] = {}

    def ask(n: int) -> None:
        body = (
            {"text": LONG_TEXT, "max_new_tokens": 1000}
            if n == 0
            else {"text": f"The council met on day {n} to vote on the budget.", "max_new_tokens": 8}
        )
        results[n] = app.call("POST", "/v1/summarize", token, json=body)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {n: r.status_code for n, r in results.items()} == dict.fromkeys(range(4), 200), [
        r.text for r in results.values()
    ]
    assert results[0].json()["truncated"] is True


def test_gold_pairs_cannot_be_told_from_fresh_ones_by_latency_or_fields(app: App):
    token = app.labeler("gold-probe")
    gold = "\n".join(
        json.dumps(
            {
                "text": f"{LONG_TEXT} gold {i}",
                "summary_0": f"right {i}",
                "summary_1": f"wrong {i}",
                "answer": 0,
            }
        )
        for i in range(4)
    )
    assert app.call("POST", "/admin/gold", data=gold, headers=ADMIN).json() == {"stored": 4}
    queue = "\n".join(json.dumps({"text": f"{LONG_TEXT} queue {i}"}) for i in range(4))
    assert app.call("POST", "/admin/documents", data=queue, headers=ADMIN).json() == {"stored": 4}
    latency: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(40):
        sent = time.monotonic()
        shown = app.call("POST", "/v1/compare", token, json={"max_new_tokens": 32})
        took = time.monotonic() - sent
        assert shown.status_code == 200, shown.text
        body = shown.json()
        assert set(body) == {"comparison_id", "summaries", "truncated", "text", "title"}
        assert body["truncated"] is True  # every document here is longer than the prompt window
        is_gold = app.store.get_comparison(body["comparison_id"]).gold_id is not None
        latency[is_gold].append(took)
    assert min(map(len, latency.values())) >= 8, latency
    # How often a gold answer is slower than a fresh one: 0.5 when latency tells nothing; today's
    # code answered gold pairs from the database in milliseconds (near 0).
    pairs = [(g, f) for g in latency[True] for f in latency[False]]
    slower = sum(g > f for g, f in pairs) / len(pairs)
    assert 0.2 < slower < 0.8, (slower, latency)


def test_with_labeler_auth_the_queue_never_shows_another_users_pasted_text(app: App):
    paster, reader = app.labeler("paster"), app.labeler("reader")
    secret = "My private draft about the merger, pasted only to compare summaries of it."
    assert app.call("POST", "/v1/compare", paster, json={"text": secret}).status_code == 200
    shown = {
        app.call("POST", "/v1/compare", reader, json={"max_new_tokens": 4}).json()["text"] for _ in range(12)
    }
    assert secret not in shown and all("queue" in text or "gold" in text for text in shown)


def test_rate_limits_key_on_the_client_behind_a_trusted_proxy_and_cover_every_generating_route(app: App):
    token = app.labeler("limited")
    routes = [
        ("/v1/summarize", {"json": {"text": "A short note.", "max_new_tokens": 4}}),
        ("/v1/compare", {"json": {"text": "A short note.", "max_new_tokens": 4}}),
        ("/v1/documents", {"files": {"file": ("a.pdf", b"%PDF-1.4 nothing")}}),
    ]
    codes = [
        app.call("POST", route, token, client="203.0.113.7", **kwargs).status_code
        for route, kwargs in routes * PER_ADDRESS
    ]
    assert codes.count(429) == len(codes) - PER_ADDRESS and 429 not in codes[:PER_ADDRESS]
    other = app.call("POST", "/v1/summarize", token, client="203.0.113.8", json={"text": "Another note."})
    assert other.status_code == 200  # its own bucket
    spoofed = app.call(
        "POST", "/v1/summarize", token, client="198.51.100.1, 203.0.113.7", json={"text": "A note."}
    )
    assert spoofed.status_code == 429  # the proxy appended the real client last; the rest is a claim


def test_input_that_is_json_but_not_text_answers_422_and_unknown_fields_are_refused(app: App):
    token = app.labeler("unicode")
    for body in (
        '{"text": "a\\ud800b"}',
        '{"text": "a\\u0000b"}',
        '{"text": "ok", "title": "\\udfff"}',
        '{"txt": "a typo"}',
    ):
        answer = app.call(
            "POST", "/v1/compare", token, data=body, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 422, (body, answer.text)
        assert any(name in answer.json()["detail"] for name in ("text", "title", "txt"))
    comparison = app.call(
        "POST", "/v1/compare", token, json={"text": "The mayor resigned.", "max_new_tokens": 4}
    )
    comparison_id = comparison.json()["comparison_id"]
    for body in (
        f'{{"comparison_id": "{comparison_id}", "choice": 0, "note": "bad\\u0000"}}',
        '{"comparison_id": "x\\ud800", "choice": 0}',
    ):
        answer = app.call(
            "POST", "/v1/feedback", token, data=body, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 422, answer.text
    assert app.call("DELETE", "/admin/labelers/a%00b", headers=ADMIN).status_code == 422


def test_an_answer_differing_only_in_confidence_or_note_is_a_conflict(app: App):
    token = app.labeler("changer")
    comparison_id = app.call(
        "POST", "/v1/compare", token, json={"text": "Rain is due.", "max_new_tokens": 4}
    ).json()["comparison_id"]
    first = {"comparison_id": comparison_id, "choice": 1, "confidence": 2}
    assert app.call("POST", "/v1/feedback", token, json=first).status_code == 200
    assert app.call("POST", "/v1/feedback", token, json=first).status_code == 200  # a retry
    for changed in ({**first, "confidence": 4}, {**first, "note": "on reflection"}):
        assert app.call("POST", "/v1/feedback", token, json=changed).status_code == 409
    assert app.store.get_comparison(comparison_id).confidence == 2


def test_admin_tokens_need_the_bearer_scheme_in_any_case(app: App):
    assert (
        app.call("GET", "/admin/labelers", headers={"Authorization": f"bearer {ADMIN_TOKEN}"}).status_code
        == 200
    )
    assert (
        app.call("GET", "/admin/labelers", headers={"Authorization": f"BEARER {ADMIN_TOKEN}"}).status_code
        == 200
    )
    assert app.call("GET", "/admin/labelers", headers={"Authorization": ADMIN_TOKEN}).status_code == 401


def test_readiness_names_the_part_that_failed_but_not_its_error(app: App):
    """Last of the app's tests: it breaks the database under the running app."""
    with sqlite3.connect(app.store.engine.url.database, isolation_level=None) as conn:  # foreign keys off
        conn.execute("DROP TABLE comparisons")
    answer = app.call("GET", "/readyz")
    assert answer.status_code == 503
    assert answer.json() == {"detail": "not ready: the database did not answer (details in the server log)"}


def test_unsafe_exposure_and_short_admin_tokens_are_refused_at_start(tmp_path: Path):
    public = run_cli("serve.py", "serve.host=0.0.0.0", f"output_dir={tmp_path}")
    assert public.returncode == 2 and "serve.labeler_auth" in public.stderr.strip(), public.stderr
    unnamed = run_cli("serve.py", "serve.host=0.0.0.0", "serve.labeler_auth=true", f"output_dir={tmp_path}")
    assert unnamed.returncode == 2 and "serve.allowed_hosts" in unnamed.stderr, unnamed.stderr
    short = run_cli("serve.py", f"output_dir={tmp_path}", f"store.url=sqlite:///{tmp_path}/f.db",
                    env={"RLHF_ADMIN_TOKEN": "too-short"})
    assert (
        short.returncode == 2
        and "at least 32" in short.stderr
        and len(short.stderr.strip().splitlines()) == 1
    )


def test_a_literal_database_password_is_never_saved(tmp_path: Path):
    from rlhf.cli import run_main
    from rlhf.config.core import parse_cli
    from rlhf.serve.config import ServeConfig

    url = "postgresql+psycopg://rlhf:hunter2@db.internal:5432/rlhf"
    args = parse_cli(ServeConfig, prog="serve.py", argv=[f"output_dir={tmp_path}", f"store.url={url}"])
    seen = run_main(lambda cfg: cfg.store.url, args, prog="serve.py")
    saved = (tmp_path / "config.yaml").read_text()
    assert seen == url and "hunter2" not in saved and "rlhf:***@db.internal" in saved


def test_the_address_limiter_keeps_a_bounded_number_of_buckets():
    limiter = RateLimiter(per_minute=2, clock=lambda: 0.0, max_keys=100)
    for n in range(10_000):
        limiter.admit(f"2001:db8::{n:x}")
    assert len(limiter) == 100
    assert limiter.admit("one") == 0.0 and limiter.admit("one") == 0.0 and limiter.admit("one") > 0


def test_x_forwarded_for_counts_only_from_trusted_proxies():
    trusted = ["10.0.0.0/8", "127.0.0.1"]
    assert client_address("203.0.113.5", "1.2.3.4", trusted) == "203.0.113.5"  # not a proxy: ignored
    assert client_address("127.0.0.1", "1.2.3.4, 203.0.113.5", trusted) == "203.0.113.5"
    assert client_address("10.0.0.2", "203.0.113.5, 10.0.0.9", trusted) == "203.0.113.5"
    assert client_address("127.0.0.1", None, trusted) == "127.0.0.1"


def test_text_that_a_database_cannot_store_is_refused_alike_and_gold_uploads_are_all_or_nothing(
    store: FeedbackStore,
):
    for text in ("a\x00b", "a\ud800b"):
        with pytest.raises(InvalidFeedbackError, match="text"):
            store.add_document(text)
    queue = LabelingQueue(store)
    with pytest.raises(InvalidFeedbackError, match="text"):
        queue.add_gold([GoldPair("a fine document", "right", "wrong", 0), GoldPair("bad\x00", "r", "w", 1)])
    assert (
        store.export_table(True).num_rows == 0
        and queue.random_document(__import__("random").Random(0), False) is None
    )
    document = store.add_document("a fine document")
    comparison = store.create_comparison(document, "one", "two", "v1", "v1")
    with pytest.raises(InvalidFeedbackError, match="note"):
        store.record_choice(comparison, 0, note="x\x00")

