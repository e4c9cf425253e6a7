"""The language server in process: what it keeps per notification."""

from __future__ import annotations

import asyncio
import json

from test_completion import FakeLink

from codelm.lsp.framing import handle
from codelm.lsp.server import build_server

URI = "file:///work/demo.py"


class _Discard:
    def write(self, data: bytes) -> None:
        pass


async def test_document_notifications_leave_nothing_behind():
    # pygls kept a future per didOpen/didChange/didClose for good: 2 KB a keystroke.
    server = build_server(link=FakeLink())
    protocol = server.protocol
    protocol.set_writer(_Discard())

    def send(method: str, params: dict, msg_id: int | None = None) -> None:
        message = {"jsonrpc": "2.0", "method": method, "params": params}
        if msg_id is not None:
            message["id"] = msg_id
        handle(protocol, json.dumps(message).encode())

    send("initialize", {"processId": None, "rootUri": None, "capabilities": {}}, msg_id=1)
    send("initialized", {})
    send(
        "textDocument/didOpen",
        {"textDocument": {"uri": URI, "languageId": "python", "version": 1, "text": "x = 1\n"}},
    )
    for version in range(2, 202):
        change = {
            "range": {"start": {"line": 0, "character": 4}, "end": {"line": 0, "character": 5}},
            "text": str(version % 10),
        }
        send(
            "textDocument/didChange",
            {"textDocument": {"uri": URI, "version": version}, "contentChanges": [change]},
        )
    send("textDocument/didClose", {"textDocument": {"uri": URI}})
    await asyncio.sleep(0.1)
    assert len(protocol._request_futures) == 0
