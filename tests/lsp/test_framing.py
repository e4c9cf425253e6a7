"""framing.serve: the editor's messages off stdin, one bad frame costing that message only.

In process: the server's real protocol, a FakeLink daemon, bytes in, the answers read back."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading

import pytest
from test_completion import FakeLink

from codelm.lsp.framing import MAX_BODY_BYTES, serve
from codelm.lsp.server import build_server


class _Input:
    """An async reader over bytes (what pygls' StdinAsyncReader gives serve)."""

    def __init__(self, data: bytes) -> None:
        self.stream = io.BytesIO(data)

    async def readline(self) -> bytes:
        return self.stream.readline()

    async def readexactly(self, n: int) -> bytes:
        return self.stream.read(n)


def _frame(
    message: dict | bytes, length: int | None = None, header: str = "Content-Length: "
) -> bytes:
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return f"{header}{len(body) if length is None else length}\r\n\r\n".encode() + body


def _stats(msg_id: int) -> dict:
    """A request every server answers at once (a synchronous command)."""
    params = {"command": "codelm.stats", "arguments": []}
    return {"jsonrpc": "2.0", "id": msg_id, "method": "workspace/executeCommand", "params": params}


async def _answers(*parts: bytes, initialize: bool = True) -> dict:
    """Feed `parts` in turn to a fresh server, letting it finish its work in between; its
    answers by id (None: answers to no id)."""
    server = build_server(link=_Link())
    out = io.BytesIO()
    server.protocol.set_writer(_Output(out))
    if initialize:  # as every client does first (its answer is left out)
        parts = (_request(0, "initialize", {"capabilities": {}}), *parts)
    for data in parts:
        await serve(threading.Event(), _Input(data), server.protocol)
        await asyncio.sleep(0.05)
    answers: dict = {}
    for chunk in out.getvalue().split(b"Content-Length: ")[1:]:
        body = json.loads(chunk.split(b"\r\n\r\n", 1)[1])
        if "method" not in body and (body.get("id") != 0 or not initialize):
            answers.setdefault(body.get("id"), []).append(body)  # not the server's own
    return answers


class _Link(FakeLink):
    async def close(self) -> None:
        pass

    def apply_settings(self, settings) -> None:
        pass


class _Output:
    def __init__(self, out: io.BytesIO) -> None:
        self.out = out

    def write(self, data: bytes) -> None:
        self.out.write(data)

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "bad",
    [
        _frame(_stats(1), length=10),  # counted short: the rest runs into the next header
        _frame(_stats(1), length=-5),
        _frame(_stats(1), length=10**12),  # not allocated, not waited for
        _frame(_stats(1), length=10**40),
        b"Content-Type: application/vscode-jsonrpc\r\n\r\n{}",  # no length at all
        b"garbage that is no header\r\n",
    ],
    ids=["short", "negative", "huge", "huger", "no-length", "garbage"],
)
async def test_a_bad_frame_costs_that_message_only(bad):
    answers = await _answers(bad + _frame(_stats(2)))
    assert answers[2][0]["result"]["daemon_state"] == "ready"


@pytest.mark.parametrize(
    "good",
    [
        _frame(_stats(2), header="content-length: "),
        _frame(_stats(2)).replace(b"\r\n", b"\n"),
        _frame(_stats(2), header="Content-Length:"),
    ],
    ids=["lower-case", "lf-only", "no-space"],
)
async def test_headers_are_read_in_the_forms_clients_write(good):
    answers = await _answers(good + _frame(_stats(3)))
    assert 2 in answers and 3 in answers


@pytest.mark.parametrize("where", ["after", "before"])
async def test_a_content_type_header_is_no_error(where, caplog):
    """pygls' and other clients' Content-Type line (LSP's optional header) is part of the
    frame, not bytes that were skipped."""
    content_type = b"Content-Type: application/vscode-jsonrpc; charset=utf-8\r\n"

    def framed(message: dict) -> bytes:
        frame = _frame(message)
        return (
            content_type + frame
            if where == "before"
            else frame.replace(b"\r\n\r\n", b"\r\n" + content_type + b"\r\n", 1)
        )

    caplog.set_level(logging.ERROR, logger="codelm.lsp.framing")
    answers = await _answers(framed(_stats(2)) + framed(_stats(3)))
    assert 2 in answers and 3 in answers
    assert not [r.getMessage() for r in caplog.records if r.name == "codelm.lsp.framing"]


