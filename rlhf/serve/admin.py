"""The admin routes (``/admin/...``): one FastAPI router that ``api.py`` includes in the ingress
app, every route behind the one admin-token dependency, so no route can forget the check.

The routes are plain functions, not ``FeedbackApi`` methods: what they use of the ingress replica
(store, registry, labelers, queue, policy handle, token digest) is an ``AdminHandles`` record that
``FeedbackApi`` puts in ``app.state.admin``. No ``from __future__ import annotations``: FastAPI
reads these signatures at runtime.
"""


import asyncio
import hashlib
import hmac
import io
import json
from collections import deque
from dataclasses import asdict, dataclass
from typing import Annotated, Literal, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from ray.serve.handle import DeploymentHandle

from rlhf.registry import PolicyRegistry, UnknownVersionError
from rlhf.serve.access import bearer_token
from rlhf.serve.http_errors import too_large
from rlhf.serve.messages import (
    DocumentLine,
    DocumentsStored,
    GoldLine,
    GoldStored,
    LabelerCreate,
    LabelerCreated,
    LabelerInfo,
    LabelerReport,
    PolicyInfo,
    RollbackRequest,
    SelectionInfo,
)
from rlhf.serve.records import Selection
from rlhf.store import FeedbackStore
from rlhf.store.labelers import Labelers
from rlhf.store.queue import GoldPair, LabelingQueue

LABELER_ID = r"^[A-Za-z0-9_-]{1,64}$"  # what the store issues (uuid4); anything else is no labeler
ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(frozen=True)
class AdminHandles:
    """What the admin routes use of one ingress replica; ``recent_selections`` is the deque the
    labeling queue appends to, shared, not copied."""

    policy: DeploymentHandle
    store: FeedbackStore
    registry: PolicyRegistry  # /admin/rollback moves its CURRENT pointer
    labelers: Labelers
    queue: LabelingQueue
    recent_selections: deque[tuple[str, Selection]]
    max_upload_bytes: int
    token_sha256: str | None  # None: no admin token was set, the admin routes are off
    token_env: str  # the variable jobs/serve.py reads the token from, named in the 503


async def admin_handles(request: Request) -> AdminHandles:
    """The replica's handles, from the app's state (set by ``FeedbackApi.__init__``)."""
    return request.app.state.admin


Admin = Annotated[AdminHandles, Depends(admin_handles)]


async def require_admin(admin: Admin, authorization: Annotated[str | None, Header()] = None) -> None:
    """Every admin route's check: 503 while no admin token is set, 401 unless the request sends
    ``Bearer <admin token>`` (any case of "Bearer"), compared by SHA-256 digest in constant time."""
    if admin.token_sha256 is None:
        raise HTTPException(503, f"admin routes are off: set {admin.token_env} where jobs/serve.py starts")
    token = bearer_token(authorization)
    digest = hashlib.sha256(token.encode()).hexdigest()
    if not token or not hmac.compare_digest(digest, admin.token_sha256):
        raise HTTPException(401, "Authorization: send 'Bearer <admin token>'",
                            headers={"WWW-Authenticate": "Bearer"})


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


def _export_bytes(table: pa.Table, fmt: Literal["jsonl", "parquet"]) -> bytes:
    """The export as a Parquet file, or as JSON lines with timestamps in ISO 8601."""
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


async def _uploaded_lines(request: Request, admin: AdminHandles, schema: type[ModelT], expected: str
                          ) -> list[ModelT]:
    """An upload's lines (the front door already refused a body over max_upload_bytes; this
    check holds without it)."""
    body = await request.body()
    if len(body) > admin.max_upload_bytes:
        raise too_large("body", len(body), admin.max_upload_bytes)
    return _jsonl_lines(body, schema, expected)


@router.post("/reload")
async def reload(admin: Admin) -> PolicyInfo:
    """Switch a policy replica to the current published version now (the others follow at their
    next registry poll)."""
    return PolicyInfo(**await admin.policy.reload.remote())


