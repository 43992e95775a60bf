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
import logging
import random
import secrets
from collections import deque
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import resources
from typing import Annotated, Literal, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import FastAPI, File, Header, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from rlhf.data.pdf import PdfError, extract_paper_isolated
from rlhf.registry import PolicyRegistry, UnknownVersionError
from rlhf.serve.access import (
    Caller,
    LabelerGate,
    RateLimiter,
    bearer_token,
    client_address,
    queue_kind,
    too_many,
)
from rlhf.serve.config import ServeConfig
from rlhf.serve.front_door import FrontDoor, FrontDoorRules
from rlhf.serve.rewards import CurrentRewardModel, Selection
from rlhf.serve.schemas import (
    CompareRequest,
    CompareResponse,
    DocumentLine,
    DocumentResponse,
    DocumentSection,
    DocumentsStored,
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

logger = logging.getLogger(__name__)

PDF_MAGIC = b"%PDF"
LABELER_ID = r"^[A-Za-z0-9_-]{1,64}$"  # what the store issues (uuid4); anything else is no labeler
READY_TIMEOUT_S = 5.0
SELECTIONS_KEPT = 100  # uncertain selections GET /admin/selections shows, newest last
ModelT = TypeVar("ModelT", bound=BaseModel)

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


app.add_middleware(FrontDoor)  # Host and body-size checks; FeedbackApi sets app.state.front_door

for _error_class in ERROR_STATUS:
    app.add_exception_handler(_error_class, _client_error)


async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field, without echoing the input (which may not even be encodable)."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
        problems.append(f"{field}: {error['msg']}")
    return _error(422, "; ".join(problems))


app.add_exception_handler(RequestValidationError, _invalid_request)


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


def _jsonl_lines(body: bytes, schema: type[ModelT], expected: str) -> list[ModelT]:
    """An admin upload's JSONL body, one ``schema`` per non-empty line; 422 naming the first bad
    line and field, or ``expected`` when there is no line."""
    rows = []
    for number, line in enumerate(body.decode(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(schema.model_validate_json(line))
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or "line"
            raise HTTPException(422, f"line {number}: {field}: {error['msg']}") from None
    if not rows:
        raise HTTPException(422, f"body: nothing to store; send one JSON object per line with {expected}")
    return rows


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
        app.state.front_door = FrontDoorRules.of(cfg.serve)
        self.policy = policy
        self.limits = cfg.serve
        self.store = FeedbackStore(cfg.store.url)
        self.rng = random.Random(cfg.seed)  # the queue's draws: reproducible for a seed
        self.order_rng = secrets.SystemRandom()  # which summary is shown first: unpredictable
        self.admin_token_sha256 = admin_token_sha256
        self.admin_token_env = cfg.serve.admin_token_env
        self.registry = PolicyRegistry(cfg.registry)  # /admin/rollback moves its CURRENT pointer
        self.labelers = Labelers(self.store)
        self.queue = LabelingQueue(self.store)
        self.gate = LabelerGate(self.labelers, cfg.serve.labeler_auth)
        self.per_labeler = RateLimiter(cfg.serve.requests_per_minute_per_labeler)
        self.per_address = RateLimiter(cfg.serve.requests_per_minute_per_address)
        uncertain = cfg.serve.pair_selection == "uncertain"
        self.rewards = CurrentRewardModel(cfg.serve.reward_registry, cfg.policy) if uncertain else None
        self.recent_selections: deque[tuple[str, Selection]] = deque(maxlen=SELECTIONS_KEPT)
        self.pdf_parses = asyncio.Semaphore(cfg.serve.parallel_pdf_parses)

    def _check_text(self, text: str) -> None:
        size = len(text.encode())
        if size > self.limits.max_text_bytes:
            raise _too_large("text", size, self.limits.max_text_bytes)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> str:
        return resources.files("rlhf.serve").joinpath("static/index.html").read_text()

    @app.post("/v1/summarize")
    async def summarize(
        self, body: SummarizeRequest, request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> SummarizeResponse:
        """A summary by the current policy."""
        await self._admit(request, authorization)
        self._check_text(body.text)
        summary = await self.policy.summarize.remote(body.text, body.max_new_tokens)
        return SummarizeResponse(summary=summary.text, policy_version=summary.version,
                                 truncated=summary.truncated)

    async def _labeler(self, authorization: str | None) -> Caller:
        return await asyncio.to_thread(self.gate.identify, authorization)

    async def _admit(self, request: Request, authorization: str | None) -> Caller:
        """For every route that generates or parses: the rate limits (the address first: it needs
        no database read) and the labeler's identity."""
        peer = request.client.host if request.client else "unknown"
        address = client_address(peer, request.headers.get("x-forwarded-for"), self.limits.trusted_proxies)
        if wait := self.per_address.admit(address):
            raise too_many("address", request.url.path, wait)
        caller = await self._labeler(authorization)
        if caller.id != ANONYMOUS and (wait := self.per_labeler.admit(caller.id)):
            raise too_many("labeler", request.url.path, wait)
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
        pair, selection = await self._pair(text, max_new_tokens, select)
        self.order_rng.shuffle(pair)
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

    async def _pair(
        self, text: str, max_new_tokens: int | None, select: bool
    ) -> tuple[list[Summary], Selection | None]:
        """Two summaries of ``text`` by the policy; ``select``: the least certain of several."""
        if select and self.rewards is not None and await asyncio.to_thread(self.rewards.refresh):
            return await self._least_certain_pair(text, max_new_tokens)
        return _usable([list(await self.policy.compare.remote(text, max_new_tokens))])[0], None

    async def _queued(self, caller: Caller, max_new_tokens: int | None) -> CompareResponse:
        """A gold pair, a pair another labeler was shown, or a fresh pair of a stored document, drawn
        from the seeded rng; each a new comparison with the same response shape and the same cost."""
        kind = queue_kind(self.rng.random(), self.limits.gold_rate, self.limits.overlap_rate)
        picks = random.Random(self.rng.getrandbits(64))  # the thread's own rng: no shared state
        shown = None
        if kind == "gold":
            shown = await asyncio.to_thread(self.queue.show_gold, caller.id, picks)
        elif kind == "overlap":
            shown = await asyncio.to_thread(self.queue.show_overlap, caller.id, picks, self.gate.required)
        if shown is not None:
            return await self._stored_pair_response(shown, max_new_tokens)
        document = await asyncio.to_thread(self.queue.random_document, picks, self.gate.required)
        if document is None:
            raise HTTPException(404, "text: the labeling queue has no documents yet; an admin adds them "
                                     "with POST /admin/documents (or send a text to compare)")
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

    async def _stored_pair_response(self, shown: Comparison, max_new_tokens: int | None) -> CompareResponse:
        """A gold or overlap pair answered like a fresh one: the same generation runs on its document
        and is thrown away, so neither latency nor ``truncated`` tells a labeler which pairs are
        checked (they could answer only those with care)."""
        text, title = await asyncio.to_thread(self.queue.document, shown.document_id)
        decoy, _ = await self._pair(text, max_new_tokens, select=True)
        return CompareResponse(comparison_id=shown.id, summaries=(shown.summary_0, shown.summary_1),
                               truncated=decoy[0].truncated, text=text, title=title)

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
        self, file: Annotated[UploadFile, File(description="A paper as PDF.")], request: Request,
        authorization: Annotated[str | None, Header()] = None,
    ) -> DocumentResponse:
        """A PDF's sections (abstract first), each cut to the text limit so it can go to /v1/compare.
        The parse runs in a child process with a time and memory limit (``serve.pdf``), so a parser
        bomb costs one killed process and a 422, and every other request is answered meanwhile."""
        await self._admit(request, authorization)
        data = await file.read(self.limits.max_upload_bytes + 1)
        if len(data) > self.limits.max_upload_bytes:
            raise _too_large("file", len(data), self.limits.max_upload_bytes)
        if not data.startswith(PDF_MAGIC):
            raise HTTPException(415, "file: not a PDF (no %PDF header); upload the paper as a .pdf file")
        async with self.pdf_parses:
            paper = await extract_paper_isolated(data, self.limits.pdf)
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
        part = "database"
        try:
            await asyncio.to_thread(self.store.count_comparisons)
            part = "policy replica"
            info = await asyncio.wait_for(self.policy.policy_info.remote(), READY_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - any failure means "not ready"; the reason goes to the log
            logger.exception("readiness check: the %s did not answer", part)
            return _error(503, f"not ready: the {part} did not answer (details in the server log)")
        return JSONResponse({"status": "ready", "version": info["version"]})

    def _check_admin(self, authorization: str | None) -> None:
        if self.admin_token_sha256 is None:
            raise HTTPException(503, f"admin routes are off: set {self.admin_token_env} where "
                                     "jobs/serve.py starts")
        token = bearer_token(authorization)
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
        self, labeler_id: Annotated[str, PathParam(pattern=LABELER_ID)],
        authorization: Annotated[str | None, Header()] = None,
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
        lines = _jsonl_lines(await self._upload(request), GoldLine,
                             "text, summary_0, summary_1 and answer (0 or 1)")
        pairs = [GoldPair(line.text, line.summary_0, line.summary_1, line.answer, line.title)
                 for line in lines]
        stored = await asyncio.to_thread(self.queue.add_gold, pairs)
        return GoldStored(stored=len(stored))

    @app.post("/admin/documents")
    async def add_documents(
        self, request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> DocumentsStored:
        """Documents for the labeling queue, one JSON object per line ({text, title?}); with labeler
        auth the queue writes fresh pairs only for these, never for a text someone pasted. Nothing is
        stored unless every line is valid."""
        self._check_admin(authorization)
        lines = _jsonl_lines(await self._upload(request), DocumentLine, "text (and optionally title)")
        ids = await asyncio.to_thread(self.queue.add_documents, [(line.text, line.title) for line in lines])
        return DocumentsStored(stored=len(set(ids)))

    async def _upload(self, request: Request) -> bytes:
        """An admin upload's body (the proxy already refused one over max_upload_bytes)."""
        body = await request.body()
        if len(body) > self.limits.max_upload_bytes:
            raise _too_large("body", len(body), self.limits.max_upload_bytes)
        return body
