"""The page's upload janitor wired into Gradio's routes (ASGI plumbing for :mod:`app.web`).

Gradio stores an upload under its upload folder and answers its absolute path; clients send that
path back in every request that uses the file. Three routes are put ahead of Gradio's:

* ``POST /gradio_api/upload``: the upload must state its size and fit in the space left
  (:meth:`UploadJanitor.reserve`, else 411 / 507 with a one-line reason, before a byte is
  stored); every stored file is registered for deletion (:meth:`UploadJanitor.add`), and the
  answer names it relative to the upload folder (:meth:`UploadJanitor.name`), not by the
  server's absolute temporary path.
* ``POST /gradio_api/...`` (queue, call, run, api, ...): a JSON body's ``"path"`` values that
  name a live upload that way are turned back into the stored file's path before Gradio reads
  them (:meth:`UploadJanitor.resolve`; nothing else is reachable by a relative name).
* ``GET/HEAD /gradio_api/file=<name>``: the same, so the page can still preview the upload.

Everything else passes through to Gradio untouched.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote

from app.uploads import UploadJanitor, UploadSpaceFull

API = "/gradio_api/"
UPLOAD_ROUTE = API + "upload"
FILE_ROUTE = API + "file="


async def _answer(send: Any, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = (),
                  content_type: bytes = b"text/plain; charset=utf-8") -> None:
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"content-type")]
    await send({"type": "http.response.start", "status": status,
                "headers": [*kept, (b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


#: JSON bodies up to this size are read to resolve upload names; larger ones (no request of the
#: page's comes near it) pass through to Gradio unread.
JSON_LIMIT = 4 << 20


async def _read_body(receive: Any, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """The request's messages, read until its end or until more than ``limit`` bytes came;
    also says whether the whole body was read."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, False
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            return messages, True
        if size > limit:
            return messages, False


def _replay(messages: list[dict[str, Any]], receive: Any) -> Any:
    """A ``receive`` that gives ``messages`` again, then the rest of the request."""
    pending = list(messages)

    async def replayed() -> dict[str, Any]:
        return pending.pop(0) if pending else await receive()

    return replayed


def _with_length(scope: dict[str, Any], length: int) -> dict[str, Any]:
    headers = [(k, v) for k, v in scope.get("headers") or [] if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


def _resolve_paths(value: Any, janitor: UploadJanitor) -> tuple[Any, bool]:
    """``value`` with every ``{"path": <an upload's name>}`` turned into the stored path."""
    if isinstance(value, list):
        pairs = [_resolve_paths(item, janitor) for item in value]
        return [item for item, _ in pairs], any(changed for _, changed in pairs)
    if not isinstance(value, dict):
        return value, False
    changed = False
    out = {}
    for key, item in value.items():
        stored = janitor.resolve(item) if key == "path" and isinstance(item, str) else None
        if stored is not None:
            out[key], changed = stored, True
        else:
            out[key], inner = _resolve_paths(item, janitor)
            changed = changed or inner
    return out, changed


def install(app: Any, janitor: UploadJanitor) -> None:
    """Put the three routes ahead of Gradio's in ``app`` (a launched Gradio app)."""
    from starlette.routing import Match, Route

    ours: list[Any] = []

    async def gradio(scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Dispatch to the app's routes after ours, as the router would have."""
        partial = None
        for route in app.router.routes:
            if any(route is mine for mine in ours):
                continue
            match, child = route.matches(scope)
            if match == Match.FULL:
                await route.handle({**scope, **child}, receive, send)
                return
            if match == Match.PARTIAL and partial is None:
                partial = (route, child)
        if partial is not None:
            await partial[0].handle({**scope, **partial[1]}, receive, send)
            return
        await _answer(send, 404, b"Not Found")

    async def upload(scope: dict[str, Any], receive: Any, send: Any) -> None:
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if not length.isdigit():
            await _answer(send, 411, b"an upload must state its size (Content-Length)")
            return
        size = int(length)
        try:
            janitor.reserve(size)
        except UploadSpaceFull as exc:
            await _answer(send, 507, f"Upload refused: {exc}".encode())
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def register_then_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if start.get("status") != 200:
                await _answer(send, start.get("status", 500), body, start.get("headers") or [])
                return
            stored = [str(path) for path in json.loads(body)]
            for path in stored:
                janitor.add(path, size // max(1, len(stored)))
            await _answer(send, 200, json.dumps([janitor.name(path) for path in stored]).encode(),
                          start.get("headers") or [], b"application/json")

        try:
            await gradio(scope, receive, register_then_send)
        finally:
            janitor.unreserve(size)

    async def api_post(scope: dict[str, Any], receive: Any, send: Any) -> None:
        messages, whole = await _read_body(receive, JSON_LIMIT)
        if whole:
            body = b"".join(message.get("body", b"") for message in messages)
            try:
                data, changed = _resolve_paths(json.loads(body), janitor) if body else (None, False)
            except (ValueError, UnicodeDecodeError):
                changed = False   # not JSON: Gradio answers it as it would
            if changed:
                body = json.dumps(data).encode()
                scope = _with_length(scope, len(body))
                messages = [{"type": "http.request", "body": body, "more_body": False}]
        await gradio(scope, _replay(messages, receive), send)

    async def file(scope: dict[str, Any], receive: Any, send: Any) -> None:
        stored = janitor.resolve(unquote(scope["path"][len(FILE_ROUTE):]))
        if stored is not None:
            path = FILE_ROUTE + stored
            scope = {**scope, "path": path, "raw_path": quote(path).encode()}
        await gradio(scope, receive, send)

    for path, methods, handler in ((UPLOAD_ROUTE, ["POST"], upload), (API + "{rest:path}", ["POST"], api_post),
                                   (FILE_ROUTE + "{name:path}", ["GET", "HEAD"], file)):
        route = Route(path, lambda request: None, methods=methods)
        route.app = handler
        ours.append(route)
    app.router.routes[0:0] = ours
