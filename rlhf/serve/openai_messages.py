"""Bodies of the OpenAI-compatible routes (``openai_routes.py``), in the shapes of OpenAI's API
reference and the ``openai`` SDK's types: what the SDK, LangChain and evaluation harnesses send and
parse.

Requests are ``RequestBody``s: an unknown field, or a parameter this server cannot honour
(``logprobs``, ``tools``, a non-zero penalty), answers 400 naming it instead of being ignored, and
no text holds NUL. Sizes that come from config (413) and the model name (404) are the routes' checks.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, field_validator

from rlhf.serve.messages import RequestBody, storable_text

MAX_CHOICES = 16  # generations one request may ask for (n times the prompts of /v1/completions)
MAX_STOPS = 4  # OpenAI's own limit on stop sequences
INT64 = 2**63  # seeds are 64-bit signed integers, as OpenAI's

FinishReason = Literal["stop", "length"]
Role = Literal["system", "developer", "user", "assistant"]


def _listed(value: Any) -> Any:
    """A single string as a list of one: OpenAI takes either, and a list type alone names a bad item
    ``stop[2]`` where a union would name it ``stop.list[str][2]``."""
    return [value] if isinstance(value, str) else value


def _parts(value: Any) -> Any:
    """Message content given as a string, as the one text part it means."""
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


class TextPart(RequestBody):
    """One part of a message's content given as a list (only text: the policy reads no images)."""

    type: Literal["text"]
    text: str


class ChatMessage(RequestBody):
    role: Role
    content: Annotated[list[TextPart] | None, BeforeValidator(_parts)] = Field(
        None, description="Text, or a list of text parts (joined with no separator).")
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        return "".join(part.text for part in self.content or [])


class StreamOptions(RequestBody):
    include_usage: bool = Field(False, description="A last chunk with no choices and the usage.")


class GenerationParams(RequestBody):
    """What chat and text completions share: the model, sampling, stop, and streaming."""

    model: str = Field(min_length=1, max_length=64,
                       description="A version GET /v1/models lists ('v0002'), or 'current'.")
    max_tokens: int | None = Field(None, gt=0, description="Tokens per choice; default and ceiling "
                                                           "serve.max_new_tokens (a larger value is "
                                                           "cut to it: finish_reason 'length').")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy (as /v1/summarize); "
                                                                    "default serve.temperature.")
    top_p: float | None = Field(None, gt=0, le=1, description="Default serve.top_p.")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to write.")
    stop: Annotated[list[str] | None, BeforeValidator(_listed)] = Field(
        None, max_length=MAX_STOPS, description=f"A string or up to {MAX_STOPS}; each choice is cut "
                                                "before the first one it holds.")
    seed: int | None = Field(None, ge=-INT64, lt=INT64, description="Choice i samples with seed + i, "
                                                                    "alone in its generate call: the "
                                                                    "same request, the same text.")
    stream: bool = Field(False, description="Server-sent events (chunks), ending with 'data: [DONE]'.")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="Accepted and not used.")
    frequency_penalty: float | None = Field(None, description="Only 0: no penalties here.")
    presence_penalty: float | None = Field(None, description="Only 0: no penalties here.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: list[str] | None) -> list[str] | None:
        if not all(value or []):
            raise ValueError("an empty stop sequence would cut every choice to nothing; leave it out")
        return [storable_text(stop) for stop in value] if value is not None else None

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("is not supported by this server; leave it out or send 0")
        return value

    def stops(self) -> list[str]:
        return self.stop or []

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1, description="The last one is a user message "
                                                                  "holding the document; the ones "
                                                                  "before it do not reach the model.")
    max_completion_tokens: int | None = Field(None, gt=0, description="max_tokens' newer name; wins "
                                                                      "when both are sent.")

    @field_validator("messages")
    @classmethod
    def _document_last(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role != "user" or not messages[-1].text().strip():
            raise ValueError("the last message must be a user message holding the document to summarise")
        return messages

    def document(self) -> str:
        return self.messages[-1].text()

    def length(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationParams):
    prompt: Annotated[list[str], BeforeValidator(_listed)] = Field(
        min_length=1, max_length=MAX_CHOICES, description="A document, or a list of documents (choices "
                                                          "are ordered by document, then by n).")

    @field_validator("prompt")
    @classmethod
    def _documents(cls, documents: list[str]) -> list[str]:
        for document in documents:
            if not storable_text(document).strip():
                raise ValueError("must contain non-whitespace text; send the document to summarise")
        return documents


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Input tokens the model read (each document once, after "
                                           "the cut to its window).")
    completion_tokens: int = Field(description="Tokens generated over all choices, before a stop cut.")
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="The version that wrote the choices ('current' resolved).")
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = Field(description="null in a stream's text chunks.")
    logprobs: None = None


class Completion(BaseModel):
    """A text completion, and (choices one piece at a time, usage null but in the last) a chunk of
    its stream: OpenAI uses the same object for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str = Field(description="The version that wrote the choices ('current' resolved).")
    choices: list[CompletionChoice]
    usage: Usage | None


class ModelCard(BaseModel):
    id: str = Field(description="A version, or 'current'.")
    object: Literal["model"] = "model"
    created: int = Field(description="When the version was published (Unix seconds; 0 for 'base').")
    owned_by: str = "rlhf"
    root: str = Field(description="The version it names: itself, or for 'current' the one serving now.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# The routes that answer in OpenAI's error shape, also when the front door refuses a body unread.
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body, ``{"error": {message, type, param, code}}``."""
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code)).model_dump()
