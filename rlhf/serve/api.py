"""The HTTP API and web page: FastAPI on a Ray Serve ingress deployment. Here the public and
labeler routes, as ``FeedbackApi`` methods; the admin routes are ``admin.py``'s router and the
OpenAI-compatible ones ``openai_routes.py``'s, both included in the same app.

No ``from __future__ import annotations`` here: FastAPI reads the route signatures at runtime
and Serve's class-based ingress cannot resolve string annotations.

Client mistakes answer 4xx naming the field (422 invalid, 413 too large, 415 not a PDF, 404
unknown id, 409 conflicting choice); store writes commit before the answer goes out.
"""


import asyncio
import logging
import random
import secrets
from collections import deque
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING, Annotated

from fastapi import FastAPI, File, Header, HTTPException, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhf.data.pdf import PdfError, extract_paper_isolated
from rlhf.registry import PolicyRegistry
from rlhf.serve.access import Caller, LabelerGate, RateLimiter, client_address, queue_kind, too_many
from rlhf.serve.admin import AdminHandles
from rlhf.serve.admin import router as admin_router
from rlhf.serve.config import ServeConfig
from rlhf.serve.front_door import FrontDoor, FrontDoorRules
from rlhf.serve.http_errors import too_large
from rlhf.serve.messages import (
    CompareRequest,
    CompareResponse,
    DocumentResponse,
    DocumentSection,
    FeedbackRequest,
    FeedbackResponse,
    LabelerMe,
    PolicyInfo,
    SummarizeRequest,
    SummarizeResponse,
)
from rlhf.serve.openai_routes import OpenAIHandles, is_openai_route
from rlhf.serve.openai_routes import http_error as openai_http_error
from rlhf.serve.openai_routes import invalid_request as openai_invalid_request
from rlhf.serve.openai_routes import router as openai_router
from rlhf.serve.records import Selection, Summary
from rlhf.store import AlreadyDecidedError, Comparison, FeedbackStore, NotFoundError, StoreInputError
from rlhf.store.labelers import Labelers
from rlhf.store.queue import LabelingQueue
from rlhf.store.tables import ANONYMOUS

if TYPE_CHECKING:
    from rlhf.serve.reward_versions import CurrentRewardModel

logger = logging.getLogger(__name__)

PDF_MAGIC = b"%PDF"
READY_TIMEOUT_S = 5.0
SELECTIONS_KEPT = 100  # uncertain selections GET /admin/selections shows, newest last

def _pair_scorer(cfg: ServeConfig) -> "CurrentRewardModel | None":
    """The reward model choosing pairs with ``serve.pair_selection=uncertain``, else None.

    Imported only then: it loads torch and transformers, which the ingress needs for nothing else
    (a lighter replica: ~1.7 CPU-s to import this module instead of ~6)."""
    if cfg.serve.pair_selection != "uncertain":
        return None
    from rlhf.serve import reward_versions

    return reward_versions.CurrentRewardModel(cfg.serve.reward_registry, cfg.policy)


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


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field, without echoing the input (which may not even be encodable); the
    OpenAI routes answer 400 in OpenAI's shape."""
    if is_openai_route(request):
        return openai_invalid_request(exc)
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
        problems.append(f"{field}: {error['msg']}")
    return _error(422, "; ".join(problems))


# Starlette types a handler as taking any Exception, though it calls it only with the class it is for.
app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's ``{"detail": ...}``, but OpenAI's error shape on the OpenAI routes."""
    return openai_http_error(exc) if is_openai_route(request) else await http_exception_handler(request, exc)


app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]  # as above
app.include_router(admin_router)  # /admin/...: FeedbackApi puts what its routes use in app.state.admin
app.include_router(openai_router)  # /v1/models, /v1/(chat/)completions: their handles in app.state.openai


def _cut_to_bytes(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to at most ``limit`` UTF-8 bytes on a character (and, if possible, word) edge."""
    data = text.encode()
    if len(data) <= limit:
        return text, False
    cut = data[:limit].decode(errors="ignore")
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut), True


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
        self.labelers = Labelers(self.store)
        self.queue = LabelingQueue(self.store)
        self.gate = LabelerGate(self.labelers, cfg.serve.labeler_auth)
        self.per_labeler = RateLimiter(cfg.serve.requests_per_minute_per_labeler)
        self.per_address = RateLimiter(cfg.serve.requests_per_minute_per_address)
        self.rewards = _pair_scorer(cfg)
        self.recent_selections: deque[tuple[str, Selection]] = deque(maxlen=SELECTIONS_KEPT)
        self.pdf_parses = asyncio.Semaphore(cfg.serve.parallel_pdf_parses)
        registry = PolicyRegistry(cfg.registry)
        app.state.openai = OpenAIHandles(policy=policy, registry=registry, admit=self._admit,
                                         max_text_bytes=cfg.serve.max_text_bytes)
        app.state.admin = AdminHandles(
            policy=policy, store=self.store, registry=registry, labelers=self.labelers,
            queue=self.queue, recent_selections=self.recent_selections,
            max_upload_bytes=cfg.serve.max_upload_bytes, token_sha256=admin_token_sha256,
            token_env=cfg.serve.admin_token_env,
        )

    def _check_text(self, text: str) -> None:
        size = len(text.encode())
        if size > self.limits.max_text_bytes:
            raise too_large("text", size, self.limits.max_text_bytes)

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
        assert self.rewards is not None  # _pair calls this only when there is a reward model
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
        # record_choice returns the comparison decided (by this answer or an identical earlier one)
        assert stored.verdict is not None and stored.decided_at is not None
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
            raise too_large("file", len(data), self.limits.max_upload_bytes)
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