async def test_a_body_over_the_limit_is_skipped():
    answers = await _answers(_frame(_stats(1), length=MAX_BODY_BYTES + 1) + _frame(_stats(2)))
    assert 1 not in answers and 2 in answers


@pytest.mark.parametrize(
    ("body", "msg_id", "code"),
    [
        (b'{"jsonrpc": "2.0", "id": 5, "method"', None, -32700),  # not JSON
        (b"[1, 2]", None, -32600),
        (b'{"jsonrpc": "1.0", "id": 5, "method": "shutdown"}', 5, -32600),
        (b'{"id": 5, "method": "shutdown"}', 5, -32600),
        # pygls answered these -32603, the id ones with a Python traceback
        (b'{"jsonrpc": "2.0", "id": {"a": 1}, "method": "shutdown"}', None, -32600),
        (b'{"jsonrpc": "2.0", "id": [1], "method": "shutdown"}', None, -32600),
        (b'{"jsonrpc": "2.0", "id": 5, "method": "codelm/unknown"}', 5, -32601),
        (b'{"jsonrpc": "2.0", "id": 5, "method": "$/unknownRequest"}', 5, -32601),
    ],
)
async def test_a_message_that_is_not_json_rpc_gets_an_error_answer(body, msg_id, code):
    answers = await _answers(_frame(body) + _frame(_stats(2)))
    assert answers[msg_id][0]["error"]["code"] == code
    assert 2 in answers


@pytest.mark.parametrize(
    "params",
    [
        {"textDocument": {"uri": "file:///a.py"}, "position": {"line": -1, "character": 0}},
        {"textDocument": {"uri": "file:///a.py"}, "position": {"line": "1", "character": 0}},
        None,
        [1, 2],
    ],
)
async def test_a_request_with_params_that_do_not_fit_gets_invalid_params(params):
    request = {"jsonrpc": "2.0", "id": 7, "method": "textDocument/inlineCompletion"}
    answers = await _answers(_frame({**request, "params": params}) + _frame(_stats(2)))
    error = answers[7][0]["error"]
    assert error["code"] == -32602 and "textDocument/inlineCompletion" in error["message"]
    assert 2 in answers


async def test_requests_after_shutdown_are_refused():
    shutdown = {"jsonrpc": "2.0", "id": 1, "method": "shutdown"}
    # The client waits for shutdown's answer before it sends more.
    answers = await _answers(_frame(shutdown), _frame(_stats(2)))
    assert answers[1][0]["result"] is None
    error = answers[2][0]["error"]
    assert error["code"] == -32600 and "shutting down" in error["message"]


def _request(msg_id: int, method: str, params: object) -> bytes:
    return _frame({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})


async def test_accepted_characters_count_only_plausible_numbers():
    accept = "codelm.accept"
    parts = [
        _request(
            i, "workspace/executeCommand", {"command": accept, "arguments": [{"acceptedChars": n}]}
        )
        for i, n in ((1, 7), (2, -(10**30)), (3, True), (4, "9"))
    ]
    answers = await _answers(b"".join(parts) + _frame(_stats(5)))
    stats = answers[5][0]["result"]
    assert (stats["accepted"], stats["accepted_chars"]) == (4, 7)


async def test_requests_before_initialize_are_refused_and_notifications_dropped():
    uri = "file:///a.py"
    opened = {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": "x = "}}
    did_open = {"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": opened}
    inline = {
        "textDocument": {"uri": uri},
        "position": {"line": 0, "character": 4},
        "context": {"triggerKind": 1},
    }
    answers = await _answers(
        _frame(did_open) + _request(1, "textDocument/inlineCompletion", inline),
        _request(2, "initialize", {"capabilities": {}}),
        _request(3, "textDocument/inlineCompletion", inline),
        initialize=False,
    )
    error = answers[1][0]["error"]
    assert error["code"] == -32002 and "initialize" in error["message"]
    assert "result" in answers[2][0]
    # The didOpen before initialize was dropped: the document is unknown, nothing is asked.
    assert answers[3][0]["result"] in (None, [], {"items": []})


async def test_a_second_initialize_is_refused():
    # pygls had answered it, resetting the settings (and, with the completion fallback,
    # failed to register the fallback twice).
    options = {"capabilities": {}, "initializationOptions": {"completionFallback": True}}
    answers = await _answers(
        _request(1, "initialize", options),
        _request(2, "initialize", options),
        _frame(_stats(3)),
        initialize=False,
    )
    assert "result" in answers[1][0]
    error = answers[2][0]["error"]
    assert error["code"] == -32600 and "once" in error["message"]
    assert "result" in answers[3][0]
