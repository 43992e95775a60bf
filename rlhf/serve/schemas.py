"""The HTTP API's request and response bodies; FastAPI turns them into validation and OpenAPI docs.

Field-level rules (non-empty text, choice 0 or 1) live here and answer 422 naming the field; size
limits that come from config (413) are checked by the routes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, StrictInt, field_validator

MAX_NEW_TOKENS_CAP = 1024  # per-request ceiling, whatever the config's default


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must contain non-whitespace text; paste the document to summarise")
    return value


class SummarizeRequest(BaseModel):
    text: str = Field(description="The document to summarise.")
    max_new_tokens: int | None = Field(None, gt=0, le=MAX_NEW_TOKENS_CAP,
                                       description="Summary length in tokens; default from config.")

    _text = field_validator("text")(_not_blank)


class SummarizeResponse(BaseModel):
    summary: str
    policy_version: str
    truncated: bool = Field(description="The text was longer than the model's input window and was cut.")


class CompareRequest(SummarizeRequest):
    title: str | None = Field(None, max_length=500, description="Section heading or document title.")
    source: Literal["paste", "pdf", "api"] = Field("api", description="Where the text came from.")


class CompareResponse(BaseModel):
    comparison_id: str = Field(description="Pass it to /v1/feedback with the index of the better summary.")
    summaries: tuple[str, str] = Field(description="Two summaries in random order; versions stay hidden.")
    truncated: bool


class FeedbackRequest(BaseModel):
    comparison_id: str = Field(min_length=1, max_length=64)
    choice: StrictInt = Field(ge=0, le=1, description="Index (0 or 1) of the better summary.")
    labeler: str | None = Field(None, max_length=200, description="Who chose (optional).")


class FeedbackResponse(BaseModel):
    comparison_id: str
    choice: int
    decided_at: datetime
    stored: bool = Field(True, description="The choice is committed to the database.")


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
