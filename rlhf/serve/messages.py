"""The HTTP API's request and response bodies; FastAPI turns them into validation and OpenAPI docs.

Field-level rules (non-empty text, choice 0 or 1) live here and answer 422 naming the field; size
limits that come from config (413) are checked by the routes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator

from rlhf.store.feedback import MAX_NOTE_CHARS, NOT_TEXT
from rlhf.store.tables import Verdict

MAX_NEW_TOKENS_CAP = 1024  # per-request ceiling, whatever the config's default


class RequestBody(BaseModel):
    """Every request body: an unknown field is a 422 naming it (a typo such as ``txt`` must not
    silently become a different request), and no text field holds NUL or a lone surrogate."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _storable_text(cls, value: Any) -> Any:
        return storable_text(value) if isinstance(value, str) else value


def storable_text(value: str) -> str:
    """``value``, unless it holds NUL or a lone surrogate (a field validator's ValueError)."""
    if bad := NOT_TEXT.search(value):
        raise ValueError(f"holds the character U+{ord(bad.group()):04X}, which is not text; send "
                         "valid Unicode without NUL")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must contain non-whitespace text; paste the document to summarise")
    return value


class SummarizeRequest(RequestBody):
    text: str = Field(description="The document to summarise.")
    max_new_tokens: int | None = Field(None, gt=0, le=MAX_NEW_TOKENS_CAP,
                                       description="Summary length in tokens; default from config.")

    _text = field_validator("text")(_not_blank)


class SummarizeResponse(BaseModel):
    summary: str
    policy_version: str
    truncated: bool = Field(description="The text was longer than the model's input window and was cut.")


class CompareRequest(RequestBody):
    text: str | None = Field(None, description="The document to compare summaries of; leave it out to "
                                               "get the next pair from the labeling queue.")
    max_new_tokens: int | None = Field(None, gt=0, le=MAX_NEW_TOKENS_CAP,
                                       description="Summary length in tokens; default from config.")
    title: str | None = Field(None, max_length=500, description="Section heading or document title.")
    source: Literal["paste", "pdf", "api"] = Field("api", description="Where the text came from.")

    @field_validator("text")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return None if value is None else _not_blank(value)


class CompareResponse(BaseModel):
    comparison_id: str = Field(description="Pass it to /v1/feedback with the index of the better summary.")
    summaries: tuple[str, str] = Field(description="Two summaries in random order; versions stay hidden.")
    truncated: bool
    text: str = Field(description="The document the summaries are of (the queue picks it when the "
                                  "request has none).")
    title: str | None


class FeedbackRequest(RequestBody):
    """A labeler's answer. Who answered comes from the Authorization header, never from the body:
    a body naming a ``labeler`` is refused (422) rather than silently ignored."""

    comparison_id: str = Field(min_length=1, max_length=64)
    choice: StrictInt | None = Field(
        None, ge=0, le=1, description="Index (0 or 1) of the better summary; null for other verdicts."
    )
    verdict: Verdict = Field("preference", description="preference (choice names the better summary), "
                                                       "both_bad or cant_tell (never trained on).")
    confidence: StrictInt | None = Field(None, ge=1, le=4, description="1 a guess, 2 somewhat sure, 3 "
                                                                       "fairly sure, 4 certain.")
    note: str | None = Field(None, max_length=MAX_NOTE_CHARS, description="A remark for the admins.")


class FeedbackResponse(BaseModel):
    comparison_id: str
    choice: int | None
    verdict: Verdict
    decided_at: datetime
    stored: bool = Field(default=True, description="The choice is committed to the database.")


class LabelerCreate(RequestBody):
    name: str = Field(min_length=1, max_length=200, description="Who the token is for.")


class LabelerCreated(BaseModel):
    labeler_id: str
    token: str = Field(description="Shown once: only its sha256 is stored. Send it as 'Authorization: "
                                   "Bearer <token>'.")


class LabelerInfo(BaseModel):
    labeler_id: str
    name: str
    revoked: bool


class LabelerMe(BaseModel):
    labeler_id: str = Field(description="'anonymous' while serve.labeler_auth is off.")
    name: str
    labeler_auth: bool = Field(description="Whether /v1/compare and /v1/feedback need a labeler token.")
    decided_today: int = Field(description="Answers recorded since 00:00 UTC.")


class LabelerReport(BaseModel):
    """GET /admin/labelers: one labeler's volume and quality (rlhf.store.labelers.LabelerStats)."""

    labeler_id: str
    name: str
    revoked: bool
    choices: int
    gold_answered: int
    gold_accuracy: float | None
    overlap_pairs: int
    agreement: float | None
    cant_tell_share: float | None
    median_decision_s: float | None


class GoldLine(RequestBody):
    """One line of POST /admin/gold's JSONL body."""

    text: str = Field(min_length=1)
    summary_0: str = Field(min_length=1)
    summary_1: str = Field(min_length=1)
    answer: StrictInt = Field(ge=0, le=1, description="Index (0 or 1) of the better summary.")
    title: str | None = Field(None, max_length=500)

    _text = field_validator("text", "summary_0", "summary_1")(_not_blank)

    @field_validator("summary_1")
    @classmethod
    def _different(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("summary_0"):
            raise ValueError("is identical to summary_0; a gold pair needs two different summaries")
        return value


class GoldStored(BaseModel):
    stored: int


class DocumentLine(RequestBody):
    """One line of POST /admin/documents' JSONL body: a document for the labeling queue."""

    text: str = Field(min_length=1)
    title: str | None = Field(None, max_length=500)

    _text = field_validator("text")(_not_blank)


class DocumentsStored(BaseModel):
    stored: int = Field(description="Distinct documents the upload names (a text stored before "
                                    "counts once).")


class DocumentSection(BaseModel):
    heading: str
    text: str
    truncated: bool = Field(description="Cut to the text size limit so it can go to /v1/compare.")


class DocumentResponse(BaseModel):
    title: str
    sections: list[DocumentSection]


class PolicyInfo(BaseModel):
    version: str
    versions: list[str] = Field(description="Every servable version, oldest first.")
    metrics: dict = Field(description="What PPO recorded when it published this version.")


class RollbackRequest(RequestBody):
    version: str = Field(min_length=1, max_length=64, description="A published version, e.g. 'v0002'.")


class SelectionInfo(BaseModel):
    comparison_id: str = Field(description="The comparison the chosen pair was stored as.")
    reward_version: str = Field(description="The reward model version that scored the candidates.")
    pairs: list[tuple[str, str]] = Field(description="Every candidate pair, in the order generated "
                                                     "(the stored comparison may show the chosen one "
                                                     "swapped).")
    scores: list[tuple[float, float]] = Field(description="Raw reward scores (r_0, r_1) of each pair.")
    chosen: int = Field(description="Index of the stored pair: the smallest |sigmoid(r_0 - r_1) - 0.5|.")
