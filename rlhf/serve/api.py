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
from importlib import resources
from typing import Annotated, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import FastAPI, File, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from rlhf.data.pdf import PdfError, extract_paper
from rlhf.serve.config import ServeConfig
from rlhf.serve.schemas import (
    CompareRequest,
    CompareResponse,
    DocumentResponse,
    DocumentSection,
    FeedbackRequest,
    FeedbackResponse,
    PolicyInfo,
    SummarizeRequest,
    SummarizeResponse,
)
from rlhf.store import AlreadyDecidedError, FeedbackStore, NotFoundError, StoreInputError

PDF_MAGIC = b"%PDF"
READY_TIMEOUT_S = 5.0

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

    @app.post("/v1/compare")
    async def compare(self, body: CompareRequest) -> CompareResponse:
        """Two summaries of the text, stored as a pending comparison before they are returned."""
        self._check_text(body.text)
        pair = list(await self.policy.compare.remote(body.text, body.max_new_tokens))
        if pair[0].text == pair[1].text or not all(s.text.strip() for s in pair):
            raise HTTPException(503, "the policy wrote an empty or the same summary twice; send the "
                                     "request again")
        self.rng.shuffle(pair)
        first, second = pair
        document_id = await asyncio.to_thread(self.store.add_document, body.text, body.title, body.source)
        comparison_id = await asyncio.to_thread(
            self.store.create_comparison, document_id, first.text, second.text, first.version, second.version
        )
        return CompareResponse(comparison_id=comparison_id, summaries=(first.text, second.text),
                               truncated=first.truncated)

    @app.post("/v1/feedback")
    async def feedback(self, body: FeedbackRequest) -> FeedbackResponse:
        """Record which summary was better; committed to the database before this answers."""
        stored = await asyncio.to_thread(
            self.store.record_choice, body.comparison_id, body.choice, body.labeler
        )
        return FeedbackResponse(comparison_id=stored.id, choice=stored.choice, decided_at=stored.decided_at)

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
        """Switch a policy replica to the newest published version now (the others follow at their
        next registry poll)."""
        self._check_admin(authorization)
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
