"""OpenAI-compatible routes on the ingress: ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions``, so the ``openai`` SDK, LangChain and evaluation harnesses call the policy
with the code they already have.

A chat request's last (user) message, or a completion's prompt, is the document: it is encoded
exactly as ``/v1/summarize`` encodes it (the summarization prompt the policy was trained on, not a
chat template), and every choice is one request into the policy deployment's ``@serve.batch``
(``PolicyDeployment.complete``). Versions, LoRA adapter versions included, are chosen by name, or
``current``. The stream is the finished choices sent in word chunks after generation, not token by
token. Admission (rate limits, labeler token) and the text-size limit are the ingress's own
(``FeedbackApi._admit``, in ``app.state.openai`` like the admin router's handles); errors have
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with 400 for any bad
parameter (``api.py`` routes this router's errors here by its tag).

No ``from __future__ import annotations``: FastAPI reads these signatures at runtime.
"""


import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhf.registry import PolicyRegistry
from rlhf.serve.access import Caller
from rlhf.serve.http_errors import too_large
from rlhf.serve.openai_messages import (
    MAX_CHOICES,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorResponse,
    FinishReason,
    GenerationParams,
    ModelCard,
    ModelList,
    Usage,
    error_body,
)
from rlhf.serve.records import Sampling, Summary, registry_current, servable_versions

OPENAI_TAG = "openai"  # the tag of this router's routes: how the app's error handlers know them
CURRENT = "current"  # the model name of whichever version the registry's CURRENT names
WORD = re.compile(r"\s*\S+|\s+$")  # a stream chunk: a word with the whitespace before it

# (type, code) of an error by status, as OpenAI's API sets them; other 4xx: invalid_request_error.
ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


@dataclass(frozen=True)
class OpenAIHandles:
    """What these routes use of one ingress replica (``FeedbackApi`` puts it in ``app.state.openai``)."""

    policy: DeploymentHandle
    registry: PolicyRegistry  # which versions exist, which one is current
    admit: Callable[[Request, str | None], Awaitable[Caller]]  # rate limits and labeler token
    max_text_bytes: int  # a document over it answers 413


def openai_handles(request: Request) -> OpenAIHandles:
    return request.app.state.openai


Handles = Annotated[OpenAIHandles, Depends(openai_handles)]
router = APIRouter(prefix="/v1", tags=[OPENAI_TAG],
                   responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429)})


class OpenAIError(HTTPException):
    """An error these routes raise themselves, naming the parameter and OpenAI's code for it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(status, message)
        self.param = param
        self.code = code


def is_openai_route(request: Request) -> bool:
    """Whether the request matched one of this router's routes (FastAPI sets ``scope["route"]``)."""
    return OPENAI_TAG in getattr(request.scope.get("route"), "tags", ())


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error body: the type (and code, unless given) by status."""
    usual = ("server_error" if status >= 500 else "invalid_request_error", None)
    kind, usual_code = ERROR_KINDS.get(status, usual)
    return JSONResponse(error_body(message, kind, param, code or usual_code), status_code=status,
                        headers=headers)


def http_error(exc: StarletteHTTPException) -> JSONResponse:
    """An HTTP error of these routes (401/403/429 from admission too) in OpenAI's shape, its headers
    (Retry-After, WWW-Authenticate) kept."""
    return error_response(exc.status_code, str(exc.detail), getattr(exc, "param", None),
                          getattr(exc, "code", None), exc.headers)


def invalid_request(exc: RequestValidationError) -> JSONResponse:
    """400, OpenAI's status for a bad parameter (the SDK's BadRequestError), naming each bad field
    without echoing the input; ``param`` is the first one."""
    params = [param_name(error["loc"]) if error["type"] != "json_invalid" else None for error in exc.errors()]
    problems = [f"{param or 'body'}: {error['msg']}" for param, error in zip(params, exc.errors())]
    return error_response(400, "; ".join(problems), params[0] if params else None)


def param_name(loc: Sequence[Any]) -> str | None:
    """A validation error's location as OpenAI names parameters: ('body', 'messages', 0, 'content')
    -> 'messages[0].content'; None for the body as a whole."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name or None


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first place any stop string starts (the stop string left out, as OpenAI
    does), and whether it was cut."""
    starts = [start for start in (text.find(stop) for stop in stops) if start >= 0]
    return (text[:min(starts)], True) if starts else (text, False)


def finish(summary: Summary, stops: Sequence[str]) -> tuple[str, FinishReason]:
    """A choice's text and why it ended: ``stop`` at eos or a stop string, ``length`` at the token cap."""
    text, cut = cut_at_stop(summary.text, stops)
    return text, "length" if summary.at_length_limit and not cut else "stop"


