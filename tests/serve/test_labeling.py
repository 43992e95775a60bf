"""Labelers against a real Serve app over HTTP: tokens, who may decide what, rate limits, richer
answers, gold pairs mixed into the labeling queue and the quality report; and the rate limiter
itself on an injected clock."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from support.serve import publish_tiny, serve_config, start_with_admin

from rlhf.serve.access import RateLimiter, queue_kind
from rlhf.store import FeedbackStore

ADMIN = {"Authorization": "Bearer labelers-admin-token-0123456789abcdef"}
TEXT = "The harbour authority approved a plan to dredge the northern channel before the winter storms."
PER_LABELER = 10


@dataclass
class App:
    url: str
    store: FeedbackStore

    def post(self, path: str, token: str | None = None, **kwargs) -> requests.Response:
        return requests.post(self.url + path, headers=_auth(token, kwargs), timeout=60, **kwargs)

    def get(self, path: str, token: str | None = None, **kwargs) -> requests.Response:
        return requests.get(self.url + path, headers=_auth(token, kwargs), timeout=60, **kwargs)

    def labeler(self, name: str) -> tuple[str, str]:
        answer = self.post("/admin/labelers", json={"name": name}, headers=ADMIN)
        assert answer.status_code == 200, answer.text
        return answer.json()["labeler_id"], answer.json()["token"]

    def compare(self, token: str, **body) -> dict:
        answer = self.post("/v1/compare", token, json=body)
        assert answer.status_code == 200, answer.text
        return answer.json()


def _auth(token: str | None, kwargs: dict) -> dict:
    headers = kwargs.pop("headers", {})
    return {"Authorization": f"Bearer {token}", **headers} if token else headers


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """One app for the module: labeler auth on, gold_rate 0.5, overlap_rate 0.25, per-labeler limit."""
    from ray import serve

    root = tmp_path_factory.mktemp("labelers")
    registry = root / "registry"
    publish_tiny(registry, seed=1)
    publish_tiny(registry, seed=2)
    cfg = serve_config(registry, root / "feedback.db", "serve.labeler_auth=true", "serve.gold_rate=0.5",
                       "serve.overlap_rate=0.25", f"serve.requests_per_minute_per_labeler={PER_LABELER}",
                       "seed=3")
    url = start_with_admin(cfg, ADMIN["Authorization"].removeprefix("Bearer "))
    store = FeedbackStore(cfg.store.url)
    yield App(url, store)
    store.close()
    serve.shutdown()


def test_admins_create_and_revoke_labelers(app: App):
    assert app.post("/admin/labelers", json={"name": "eve"}).status_code == 401
    labeler_id, token = app.labeler("dana")
    assert len(token) >= 32 and token not in json.dumps(app.get("/admin/labelers", headers=ADMIN).json())
    assert app.get("/v1/labeler/me", token).json() == {
        "labeler_id": labeler_id, "name": "dana", "labeler_auth": True, "decided_today": 0}
    revoked = requests.delete(f"{app.url}/admin/labelers/{labeler_id}", headers=ADMIN, timeout=60)
    assert revoked.json() == {"labeler_id": labeler_id, "name": "dana", "revoked": True}
    unknown = requests.delete(f"{app.url}/admin/labelers/nobody", headers=ADMIN, timeout=60)
    assert unknown.status_code == 404 and "labeler_id" in unknown.json()["detail"]
    assert app.post("/admin/labelers", json={"name": ""}, headers=ADMIN).status_code == 422


def test_labeling_routes_refuse_missing_wrong_and_revoked_tokens(app: App):
    labeler_id, token = app.labeler("revoked soon")
    comparison_id = app.compare(token, text=TEXT)["comparison_id"]
    requests.delete(f"{app.url}/admin/labelers/{labeler_id}", headers=ADMIN, timeout=60)
    feedback = {"comparison_id": comparison_id, "choice": 0}
    for path, body in (("/v1/compare", {"text": TEXT}), ("/v1/feedback", feedback)):
        for bad, status in ((None, 401), ("wrong-token", 401), (token, 403)):
            answer = app.post(path, bad, json=body)
            assert answer.status_code == status, (path, bad, answer.text)
            assert "Authorization" in answer.json()["detail"]
            if status == 401:
                assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert app.get("/v1/labeler/me").status_code == 401
    assert app.store.get_comparison(comparison_id).pending


def test_only_the_labeler_shown_a_comparison_decides_it_and_their_id_is_stored(app: App):
    (ann, ann_token), (_, bob_token) = app.labeler("ann"), app.labeler("bob")
    comparison_id = app.compare(ann_token, text=TEXT + " owned")["comparison_id"]
    theirs = app.post("/v1/feedback", bob_token, json={"comparison_id": comparison_id, "choice": 1})
    unknown = app.post("/v1/feedback", bob_token, json={"comparison_id": "no-such-id", "choice": 1})
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["detail"].replace(comparison_id, "ID") == unknown.json()["detail"].replace(
        "no-such-id", "ID")
    typed = app.post("/v1/feedback", ann_token, json={"comparison_id": comparison_id, "choice": 1,
                                                      "labeler": "someone else"})
    assert typed.status_code == 422 and "labeler" in json.dumps(typed.json()["detail"])
    assert app.post("/v1/feedback", ann_token, json={"comparison_id": comparison_id, "choice": 1}).ok
    assert app.store.get_comparison(comparison_id).labeler == ann
    assert app.get("/v1/labeler/me", ann_token).json()["decided_today"] == 1
    exported = [row for row in app.get("/admin/export", headers=ADMIN).text.splitlines()
                if comparison_id in row]
    row = json.loads(exported[0])
    assert (row["labeler"], row["shown_to"], row["verdict"]) == (ann, ann, "preference")


def test_richer_answers_are_stored_and_never_trained_on(app: App):
    _, token = app.labeler("rich")
    shown = [app.compare(token, text=f"{TEXT} rich {i}")["comparison_id"] for i in range(3)]
    answers = [{"choice": 0, "confidence": 4, "note": "the first keeps the date"},
               {"verdict": "both_bad", "note": "both invent a ferry"},
               {"verdict": "cant_tell", "confidence": 1}]
    trained_before = app.store.comparisons_table().num_rows
    for comparison_id, answer in zip(shown, answers):
        stored = app.post("/v1/feedback", token, json={"comparison_id": comparison_id, **answer})
        assert stored.status_code == 200, stored.text
    assert app.store.comparisons_table().num_rows == trained_before + 1
    kept = [app.store.get_comparison(comparison_id) for comparison_id in shown]
    assert [(c.verdict, c.choice, c.confidence) for c in kept] == [
        ("preference", 0, 4), ("both_bad", None, None), ("cant_tell", None, 1)]
    assert kept[1].note == "both invent a ferry" and all(c.decision_s >= 0 for c in kept)
    for bad, field in (({"verdict": "both_bad", "choice": 1}, "choice"), ({"choice": 0, "confidence": 5},
                       "confidence"), ({"choice": 0, "note": "x" * 2001}, "note"), ({}, "choice")):
        answer = app.post("/v1/feedback", token, json={"comparison_id": shown[0], **bad})
        assert answer.status_code == 422 and field in json.dumps(answer.json()["detail"]), answer.text


def test_a_labeler_over_the_rate_limit_gets_429_with_retry_after(app: App):
    _, token = app.labeler("hasty")
    statuses = []
    while len(statuses) < PER_LABELER + 3 and 429 not in statuses:
        answer = app.post("/v1/compare", token, json={"text": f"{TEXT} {len(statuses)}"})
        statuses.append(answer.status_code)
    assert statuses[:PER_LABELER] == [200] * PER_LABELER and statuses[-1] == 429
    assert 1 <= int(answer.headers["Retry-After"]) <= 60 and "labeler" in answer.json()["detail"]
    _, other = app.labeler("patient")  # the limit is per labeler
    assert app.post("/v1/compare", other, json={"text": TEXT}).status_code == 200


def test_gold_upload_names_the_bad_line_and_field(app: App):
    good = {"text": "Gold document.", "summary_0": "right", "summary_1": "wrong", "answer": 0}
    for lines, word in (([good, {**good, "answer": 2}], "line 2: answer"),
                        ([{**good, "summary_1": "right"}], "line 1: summary_1"),
                        ([{k: v for k, v in good.items() if k != "text"}], "line 1: text")):
        body = "\n".join(json.dumps(line) for line in lines)
        answer = app.post("/admin/gold", data=body, headers=ADMIN)
        assert answer.status_code == 422 and answer.json()["detail"].startswith(word), answer.text
    assert app.post("/admin/gold", data="{oops\n", headers=ADMIN).json()["detail"].startswith("line 1")
    assert app.post("/admin/gold", data=json.dumps(good)).status_code == 401


def _label_queue(app: App, token: str, right: bool, requests_: int) -> list[str]:
    """Ask the queue ``requests_`` times, answer gold pairs rightly or wrongly and the rest with 0;
    the kind of each pair shown (the store knows, the response must not tell)."""
    kinds = []
    for _ in range(requests_):
        body = app.compare(token)
        assert set(body) == {"comparison_id", "summaries", "truncated", "text", "title"}
        shown = app.store.get_comparison(body["comparison_id"])
        gold = shown.gold_answer is not None
        kinds.append("gold" if gold else "overlap" if shown.overlap_of else "fresh")
        choice = (shown.gold_answer if right else 1 - shown.gold_answer) if gold else 0
        assert app.post("/v1/feedback", token, json={"comparison_id": shown.id, "choice": choice}).ok
    return kinds


def test_the_queue_mixes_gold_and_overlap_pairs_and_admins_see_each_labelers_quality(app: App):
    gold = [{"text": f"Gold document {i}.", "summary_0": f"good {i}", "summary_1": f"bad {i}",
             "answer": i % 2} for i in range(3)]
    stored = app.post("/admin/gold", data="\n".join(map(json.dumps, gold)) + "\n", headers=ADMIN)
    assert stored.json() == {"stored": 3}
    queue = [{"text": f"Queue document {i}: the ferry timetable changes in May."} for i in range(3)]
    added = app.post("/admin/documents", data="\n".join(map(json.dumps, queue)), headers=ADMIN)
    assert added.json() == {"stored": 3}
    labelers = {app.labeler(f"{name} {i}"): name == "careful" for i in (1, 2)
                for name in ("careful", "careless")}  # (id, token) -> answers gold pairs rightly
    kinds = {labeler_id: _label_queue(app, token, right, PER_LABELER)
             for (labeler_id, token), right in labelers.items()}
    shown = [kind for labeler_kinds in kinds.values() for kind in labeler_kinds]
    # gold_rate 0.5 over 40 draws: within about 3 standard deviations (sd = 3.16) of 20.
    assert abs(shown.count("gold") - 20) <= 10 and "overlap" in shown
    report = {row["labeler_id"]: row for row in app.get("/admin/labelers", headers=ADMIN).json()}
    for (labeler_id, _), right in labelers.items():
        row = report[labeler_id]
        assert row["gold_answered"] == kinds[labeler_id].count("gold") and row["choices"] == PER_LABELER
        if row["gold_answered"]:
            assert row["gold_accuracy"] == (1.0 if right else 0.0)
        assert row["cant_tell_share"] == 0 and row["median_decision_s"] >= 0
    overlapped = [report[labeler_id] for labeler_id, seen in kinds.items() if "overlap" in seen]
    assert all(row["overlap_pairs"] >= 1 and row["agreement"] is not None for row in overlapped)
    assert app.get("/admin/labelers").status_code == 401


def test_the_rate_limiter_refills_evenly_and_bursts_up_to_the_limit():
    now = [0.0]
    limiter = RateLimiter(6, clock=lambda: now[0])  # one token every 10 s
    assert [limiter.admit("a") for _ in range(6)] == [0.0] * 6
    assert limiter.admit("a") == pytest.approx(10.0) and limiter.admit("b") == 0.0
    now[0] = 5.0
    assert limiter.admit("a") == pytest.approx(5.0)
    now[0] = 10.0
    assert limiter.admit("a") == 0.0 and limiter.admit("a") == pytest.approx(10.0)
    now[0] = 1000.0  # refills to the burst size, never beyond
    assert [limiter.admit("a") for _ in range(7)][-2:] == [0.0, pytest.approx(10.0)]
    assert RateLimiter(0).admit("anyone") == 0.0


def test_queue_kinds_follow_the_rates():
    assert [queue_kind(draw, 0.2, 0.3) for draw in (0.0, 0.19, 0.2, 0.49, 0.5, 0.99)] == [
        "gold", "gold", "overlap", "overlap", "fresh", "fresh"]
    assert queue_kind(0.0, 0.0, 0.0) == "fresh"


def test_the_page_asks_for_the_token_once_takes_keyboard_choices_and_fits_a_phone(app: App):
    from playwright.sync_api import sync_playwright  # the test extra; Chromium itself comes from apt

    chromium = shutil.which("chromium")
    assert chromium, "the browser test needs Debian's chromium: apt-get install chromium (.ci/run does)"
    labeler_id, token = app.labeler("phone")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 390, "height": 844})
        page.goto(app.url + "/")
        page.wait_for_selector("#token-form:not([hidden])")
        page.fill("#token", token)
        page.click("#token-save")
        page.wait_for_selector("#today:has-text('0 decided today')")
        page.fill("#text", TEXT + " on a phone")
        page.click("#summarize")
        page.wait_for_selector("#status:has-text('Pick the better summary')", timeout=60_000)
        layout = page.evaluate(LAYOUT)
        page.click("h1")  # focus leaves the text box; keys now choose
        page.keyboard.press("2")
        page.keyboard.press("Enter")
        page.wait_for_selector("#status:has-text('1 of 1 choice(s) saved')")
        page.keyboard.press("n")
        page.wait_for_selector(".section:nth-child(2) .option")
        page.keyboard.press("c")
        page.keyboard.press("Enter")
        page.wait_for_selector("#status:has-text('2 of 2 choice(s) saved')")
        page.wait_for_selector("#today:has-text('2 decided today')")
        page.reload()  # the token is kept for the tab: no second prompt
        page.wait_for_selector("#today:has-text('2 decided today')")
        assert page.is_hidden("#token-form")
        browser.close()
    left, right = layout["boxes"]
    assert layout["scrollWidth"] <= layout["clientWidth"] == 390  # no horizontal scroll
    assert abs(left["top"] - right["top"]) < 1 and left["right"] <= right["left"]  # side by side
    assert right["right"] <= 390 and left["width"] > 100 and right["width"] > 100
    assert max(layout["lines"]) >= 2 and all(fits for fits in layout["fits"])  # wrapped, inside the box
    decided = [row for row in app.store.export_table(include_pending=False).to_pylist()
               if row["labeler"] == labeler_id]
    assert [(row["verdict"], row["choice"]) for row in decided] == [("preference", 1), ("cant_tell", None)]


# The two summary boxes of the first section: positions, and whether their text wraps inside them.
LAYOUT = """() => {
  const options = [...document.querySelectorAll('.section .option')].slice(0, 2);
  const texts = options.map((o) => o.querySelector('p'));
  return {
    scrollWidth: document.documentElement.scrollWidth, clientWidth: document.documentElement.clientWidth,
    boxes: options.map((o) => o.getBoundingClientRect().toJSON()),
    lines: texts.map((p) => Math.round(p.getBoundingClientRect().height
                                       / parseFloat(getComputedStyle(p).lineHeight))),
    fits: texts.map((p) => p.scrollWidth <= p.clientWidth),
  };
}"""


def test_without_labeler_auth_choices_are_anonymous_and_one_address_is_rate_limited(app: App, tmp_path):
    """A second app on the same Serve instance: labeler_auth off, 3 compare requests per address."""
    from ray import serve

    from rlhf.serve.app import build_app

    registry = tmp_path / "registry"
    publish_tiny(registry, seed=1)
    cfg = serve_config(registry, tmp_path / "feedback.db", "serve.requests_per_minute_per_address=3")
    serve.run(build_app(cfg), name="open", route_prefix="/open")
    try:
        open_app = App(f"{app.url}/open", FeedbackStore(cfg.store.url))
        empty = open_app.post("/v1/compare", json={})
        assert empty.status_code == 404 and empty.json()["detail"].startswith("text: the labeling queue")
        shown = open_app.compare(None, text=TEXT)["comparison_id"]
        queued = open_app.compare(None)  # a fresh pair of the one stored document
        assert queued["text"] == TEXT and queued["comparison_id"] != shown
        limited = open_app.post("/v1/compare", json={"text": TEXT})
        assert limited.status_code == 429 and "address" in limited.json()["detail"]
        assert 1 <= int(limited.headers["Retry-After"]) <= 20  # one request every 20 s
        assert open_app.post("/v1/feedback", json={"comparison_id": shown, "choice": 0}).ok
        stored = open_app.store.get_comparison(shown)
        assert (stored.labeler, stored.shown_to, stored.verdict) == ("anonymous", "anonymous", "preference")
        me = open_app.get("/v1/labeler/me").json()
        assert me == {"labeler_id": "anonymous", "name": "anonymous", "labeler_auth": False,
                      "decided_today": 1}
        open_app.store.close()
    finally:
        serve.delete("open")
