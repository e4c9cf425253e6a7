"""An in-test stand-in for codelm-daemon: /health, /v1/complete, /v1/documents/close.

It "predicts" like a perfect model that has read `truth` (the file the test is typing): when
the document before the cursor is a prefix of `truth` (or, for a large file, sent in part, a
part of it), it answers with what comes next (the rest of the line, or a few lines),
optionally with the line's closers repeated the way small models do. Every request's
document text is recorded, so tests can check the LSP's sync.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from codelm.daemon.protocol import CompleteRequest, offset_at


@dataclass
class FakeDaemon:
    truth: str = ""
    delay_s: float = 0.0
    health_states: list[str] = field(default_factory=lambda: ["ready"])  # popped per /health
    repeat_closers: bool = False  # answer `x))` where the document already has `)`
    fallback_text: str = "pass"
    requests: list[CompleteRequest] = field(default_factory=list)
    cancelled: int = 0
    completed: int = 0
    closed_uris: list[str] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    def predict(self, request: CompleteRequest) -> str:
        offset = offset_at(request.text, request.line, request.character)
        prefix = request.text[:offset]
        # A large file comes as the text around the cursor (protocol.text_window).
        start = 0 if self.truth.startswith(prefix) else self.truth.find(prefix)
        if start < 0 or start + offset >= len(self.truth):
            return self.fallback_text
        rest = self.truth[start + offset :]
        n_lines = 1 if request.single_line else 3
        text = "\n".join(rest.split("\n")[:n_lines])
        if self.repeat_closers:
            after = request.text[offset:].split("\n", 1)[0]
            text += after.strip()
        return text

    async def _complete(self, request: web.Request) -> web.Response:
        req = CompleteRequest.from_json(await request.json())
        self.requests.append(req)
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:  # the LSP closed the connection (handler_cancellation)
            self.cancelled += 1
            raise
        self.completed += 1
        here = {"line": req.line, "character": req.character}
        body: dict[str, Any] = {
            "items": [{"text": self.predict(req), "range": {"start": here, "end": here}}],
            "timings": {"cached_tokens": 10, "prefilled_tokens": 2, "generated_tokens": 5},
            "stop_reason": "eos",
        }
        return web.json_response(body)

    async def _health(self, request: web.Request) -> web.Response:
        state = self.health_states.pop(0) if len(self.health_states) > 1 else self.health_states[0]
        return web.json_response({"state": state, "model": "fake", "progress": 0.5})

    async def _close(self, request: web.Request) -> web.Response:
        self.closed_uris.append((await request.json())["uri"])
        return web.json_response({"closed": True})

    async def start(self) -> FakeDaemon:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/complete", self._complete)
        app.router.add_post("/v1/documents/close", self._close)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
