"""The HTTP API and web page: FastAPI on a Ray Serve ingress deployment.

No ``from __future__ import annotations`` here: FastAPI reads the route signatures at runtime
and Serve's class-based ingress cannot resolve string annotations.

Client mistakes answer 4xx naming the field (422 invalid, 413 too large, 415 not a PDF, 404
unknown id, 409 conflicting choice); store writes commit before the answer goes out.
"""


import asyncio
import hashlib
import hmac
import io
import json
import random
from collections import deque
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import resources
from typing import Annotated, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import FastAPI, File, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from rlhf.data.pdf import PdfError, extract_paper
from rlhf.registry import PolicyRegistry, UnknownVersionError
from rlhf.serve.access import Caller, LabelerGate, RateLimiter, queue_kind, too_many
from rlhf.serve.config import ServeConfig
from rlhf.serve.rewards import CurrentRewardModel, Selection
from rlhf.serve.schemas import (
    CompareRequest,
    CompareResponse,
    DocumentResponse,
    DocumentSection,
    FeedbackRequest,
    FeedbackResponse,
    GoldLine,
    GoldStored,
    LabelerCreate,
    LabelerCreated,
    LabelerInfo,
    LabelerMe,
    LabelerReport,
    PolicyInfo,
    RollbackRequest,
    SelectionInfo,
    SummarizeRequest,
    SummarizeResponse,
)
from rlhf.serve.versions import Summary
from rlhf.store import AlreadyDecidedError, Comparison, FeedbackStore, NotFoundError, StoreInputError
from rlhf.store.labelers import Labelers
from rlhf.store.queue import GoldPair, LabelingQueue
from rlhf.store.tables import ANONYMOUS

PDF_MAGIC = b"%PDF"
READY_TIMEOUT_S = 5.0
SELECTIONS_KEPT = 100  # uncertain selections GET /admin/selections shows, newest last

app = FastAPI(
    title="rlhf summarizer",
    description="Summaries from the current policy, blind comparisons of two policy versions, and "
    "the human choices that train the next version.",
    version="1",
)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message})


# Client mistakes the library raises, and their status (a subclass before its base class).
ERROR_STATUS: dict[type[Exception], int] = {
    NotFoundError: 404, AlreadyDecidedError: 409, StoreInputError: 422, PdfError: 422,
}


async def _client_error(_request: Request, exc: Exception) -> JSONResponse:
    status = next(code for error, code in ERROR_STATUS.items() if isinstance(exc, error))
    return _error(status, f"file: {exc}" if isinstance(exc, PdfError) else str(exc))


for _error_class in ERROR_STATUS:
    app.add_exception_handler(_error_class, _client_error)


def _too_large(field: str, size: int, limit: int) -> HTTPException:
    return HTTPException(413, f"{field}: {size} bytes is over the {limit}-byte limit; send a shorter "
                              "text (or one section of the document at a time)")