def word_chunks(text: str) -> list[str]:
    """``text`` as stream pieces, each word with the whitespace before it; joined, exactly ``text``."""
    return WORD.findall(text)


def sampling_of(params: GenerationParams, index: int) -> Sampling | None:
    """How choice ``index`` is drawn: greedy (None) at temperature 0; with a seed, seed + index, so
    the choices differ and the same request writes the same ones."""
    if params.temperature == 0:
        return None
    seed = None if params.seed is None else params.seed + index
    return Sampling(params.temperature, params.top_p, seed)


def usage_of(choices: Sequence[Sequence[Summary]]) -> Usage:
    """Token counts of a request: each document's input once, every choice's output."""
    prompt = sum(summaries[0].prompt_tokens for summaries in choices)
    completion = sum(summary.completion_tokens for summaries in choices for summary in summaries)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _model_cards(registry: PolicyRegistry) -> list[ModelCard]:
    """``current`` (its root: the version it names now), then every servable version, oldest first."""
    def card(name: str, version: str) -> ModelCard:
        folder = registry.root / version
        return ModelCard(id=name, created=int(folder.stat().st_mtime) if folder.is_dir() else 0, root=version)

    return [card(CURRENT, registry_current(registry))] + [card(v, v) for v in servable_versions(registry)]


def _resolve(registry: PolicyRegistry, model: str) -> str:
    """The version ``model`` names; 404 ``model_not_found`` (OpenAI's code) for any other name."""
    if model == CURRENT:
        return registry_current(registry)
    versions = servable_versions(registry)
    if model not in versions:
        raise OpenAIError(404, f"model: {model!r} is not served here; GET /v1/models lists "
                               f"{', '.join(versions)} and {CURRENT!r}", "model", "model_not_found")
    return model


async def _generate(
    handles: OpenAIHandles, params: GenerationParams, documents: list[str], field: str, max_tokens: int | None
) -> tuple[str, list[list[Summary]]]:
    """The version that answers and, per document, its ``n`` choices: each a request into the policy
    deployment's batch (one for all choices when greedy: they would be the same)."""
    for document in documents:
        if (size := len(document.encode())) > handles.max_text_bytes:
            raise OpenAIError(413, too_large(field, size, handles.max_text_bytes).detail, field)
    if len(documents) * params.n > MAX_CHOICES:
        raise OpenAIError(400, f"n: {params.n} choices of {len(documents)} documents is over the "
                               f"{MAX_CHOICES} generations one request may ask for", "n")
    version = await asyncio.to_thread(_resolve, handles.registry, params.model)
    runs = 1 if sampling_of(params, 0) is None else params.n
    calls = [handles.policy.complete.remote(document, version, max_tokens, sampling_of(params, i))
             for document in documents for i in range(runs)]
    done: list[Summary] = list(await asyncio.gather(*calls))
    per_document = [done[d * runs:(d + 1) * runs] * (params.n // runs) for d in range(len(documents))]
    return version, per_document


def sse_events(chunks: Iterable[BaseModel]) -> Iterator[str]:
    """Server-sent events as the ``openai`` SDK reads them: ``data: <json>`` per chunk, then
    ``data: [DONE]``."""
    for chunk in chunks:
        yield f"data: {chunk.model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


def _streamed(chunks: Iterable[BaseModel]) -> StreamingResponse:
    return StreamingResponse(sse_events(chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def chat_chunks(completion: ChatCompletion, include_usage: bool) -> Iterator[ChatCompletionChunk]:
    """A finished chat completion as OpenAI streams one: per choice a chunk with the role, its text in
    word chunks and a chunk with its finish_reason; with ``include_usage`` a last chunk with no
    choices and the usage (null in every other chunk)."""
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=completion.id, created=completion.created, model=completion.model,
                                   choices=choices, usage=usage)

    for choice in completion.choices:
        yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(role="assistant", content=""))])
        for piece in word_chunks(choice.message.content):
            yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(content=piece))])
        end = ChatChunkChoice(index=choice.index, delta=ChatDelta(), finish_reason=choice.finish_reason)
        yield chunk([end])
    if include_usage:
        yield chunk([], completion.usage)


