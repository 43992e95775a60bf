"""What the ingress checks before a route sees a request: the Host header and the body size.

``FrontDoor`` is the FastAPI app's outermost middleware. A body over its route's limit is refused
at once when its Content-Length says so, else as soon as the bytes received pass the limit, before
FastAPI parses (or spools to disk) any of it. Serve's HTTP proxy queues the body for the replica
as it arrives and drops the queue when the answer is sent, so a 413 also stops the proxy's copy.
(Ray 2.60 removed proxy-level middlewares from ``http_options``; the replica is where this runs.)
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.middleware.trustedhost import TrustedHostMiddleware

from rlhf.serve.config import ServingConfig
from rlhf.serve.openai_messages import COMPLETION_PATHS, error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MULTIPART_SLACK_BYTES = 64 * 1024  # boundaries and part headers around an uploaded file
UPLOAD_ROUTES = ("/v1/documents", "/admin/gold", "/admin/documents")


@dataclass(frozen=True)
class FrontDoorRules:
    """The checks of one deployment, from its config (``FeedbackApi`` puts them in ``app.state``)."""

    body_limits: dict[str, int]  # route path -> largest body; other routes: default_body_limit
    default_body_limit: int
    hosts: list[str]  # accepted Host header values ("*": any)

    @classmethod
    def of(cls, serving: ServingConfig) -> FrontDoorRules:
        upload = serving.max_upload_bytes
        limits = {
            route: upload + (MULTIPART_SLACK_BYTES if route == "/v1/documents" else 0)
            for route in UPLOAD_ROUTES
        }
        return cls(limits, serving.max_json_bytes, serving.accepted_hosts())


class FrontDoor:
    """ASGI middleware: Starlette's Host check, then ``BodyLimit``, with the rules the app's state
    holds (set by the deployment's constructor, which runs before the first request)."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self._checked: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._checked is None:
            rules: FrontDoorRules = scope["app"].state.front_door
            limited = BodyLimit(self.app, rules.body_limits, rules.default_body_limit)
            self._checked = TrustedHostMiddleware(limited, allowed_hosts=rules.hosts)
        await self._checked(scope, receive, send)


class BodyLimit:
    """ASGI middleware: 413 for a request body over its route's limit, before it is read."""

    def __init__(self, app: ASGIApp, limits: dict[str, int], default: int):
        self.app = app
        self.limits = limits
        self.default = default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(send, f"{declared} bytes", limit, scope["path"])
            return
        await self.app(scope, *_counted(receive, send, limit, scope["path"]))


def _counted(receive: Receive, send: Send, limit: int, path: str) -> tuple[Receive, Send]:
    """``receive`` that stops at ``limit`` body bytes (answering 413 and telling the app the client
    left), and ``send`` that drops what the app sends after that."""
    state = {"received": 0, "refused": False, "started": False}

    async def counted_receive() -> Message:
        message = await receive()
        if message["type"] == "http.request" and not state["refused"]:
            state["received"] += len(message.get("body", b""))
            if state["received"] > limit:
                state["refused"] = True
                if not state["started"]:
                    await _too_large(send, f"more than {limit} bytes", limit, path)
                return {"type": "http.disconnect"}
        return message

    async def guarded_send(message: Message) -> None:
        if state["refused"]:
            return
        state["started"] = True
        await send(message)

    return counted_receive, guarded_send


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(send: Send, size: str, limit: int, path: str) -> None:
    """413 in the app's shape, or in OpenAI's on the OpenAI-compatible routes."""
    message = (f"body: {size} is over this route's {limit}-byte limit; send less "
               "(one document or section at a time)")
    openai = path in COMPLETION_PATHS
    refused = error_body(message, code="request_too_large") if openai else {"detail": message}
    body = json.dumps(refused).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"connection", b"close"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