@router.post("/rollback")
async def rollback(body: RollbackRequest, admin: Admin) -> PolicyInfo:
    """Make an earlier published version current: the registry's CURRENT pointer moves (atomically),
    one replica switches now and every other at its next registry poll, each loading the version
    before it answers with it (no request fails). The online loop continues from it."""
    try:
        await asyncio.to_thread(admin.registry.set_current, body.version)
    except UnknownVersionError as exc:
        raise HTTPException(404, str(exc)) from None
    return PolicyInfo(**await admin.policy.reload.remote())


@router.get("/export")
async def export(
    admin: Admin,
    format: Annotated[Literal["jsonl", "parquet"], Query()] = "jsonl",
    pending: Annotated[bool, Query(description="Include comparisons nobody has decided yet.")] = True,
) -> Response:
    """Every stored comparison with its document, versions, timestamps and choice."""
    table = await asyncio.to_thread(admin.store.export_table, pending)
    media = "application/vnd.apache.parquet" if format == "parquet" else "application/x-ndjson"
    return Response(_export_bytes(table, format), media_type=media,
                    headers={"Content-Disposition": f'attachment; filename="comparisons.{format}"'})


@router.get("/selections")
async def selections(admin: Admin) -> list[SelectionInfo]:
    """The latest pairs ``pair_selection=uncertain`` chose, oldest first: every candidate pair
    with its reward scores and which one was stored, to check what the selection shows people."""
    return [SelectionInfo(comparison_id=comparison_id, **asdict(selection))
            for comparison_id, selection in admin.recent_selections]


@router.post("/labelers")
async def create_labeler(body: LabelerCreate, admin: Admin) -> LabelerCreated:
    """A new labeler and their token, shown only in this answer (the database keeps its sha256)."""
    labeler, token = await asyncio.to_thread(admin.labelers.create, body.name)
    return LabelerCreated(labeler_id=labeler.id, token=token)


@router.delete("/labelers/{labeler_id}")
async def revoke_labeler(
    labeler_id: Annotated[str, PathParam(pattern=LABELER_ID)], admin: Admin
) -> LabelerInfo:
    """Revoke a labeler's token (403 from then on); the labeler and their choices stay."""
    labeler = await asyncio.to_thread(admin.labelers.revoke, labeler_id)
    return LabelerInfo(labeler_id=labeler.id, name=labeler.name, revoked=labeler.revoked)


@router.get("/labelers")
async def labeler_reports(admin: Admin) -> list[LabelerReport]:
    """Every labeler's volume and quality: gold accuracy, agreement on doubly shown pairs,
    share of can't tell, median decision time."""
    return [LabelerReport(**asdict(row)) for row in await asyncio.to_thread(admin.labelers.stats)]


@router.post("/gold")
async def add_gold(request: Request, admin: Admin) -> GoldStored:
    """Known-answer pairs, one JSON object per line ({text, summary_0, summary_1, answer, title?});
    nothing is stored unless every line is valid."""
    lines = await _uploaded_lines(request, admin, GoldLine, "text, summary_0, summary_1 and answer (0 or 1)")
    pairs = [GoldPair(line.text, line.summary_0, line.summary_1, line.answer, line.title)
             for line in lines]
    stored = await asyncio.to_thread(admin.queue.add_gold, pairs)
    return GoldStored(stored=len(stored))


@router.post("/documents")
async def add_documents(request: Request, admin: Admin) -> DocumentsStored:
    """Documents for the labeling queue, one JSON object per line ({text, title?}); with labeler
    auth the queue writes fresh pairs only for these, never for a text someone pasted. Nothing is
    stored unless every line is valid."""
    lines = await _uploaded_lines(request, admin, DocumentLine, "text (and optionally title)")
    ids = await asyncio.to_thread(admin.queue.add_documents, [(line.text, line.title) for line in lines])
    return DocumentsStored(stored=len(set(ids)))
