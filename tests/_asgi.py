"""Call an ASGI app in-process (no server, no httpx): one request, the status, headers and JSON body.

    status, body, headers = call(app, "POST", "/v1/predict", raw=b"{}", token=secret, address="203.0.113.9")

An exception the app does not turn into a response propagates, so a test sees it instead of a 500.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any


def call(app: Any, method: str, path: str, *, body: Any = None, raw: bytes | None = None, token: str | None = None,
         address: str = "127.0.0.1", headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    sent = {"content-type": "application/json", "content-length": str(len(data)), **(headers or {})}
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in sent.items()],
             "client": (address, 40000), "server": ("127.0.0.1", 8765)}
    inbox = [{"type": "http.request", "body": data, "more_body": False}]
    status: list[int] = []
    out_headers: dict[str, str] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
            out_headers.update({k.decode().lower(): v.decode() for k, v in message.get("headers", [])})
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    asyncio.run(app(scope, receive, send))
    payload = b"".join(chunks)
    try:
        parsed = json.loads(payload) if payload else None
    except ValueError:
        parsed = payload.decode(errors="replace")
    return status[0], parsed, out_headers
