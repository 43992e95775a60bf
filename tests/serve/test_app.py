"""The Serve application over real HTTP on 127.0.0.1: every route, every bad input, the web page in
headless Chromium, and hot reloads (a full version, adapter versions on one base) under a stream of
requests."""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
from support.paths import FIXTURES
from support.serve import (
    publish_tiny,
    publish_tiny_adapter,
    serve_config,
    start_with_admin,
    summarize_stream,
    wait_for_answers,
)

from rlhf.store import FeedbackStore

PDF = FIXTURES / "2023.eacl-main.121.pdf"
ADMIN_TOKEN = "test-admin-token-0123456789abcdefghij"
TEXT = "The city council voted on Tuesday to extend the bike lane network across the river."


@dataclass
class App:
    url: str
    store: FeedbackStore
    registry: Path
    max_text_bytes: int

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=60, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    registry = root / "registry"
    publish_tiny(registry, seed=1)
    publish_tiny(registry, seed=2)
    cfg = serve_config(registry, root / "feedback.db")
    url = start_with_admin(cfg, ADMIN_TOKEN)
    store = FeedbackStore(cfg.store.url)
    yield App(url, store, registry, cfg.serve.max_text_bytes)
    store.close()
    serve.shutdown()


def _compare(app: App, text: str = TEXT) -> dict:
    answer = app.post("/v1/compare", json={"text": text})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_summarize_answers_with_the_current_version_and_flags_cut_text(app: App):
    short = app.post("/v1/summarize", json={"text": TEXT, "max_new_tokens": 8})
    assert short.status_code == 200, short.text
    body = short.json()
    assert body["policy_version"] == "v0002" and body["truncated"] is False
    assert 0 < len(body["summary"].encode()) <= 8 * 4  # byte-level tokens: at most 8 (UTF-8 <= 4 bytes)
    long = app.post("/v1/summarize", json={"text": TEXT * 10})  # > 256 byte tokens, < the byte limit
    assert long.status_code == 200 and long.json()["truncated"] is True


def test_compare_stores_a_pending_comparison_of_the_current_and_previous_version(app: App):
    body = _compare(app)
    stored = app.store.get_comparison(body["comparison_id"])
    assert stored.pending
    assert [stored.summary_0, stored.summary_1] == body["summaries"]
    assert sorted([stored.policy_0, stored.policy_1]) == ["v0001", "v0002"]
    assert stored.created_at.tzinfo is not None
    document = app.store.documents_table().to_pylist()
    assert {"original_text": TEXT} in document


def test_compare_shows_the_current_version_first_or_second_at_random(app: App):
    positions = set()
    for i in range(12):
        stored = app.store.get_comparison(_compare(app, f"{TEXT} ({i})")["comparison_id"])
        positions.add((stored.policy_0, stored.policy_1).index("v0002"))
    assert positions == {0, 1}


def test_feedback_is_durable_idempotent_and_a_conflict_answers_409(app: App):
    comparison_id = _compare(app, TEXT + " feedback")["comparison_id"]
    first = app.post("/v1/feedback", json={"comparison_id": comparison_id, "choice": 1})
    assert first.status_code == 200, first.text
    assert first.json()["stored"] is True
    # Visible to a fresh connection as soon as the answer arrived.
    reopened = FeedbackStore(f"sqlite:///{app.store.engine.url.database}")
    assert reopened.get_comparison(comparison_id).choice == 1
    reopened.close()
    again = app.post("/v1/feedback", json={"comparison_id": comparison_id, "choice": 1})
    assert again.status_code == 200 and again.json()["decided_at"] == first.json()["decided_at"]
    conflict = app.post("/v1/feedback", json={"comparison_id": comparison_id, "choice": 0})
    assert conflict.status_code == 409 and "already decided" in conflict.json()["detail"]
    assert app.store.get_comparison(comparison_id).choice == 1