def _cut_to_bytes(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to at most ``limit`` UTF-8 bytes on a character (and, if possible, word) edge."""
    data = text.encode()
    if len(data) <= limit:
        return text, False
    cut = data[:limit].decode(errors="ignore")
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut), True


def _export_bytes(table: pa.Table, fmt: str) -> bytes:
    if fmt == "parquet":
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()
    rows = table.to_pylist()
    lines = (json.dumps(row, default=lambda v: v.isoformat(), ensure_ascii=False) for row in rows)
    return "".join(f"{line}\n" for line in lines).encode()


def _gold_lines(body: bytes) -> list[GoldPair]:
    """POST /admin/gold's JSONL body as gold pairs; 422 naming the first bad line and field."""
    pairs = []
    for number, line in enumerate(body.decode(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            gold = GoldLine.model_validate_json(line)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or "line"
            raise HTTPException(422, f"line {number}: {field}: {error['msg']}") from None
        pairs.append(GoldPair(gold.text, gold.summary_0, gold.summary_1, gold.answer, gold.title))
    if not pairs:
        raise HTTPException(422, "body: no gold pairs; send one JSON object per line with text, "
                                 "summary_0, summary_1 and answer (0 or 1)")
    return pairs


def _usable(pairs: list[list[Summary]]) -> list[list[Summary]]:
    """The pairs a person can choose between (two different, non-empty summaries); 503 if none."""
    usable = [pair for pair in pairs if pair[0].text != pair[1].text and all(s.text.strip() for s in pair)]
    if not usable:
        raise HTTPException(503, "the policy wrote an empty or the same summary twice; send the "
                                 "request again")
    return usable


@serve.deployment
@serve.ingress(app)
class FeedbackApi:
    """Routes requests to the policy deployment and records comparisons and choices."""

    def __init__(self, policy: DeploymentHandle, cfg: ServeConfig, admin_token_sha256: str | None):
        self.policy = policy
        self.limits = cfg.serve
        self.store = FeedbackStore(cfg.store.url)
        self.rng = random.Random(cfg.seed)
        self.admin_token_sha256 = admin_token_sha256
        self.admin_token_env = cfg.serve.admin_token_env
        self.registry = PolicyRegistry(cfg.registry)  # /admin/rollback moves its CURRENT pointer
        self.labelers = Labelers(self.store)
        self.queue = LabelingQueue(self.store)
        self.gate = LabelerGate(self.labelers, cfg.serve.labeler_auth)
        self.per_labeler = RateLimiter(cfg.serve.compare_per_minute_per_labeler)
        self.per_address = RateLimiter(cfg.serve.compare_per_minute_per_address)
        uncertain = cfg.serve.pair_selection == "uncertain"
        self.rewards = CurrentRewardModel(cfg.serve.reward_registry, cfg.policy) if uncertain else None
        self.recent_selections: deque[tuple[str, Selection]] = deque(maxlen=SELECTIONS_KEPT)

    def _check_text(self, text: str) -> None:
        size = len(text.encode())
        if size > self.limits.max_text_bytes:
            raise _too_large("text", size, self.limits.max_text_bytes)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> str:
        return resources.files("rlhf.serve").joinpath("static/index.html").read_text()

    @app.post("/v1/summarize")
    async def summarize(self, body: SummarizeRequest) -> SummarizeResponse:
        """A summary by the current policy."""
        self._check_text(body.text)
        summary = await self.policy.summarize.remote(body.text, body.max_new_tokens)
        return SummarizeResponse(summary=summary.text, policy_version=summary.version,
                                 truncated=summary.truncated)

    async def _labeler(self, authorization: str | None) -> Caller:
        return await asyncio.to_thread(self.gate.identify, authorization)

    async def _admit(self, request: Request, authorization: str | None) -> Caller:
        """Rate limits (the address first: it needs no database read) and the labeler's identity."""
        address = request.client.host if request.client else "unknown"
        if wait := self.per_address.admit(address):
            raise too_many("address", wait)
        caller = await self._labeler(authorization)
        if caller.id != ANONYMOUS and (wait := self.per_labeler.admit(caller.id)):
            raise too_many("labeler", wait)
        return caller

    @app.post("/v1/compare")
    async def compare(
        self, body: CompareRequest, request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> CompareResponse:
        """Two summaries of the text, stored as a pending comparison shown to the caller before they
        are returned; without text, the labeling queue's next pair."""
        caller = await self._admit(request, authorization)
        if body.text is None:
            return await self._queued(caller, body.max_new_tokens)
        self._check_text(body.text)
        return await self._fresh(caller, body.text, body.title, body.source, body.max_new_tokens)

    async def _fresh(
        self, caller: Caller, text: str, title: str | None, source: str, max_new_tokens: int | None,
        select: bool = False,
    ) -> CompareResponse:
        """A new pair of the policy's stored and shown; ``select``: the least certain of several."""
        selection = None
        if select and self.rewards is not None and await asyncio.to_thread(self.rewards.refresh):
            pair, selection = await self._least_certain_pair(text, max_new_tokens)
        else:
            pair = _usable([list(await self.policy.compare.remote(text, max_new_tokens))])[0]
        self.rng.shuffle(pair)
        first, second = pair
        document_id = await asyncio.to_thread(self.store.add_document, text, title, source)
        comparison_id = await asyncio.to_thread(
            self.store.create_comparison, document_id, first.text, second.text, first.version,
            second.version, caller.id,
        )
        if selection is not None:
            self.recent_selections.append((comparison_id, selection))
        return CompareResponse(comparison_id=comparison_id, summaries=(first.text, second.text),
                               truncated=first.truncated, text=text, title=title)

    async def _queued(self, caller: Caller, max_new_tokens: int | None) -> CompareResponse:
        """A gold pair, a pair another labeler was shown, or a fresh pair of a stored document, drawn
        from the seeded rng; each a new comparison with the same response shape."""
        kind = queue_kind(self.rng.random(), self.limits.gold_rate, self.limits.overlap_rate)
        picks = random.Random(self.rng.getrandbits(64))  # the thread's own rng: no shared state
        show = {"gold": self.queue.show_gold, "overlap": self.queue.show_overlap}.get(kind)
        shown = await asyncio.to_thread(show, caller.id, picks) if show else None
        if shown is not None:
            return await asyncio.to_thread(self._shown_response, shown)
        document = await asyncio.to_thread(self.queue.random_document, picks)
        if document is None:
            raise HTTPException(404, "text: the labeling queue has no stored documents yet; send a text "
                                     "to compare")
        return await self._fresh(caller, document.text, document.title, "api", max_new_tokens, select=True)

    async def _least_certain_pair(
        self, text: str, max_new_tokens: int | None
    ) -> tuple[list[Summary], Selection]:
        """``pair_candidates`` pairs of the policy's (generated together: the policy replica batches
        them), the one the current reward model is least sure about, and how it was chosen."""
        calls = [self.policy.compare.remote(text, max_new_tokens) for _ in range(self.limits.pair_candidates)]
        pairs = _usable([list(pair) for pair in await asyncio.gather(*calls)])
        selection = await asyncio.to_thread(self.rewards.select, text, [(a.text, b.text) for a, b in pairs])
        return pairs[selection.chosen], selection

    def _shown_response(self, shown: Comparison) -> CompareResponse:
        text, title = self.queue.document(shown.document_id)
        return CompareResponse(comparison_id=shown.id, summaries=(shown.summary_0, shown.summary_1),
                               truncated=False, text=text, title=title)

    @app.post("/v1/feedback")
    async def feedback(
        self, body: FeedbackRequest, authorization: Annotated[str | None, Header()] = None
    ) -> FeedbackResponse:
        """Record the caller's answer to a comparison shown to them; committed to the database
        before this answers."""
        caller = await self._labeler(authorization)
        stored = await asyncio.to_thread(
            self.store.record_choice, body.comparison_id, body.choice, caller.id, body.verdict,
            body.confidence, body.note,
        )
        return FeedbackResponse(comparison_id=stored.id, choice=stored.choice, verdict=stored.verdict,
                                decided_at=stored.decided_at)

    @app.get("/v1/labeler/me")
    async def labeler_me(self, authorization: Annotated[str | None, Header()] = None) -> LabelerMe:
        """Who the token belongs to and how many answers they recorded today (UTC); 401 tells the
        page that it must ask for a token."""
        caller = await self._labeler(authorization)
        midnight = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        today = await asyncio.to_thread(self.labelers.count_decided, caller.id, midnight)
        return LabelerMe(labeler_id=caller.id, name=caller.name, labeler_auth=self.gate.required,
                         decided_today=today)

    @app.post("/v1/documents")
    async def documents(
        self, file: Annotated[UploadFile, File(description="A paper as PDF.")]
    ) -> DocumentResponse:
        """A PDF's sections (abstract first), each cut to the text limit so it can go to /v1/compare."""
        data = await file.read(self.limits.max_upload_bytes + 1)
        if len(data) > self.limits.max_upload_bytes:
            raise _too_large("file", len(data), self.limits.max_upload_bytes)
        if not data.startswith(PDF_MAGIC):
            raise HTTPException(415, "file: not a PDF (no %PDF header); upload the paper as a .pdf file")
        paper = await asyncio.to_thread(extract_paper, data)
        parts = ([("Abstract", paper.abstract)] if paper.abstract else []) + [
            (section.heading, section.text) for section in paper.sections
        ]
        sections = []
        for heading, text in parts:
            if text.strip():
                cut, truncated = _cut_to_bytes(text, self.limits.max_text_bytes)
                sections.append(DocumentSection(heading=heading, text=cut, truncated=truncated))
        if not sections:
            raise HTTPException(422, "file: no section text found in the PDF")
        return DocumentResponse(title=paper.title, sections=sections)

    @app.get("/v1/policy")
    async def policy_info(self) -> PolicyInfo:
        """The version answering /v1/summarize now, and the metrics it was published with."""
        return PolicyInfo(**await self.policy.policy_info.remote())

    @app.get("/healthz")
    def health(self) -> dict:
        """Liveness: the ingress answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def ready(self) -> JSONResponse:
        """Readiness: the database answers and a policy replica is up."""
        try:
            await asyncio.to_thread(self.store.count_comparisons)
            info = await asyncio.wait_for(self.policy.policy_info.remote(), READY_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready", with the reason
            return _error(503, f"not ready: {type(exc).__name__}: {exc}")
        return JSONResponse({"status": "ready", "version": info["version"]})

    def _check_admin(self, authorization: str | None) -> None:
        if self.admin_token_sha256 is None:
            raise HTTPException(503, f"admin routes are off: set {self.admin_token_env} where "
                                     "jobs/serve.py starts")
        token = (authorization or "").removeprefix("Bearer ").strip()
        digest = hashlib.sha256(token.encode()).hexdigest()
        if not token or not hmac.compare_digest(digest, self.admin_token_sha256):
            raise HTTPException(401, "Authorization: send 'Bearer <admin token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.post("/admin/reload")
    async def reload(self, authorization: Annotated[str | None, Header()] = None) -> PolicyInfo:
        """Switch a policy replica to the current published version now (the others follow at their
        next registry poll)."""
        self._check_admin(authorization)
        return PolicyInfo(**await self.policy.reload.remote())

    @app.post("/admin/rollback")
    async def rollback(
        self, body: RollbackRequest, authorization: Annotated[str | None, Header()] = None
    ) -> PolicyInfo:
        """Make an earlier published version current: the registry's CURRENT pointer moves (atomically),
        one replica switches now and every other at its next registry poll, each loading the version
        before it answers with it (no request fails). The online loop continues from it."""
        self._check_admin(authorization)
        try:
            await asyncio.to_thread(self.registry.set_current, body.version)
        except UnknownVersionError as exc:
            raise HTTPException(404, str(exc)) from None
        return PolicyInfo(**await self.policy.reload.remote())

    @app.get("/admin/export")
    async def export(
        self,
        format: Annotated[Literal["jsonl", "parquet"], Query()] = "jsonl",
        pending: Annotated[bool, Query(description="Include comparisons nobody has decided yet.")] = True,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Every stored comparison with its document, versions, timestamps and choice."""
        self._check_admin(authorization)
        table = await asyncio.to_thread(self.store.export_table, pending)
        media = "application/vnd.apache.parquet" if format == "parquet" else "application/x-ndjson"
        return Response(_export_bytes(table, format), media_type=media,
                        headers={"Content-Disposition": f'attachment; filename="comparisons.{format}"'})

    @app.get("/admin/selections")
    async def selections(self, authorization: Annotated[str | None, Header()] = None) -> list[SelectionInfo]:
        """The latest pairs ``pair_selection=uncertain`` chose, oldest first: every candidate pair
        with its reward scores and which one was stored, to check what the selection shows people."""
        self._check_admin(authorization)
        return [SelectionInfo(comparison_id=comparison_id, **asdict(selection))
                for comparison_id, selection in self.recent_selections]

    @app.post("/admin/labelers")
    async def create_labeler(
        self, body: LabelerCreate, authorization: Annotated[str | None, Header()] = None
    ) -> LabelerCreated:
        """A new labeler and their token, shown only in this answer (the database keeps its sha256)."""
        self._check_admin(authorization)
        labeler, token = await asyncio.to_thread(self.labelers.create, body.name)
        return LabelerCreated(labeler_id=labeler.id, token=token)

    @app.delete("/admin/labelers/{labeler_id}")
    async def revoke_labeler(
        self, labeler_id: str, authorization: Annotated[str | None, Header()] = None
    ) -> LabelerInfo:
        """Revoke a labeler's token (403 from then on); the labeler and their choices stay."""
        self._check_admin(authorization)
        labeler = await asyncio.to_thread(self.labelers.revoke, labeler_id)
        return LabelerInfo(labeler_id=labeler.id, name=labeler.name, revoked=labeler.revoked)

    @app.get("/admin/labelers")
    async def labeler_reports(
        self, authorization: Annotated[str | None, Header()] = None
    ) -> list[LabelerReport]:
        """Every labeler's volume and quality: gold accuracy, agreement on doubly shown pairs,
        share of can't tell, median decision time."""
        self._check_admin(authorization)
        return [LabelerReport(**asdict(row)) for row in await asyncio.to_thread(self.labelers.stats)]

    @app.post("/admin/gold")
    async def add_gold(self, request: Request, authorization: Annotated[str | None, Header()] = None
                       ) -> GoldStored:
        """Known-answer pairs, one JSON object per line ({text, summary_0, summary_1, answer, title?});
        nothing is stored unless every line is valid."""
        self._check_admin(authorization)
        body = await request.body()
        if len(body) > self.limits.max_upload_bytes:
            raise _too_large("body", len(body), self.limits.max_upload_bytes)
        pairs = _gold_lines(body)
        stored = await asyncio.to_thread(self.queue.add_gold, pairs)
        return GoldStored(stored=len(stored))
