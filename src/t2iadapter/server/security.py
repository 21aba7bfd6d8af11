"""Request guards: a body-size cap (413 before parsing), the optional bearer token (401), same-origin
requests only when there is no token (403), and a client that hangs up logged in one line."""
from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from fastapi import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


def _too_large(max_bytes: int) -> str:
    return f"request body is larger than this server's limit of {max_bytes / (1024 * 1024):g} MB"


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a streamed body passes the cap; an HTTPException, so any layer answers 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, _too_large(max_bytes))


class BodyLimit:
    """ASGI middleware: 413 when Content-Length or the streamed body exceeds `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await send_json(send, 413, _too_large(self.max_bytes), [(b"connection", b"close")])


class TokenGuard:
    """ASGI middleware: when a token is set, 401 for every path that is not public."""

    def __init__(self, app: ASGIApp, token: str | None, public: Callable[[str], bool]) -> None:
        self.app = app
        self.token = token
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.token and not self.public(scope["path"]):
            headers = dict(scope.get("headers") or [])
            if not bearer_ok(headers.get(b"authorization", b""), self.token):
                await send_json(send, 401, "missing or wrong bearer token (send Authorization: Bearer <token>)",
                                [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


def bearer_ok(header: bytes | None, token: str) -> bool:
    """Whether an Authorization header's bytes carry `Bearer <token>`, the token as UTF-8; constant-time compare."""
    scheme, _, given = (header or b"").partition(b" ")
    return hmac.compare_digest(given.strip(), token.encode("utf-8")) and scheme.lower() == b"bearer"


UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class SameOrigin:
    """ASGI middleware: without a token, 403 for a request that changes something and comes from another site.

    A page elsewhere can POST a form (multipart, no CORS preflight) to a server on this machine; browsers
    say where such a request comes from in `Origin`, which must then name this server's own host:port.
    Clients that are not browsers send no `Origin` and pass. With a token this guard is not needed (a page
    elsewhere cannot send the token) and is off, so a proxy that rewrites `Host` keeps working.
    """

    def __init__(self, app: ASGIApp, enabled: bool, public: Callable[[str], bool]) -> None:
        self.app = app
        self.enabled = enabled
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.enabled and scope["type"] == "http" and scope["method"] in UNSAFE_METHODS
                and not self.public(scope["path"])):
            headers = dict(scope.get("headers") or [])
            origin = headers.get(b"origin")
            if origin is not None and not same_origin(origin, headers.get(b"host", b"")):
                await send_json(send, 403, "cross-origin request refused: use the page this server serves, a client "
                                "that sends no Origin header, or start the server with --token")
                return
        await self.app(scope, receive, send)


def same_origin(origin: bytes, host: bytes) -> bool:
    """Whether an `Origin` header (scheme://host[:port]) names the same host[:port] as the `Host` header."""
    try:
        parts = urlsplit(origin.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    netloc = parts.netloc.lower()
    return parts.scheme in ("http", "https") and bool(netloc) and netloc == host.decode("latin-1").lower()


class QuietDisconnect:
    """ASGI middleware: a client that hangs up while its body is read is one INFO line, not an ERROR traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:
            client = scope.get("client") or ("?", 0)
            log.info("%s:%s disconnected while sending %s %s",
                     client[0], client[1], scope.get("method"), scope.get("path"))


async def send_json(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer from a middleware: a JSON body `{"detail": ...}` like FastAPI's own errors."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})