def _bad_requests(app: App) -> list[tuple[str, dict, int, str]]:
    """(path, requests kwargs, expected status, a word the error names)."""
    unknown = {"comparison_id": "no-such-id", "choice": 0}
    return [
        ("/v1/summarize", {"json": {"text": ""}}, 422, "text"),
        ("/v1/summarize", {"json": {"text": " \n\t "}}, 422, "text"),
        ("/v1/compare", {"json": {"text": "   "}}, 422, "text"),
        ("/v1/summarize", {"json": {"text": "x" * (app.max_text_bytes + 1)}}, 413, "text"),
        ("/v1/compare", {"json": {"text": "é" * (app.max_text_bytes // 2 + 1)}}, 413, "text"),
        ("/v1/summarize", {"json": {"text": TEXT, "max_new_tokens": 0}}, 422, "max_new_tokens"),
        ("/v1/summarize", {"json": {}}, 422, "text"),
        ("/v1/summarize", {"data": "{oops", "headers": {"Content-Type": "application/json"}}, 422, "json"),
        ("/v1/feedback", {"json": unknown}, 404, "comparison_id"),
        ("/v1/feedback", {"json": {"comparison_id": "x", "choice": 2}}, 422, "choice"),
        ("/v1/feedback", {"json": {"comparison_id": "x", "choice": "1"}}, 422, "choice"),
        ("/v1/feedback", {"json": {"comparison_id": "x", "choice": True}}, 422, "choice"),
        ("/v1/feedback", {"json": {"choice": 0}}, 422, "comparison_id"),
        ("/v1/documents", {"files": {"file": ("notes.txt", b"plain text", "text/plain")}}, 415, "file"),
        ("/v1/documents", {"files": {"file": ("broken.pdf", b"%PDF-1.7\n garbage", "application/pdf")}},
         422, "file"),
        ("/v1/documents", {"data": b"no multipart"}, 422, "file"),
    ]


def test_bad_input_answers_4xx_naming_the_field_and_stores_nothing(app: App):
    before = (app.store.count_comparisons(), app.store.count_decided(), len(app.store.documents_table()))
    for path, kwargs, status, word in _bad_requests(app):
        answer = app.post(path, **kwargs)
        assert answer.status_code == status, (path, kwargs.keys(), answer.text)
        assert word in json.dumps(answer.json()["detail"]).lower(), (path, answer.text)
    after = (app.store.count_comparisons(), app.store.count_decided(), len(app.store.documents_table()))
    assert after == before


def test_a_pdf_upload_gives_sections_that_compare_accepts(app: App):
    with PDF.open("rb") as pdf:
        answer = app.post("/v1/documents", files={"file": (PDF.name, pdf, "application/pdf")})
    assert answer.status_code == 200, answer.text
    paper = answer.json()
    headings = [s["heading"] for s in paper["sections"]]
    assert headings[0] == "Abstract" and "1 Introduction" in headings and "5 Conclusion" in headings
    assert "LongEval" in paper["title"]
    for section in paper["sections"][:2]:
        assert app.post("/v1/compare", json={"text": section["text"], "title": section["heading"],
                                             "source": "pdf"}).status_code == 200


def test_policy_health_readiness_and_openapi_routes(app: App):
    policy = app.get("/v1/policy").json()
    assert policy == {"version": "v0002", "versions": ["v0001", "v0002"],
                      "metrics": {"iteration": 2, "reward_mean": 2.0}}
    assert app.get("/healthz").json() == {"status": "ok"}
    assert app.get("/readyz").json() == {"status": "ready", "version": "v0002"}
    paths = app.get("/openapi.json").json()["paths"]
    assert {"/v1/summarize", "/v1/compare", "/v1/feedback", "/v1/documents", "/v1/policy"} <= set(paths)
    assert app.get("/docs").status_code == 200


def test_the_ingress_replica_answers_without_torch_and_transformers(app: App):
    """Only the policy replicas load models: the HTTP ingress imports neither library (a replica
    that starts in seconds and holds no torch runtime), as each running replica reports."""
    import ray

    def heavy_modules_loaded(_replica) -> list[str]:
        import sys

        return sorted(name for name in ("torch", "transformers") if name in sys.modules)

    named = ray.util.list_named_actors(all_namespaces=True)
    replicas = {entry["name"].split("#")[1]: ray.get_actor(entry["name"], namespace=entry["namespace"])
                for entry in named if entry["name"].startswith("SERVE_REPLICA")}
    loaded = {deployment: ray.get(replica.__ray_call__.remote(heavy_modules_loaded))
              for deployment, replica in replicas.items()}
    assert loaded == {"FeedbackApi": [], "PolicyDeployment": ["torch", "transformers"]}


def test_admin_routes_need_the_token_and_export_every_comparison(app: App):
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert app.post("/admin/reload").status_code == 401
    assert app.get("/admin/export", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert app.post("/admin/reload", headers=auth).json()["version"] == "v0002"
    decided = _compare(app, TEXT + " export")["comparison_id"]
    app.post("/v1/feedback", json={"comparison_id": decided, "choice": 0})
    jsonl = app.get("/admin/export", params={"format": "jsonl"}, headers=auth)
    assert jsonl.status_code == 200
    rows = [json.loads(line) for line in jsonl.text.splitlines()]
    assert len(rows) == app.store.count_comparisons()
    exported = next(row for row in rows if row["comparison_id"] == decided)
    assert exported["choice"] == 0 and exported["original_text"] == TEXT + " export"
    parquet = app.get("/admin/export", params={"format": "parquet", "pending": "false"}, headers=auth)
    table = pq.read_table(io.BytesIO(parquet.content))
    assert table.num_rows == app.store.count_decided() and None not in table.column("choice").to_pylist()
    assert app.get("/admin/export", params={"format": "xml"}, headers=auth).status_code == 422


def test_the_web_page_stores_one_choice_per_section_of_an_uploaded_paper_and_a_pasted_text(app: App):
    from playwright.sync_api import sync_playwright  # the test extra; Chromium itself comes from apt

    chromium = shutil.which("chromium")
    assert chromium, "the browser test needs Debian's chromium: apt-get install chromium (.ci/run does)"
    decided_before = app.store.count_decided()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(app.url + "/")
        page.set_input_files("#pdf", str(PDF))
        page.click("#summarize")
        page.wait_for_selector("#status:has-text('Pick the better summary')", timeout=120_000)
        cards = page.locator(".section")
        count = cards.count()
        assert count >= 10
        headings = [cards.nth(i).locator("h3").inner_text() for i in range(count)]
        assert headings[0] == "Abstract"
        for i in range(count):
            page.check(f"input[name='choice-{i}'][value='{i % 2}']")
        page.click("#submit")
        page.wait_for_selector(f"#status:has-text('{count} of {count} choice(s) saved')", timeout=60_000)
        uploaded = app.store.export_table(include_pending=False).to_pylist()[-count:]

        page.reload()  # a pasted text is one section
        page.fill("#text", TEXT + " pasted in the browser")
        page.click("#summarize")
        page.wait_for_selector("#status:has-text('Pick the better summary')", timeout=60_000)
        assert page.locator(".section").count() == 1
        page.check("input[name='choice-0'][value='1']")
        page.click("#submit")
        page.wait_for_selector("#status:has-text('1 of 1 choice(s) saved')", timeout=60_000)
        browser.close()
    assert app.store.count_decided() == decided_before + count + 1
    assert [row["choice"] for row in uploaded] == [i % 2 for i in range(count)]
    assert [row["title"] for row in uploaded] == headings
    pasted = app.store.export_table(include_pending=False).to_pylist()[-1]
    assert pasted["original_text"] == TEXT + " pasted in the browser" and pasted["choice"] == 1


@contextmanager
def _second_app(app: App, registry: Path, name: str) -> Iterator[str]:
    """Another app on the running Serve instance, with its own registry and database; its URL."""
    from ray import serve

    from rlhf.serve.app import build_app

    serve.run(build_app(serve_config(registry, registry.parent / "feedback.db")), name=name,
              route_prefix=f"/{name}")
    try:
        yield f"{app.url}/{name}"
    finally:
        serve.delete(name)


def _wait_for_version(url: str, version: str) -> None:
    """Until the app's current version is ``version`` (a reload is due within 0.5 s); 60 s at most."""
    deadline = time.monotonic() + 60
    while requests.get(url + "/v1/policy", timeout=60).json()["version"] != version:
        assert time.monotonic() < deadline, f"{version} was not picked up within 60 s"
        time.sleep(0.2)


def _publish_during_requests(url: str, publish: Callable[[], Path], version: str) -> list[str]:
    """The versions that answered 4 clients' stream of /v1/summarize while ``publish`` ran, until
    ``version`` was current and 8 more answers came; fails if any request failed."""
    with summarize_stream(url, TEXT) as versions:
        wait_for_answers(versions, 4)
        publish()
        _wait_for_version(url, version)
        seen = len(versions)
        while len(versions) < seen + 8:  # keep the stream going after the switch
            time.sleep(0.1)
    return versions


def test_full_and_adapter_versions_published_during_requests_are_served_without_failing(
    app: App, tmp_path: Path
):
    """A second app with its own registry: v0002, a full policy, is published during a stream of
    requests; then v0003 and v0004, LoRA adapters on v0002, the second also during requests; a
    comparison then shows the two adapter versions."""
    registry = tmp_path / "registry"
    publish_tiny(registry, seed=1)
    with _second_app(app, registry, "reload") as url:
        full = _publish_during_requests(url, partial(publish_tiny, registry, 2), "v0002")
        base = registry / "v0002"
        publish_tiny_adapter(registry, base, seed=3)
        _wait_for_version(url, "v0003")
        adapters = _publish_during_requests(url, partial(publish_tiny_adapter, registry, base, 4), "v0004")
        compared = requests.post(url + "/v1/compare", json={"text": TEXT}, timeout=60)
    assert full[0] == "v0001" and full[-1] == "v0002"
    assert full.index("v0002") > 0 and "v0001" not in full[full.index("v0002") + 8:]
    assert adapters[0] == "v0003" and adapters[-1] == "v0004"
    assert compared.status_code == 200, compared.text
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    stored = store.get_comparison(compared.json()["comparison_id"])
    store.close()
    assert sorted([stored.policy_0, stored.policy_1]) == ["v0003", "v0004"]  # two adapter versions
    assert stored.summary_0 != stored.summary_1 and all(s.strip() for s in compared.json()["summaries"])