def completion_chunks(completion: Completion, include_usage: bool) -> Iterator[Completion]:
    """A finished text completion as OpenAI streams one: per choice its text in word chunks, then an
    empty piece with its finish_reason; with ``include_usage`` a last chunk with the usage."""
    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return completion.model_copy(update={"choices": choices, "usage": usage})

    for choice in completion.choices:
        for piece in word_chunks(choice.text):
            yield chunk([CompletionChoice(index=choice.index, text=piece, finish_reason=None)])
        yield chunk([CompletionChoice(index=choice.index, text="", finish_reason=choice.finish_reason)])
    if include_usage:
        yield chunk([], completion.usage)


@router.get("/models")
async def list_models(handles: Handles) -> ModelList:
    """``current`` and every servable version (LoRA adapter versions too), oldest first: the names
    ``model`` takes. Public, like /v1/policy."""
    return ModelList(data=await asyncio.to_thread(_model_cards, handles.registry))


@router.get("/models/{model}")
async def retrieve_model(model: str, handles: Handles) -> ModelCard:
    """One of the names /v1/models lists; 404 for any other."""
    await asyncio.to_thread(_resolve, handles.registry, model)
    return next(card for card in await asyncio.to_thread(_model_cards, handles.registry) if card.id == model)


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, handles: Handles,
    authorization: Annotated[str | None, Header()] = None,
) -> ChatCompletion | StreamingResponse:
    """Summaries of the last (user) message's text by the version ``model`` names; earlier messages
    do not reach the model. With ``stream``, server-sent ``chat.completion.chunk`` events."""
    await handles.admit(request, authorization)
    version, choices = await _generate(handles, body, [body.document()], "messages", body.length())
    finished = [finish(summary, body.stops()) for summary in choices[0]]
    completion = ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=version, usage=usage_of(choices),
        choices=[ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=reason)
                 for i, (text, reason) in enumerate(finished)],
    )
    return _streamed(chat_chunks(completion, body.include_usage())) if body.stream else completion


@router.post("/completions", response_model=Completion)
async def completions(
    body: CompletionRequest, request: Request, handles: Handles,
    authorization: Annotated[str | None, Header()] = None,
) -> Completion | StreamingResponse:
    """Summaries of each ``prompt`` (a document) by the version ``model`` names, choices ordered by
    document, then by n. With ``stream``, server-sent ``text_completion`` chunks."""
    await handles.admit(request, authorization)
    version, choices = await _generate(handles, body, body.prompt, "prompt", body.max_tokens)
    finished = [finish(summary, body.stops()) for summaries in choices for summary in summaries]
    completion = Completion(
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=version, usage=usage_of(choices),
        choices=[CompletionChoice(index=i, text=text, finish_reason=reason)
                 for i, (text, reason) in enumerate(finished)],
    )
    return _streamed(completion_chunks(completion, body.include_usage())) if body.stream else completion
