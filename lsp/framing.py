"""The editor's messages off stdin: `Content-Length` framed JSON-RPC, read so that one bad
message costs that message and never the session.

pygls' own loop matched only an exact `Content-Length: N\\r\\n` line, so a frame whose
length was wrong (a client counting characters, not bytes) or whose header was written
otherwise left every later header glued to the rest of a body, unmatched: the server lived on
and answered nothing. A length of 10**12 made it allocate that much and die. Here:
- a header is found anywhere in a line, in any case, with \\r\\n or \\n: after a body cut
  short the next header follows its rest on the same line, and reading resumes there;
- a length over MAX_BODY_BYTES is refused and reading resumes at the next header;
- a body that is not JSON, not a JSON-RPC 2.0 object, or a request whose params do not fit
  its method gets the JSON-RPC error answer (to its id, where it has one) instead of silence.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Awaitable
from typing import Any, Protocol

from lsprotocol.types import METHOD_TO_TYPES, ResponseError
from pygls.exceptions import (
    JsonRpcException,
    JsonRpcInvalidRequest,
    JsonRpcMethodNotFound,
    JsonRpcParseError,
)
from pygls.protocol import JsonRPCProtocol

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 << 20  # a 50 MB file's didOpen, escaped, with room to spare
_CONTENT_LENGTH = re.compile(rb"content-length:[ \t]*(\d{1,12})\b", re.IGNORECASE)
_OTHER_HEADER = re.compile(rb"[A-Za-z][A-Za-z0-9-]*:[^\r\n]*\r?\n")  # Content-Type: ...


class Reader(Protocol):
    def readline(self) -> Awaitable[bytes]: ...
    def readexactly(self, n: int) -> Awaitable[bytes]: ...


async def serve(stop: threading.Event, reader: Reader, protocol: JsonRPCProtocol) -> None:
    """Hand each message on `reader` to `protocol` until end of input or `stop`."""
    length: int | None = None
    skipped = 0  # bytes between messages that were not a frame
    while not stop.is_set():
        line = await reader.readline()
        if not line:
            break
        if not line.strip():  # the blank line that ends a message's headers
            if length is None:
                continue
            body = await reader.readexactly(length)
            if len(body) < length:
                break  # the input ended inside a body
            length = None
            handle(protocol, body)
            continue
        header = _CONTENT_LENGTH.search(line)
        if header is None:  # Content-Type, or what is left of a body that was cut short
            skipped += 0 if _OTHER_HEADER.fullmatch(line) else len(line)
            continue
        if skipped or header.start():
            logger.error("skipped %d bytes that were no message", skipped + header.start())
            skipped = 0
        length = int(header.group(1))
        if length > MAX_BODY_BYTES:
            logger.error(
                "a message of %d bytes is over the %d limit: skipped", length, MAX_BODY_BYTES
            )
            length = None


def handle(protocol: JsonRPCProtocol, body: bytes) -> None:
    """One message's body: parsed, checked and given to the protocol, or answered with the
    JSON-RPC error that says what is wrong with it."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deeply
        logger.error("a message that is not JSON (%d bytes): %s", len(body), exc)
        _answer(protocol, None, JsonRpcParseError(f"Parse error: {exc}"))
        return
    if not isinstance(data, dict) or data.get("jsonrpc") != JsonRPCProtocol.VERSION:
        logger.error("a message that is not a JSON-RPC 2.0 object: %.200r", data)
        _answer(protocol, _id(data), JsonRpcInvalidRequest("Invalid request: not JSON-RPC 2.0"))
        return
    if isinstance(data.get("id"), (bool, dict, list)):  # pygls failed on it, with a traceback
        logger.error("a message whose id is not a string or a number: %.200r", data.get("id"))
        _answer(
            protocol,
            None,
            JsonRpcInvalidRequest("Invalid request: id must be a string or a number"),
        )
        return
    try:
        message = protocol.structure_message(data)
    except JsonRpcException as exc:  # params that do not fit the method (logged by pygls)
        method = data.get("method")
        if "method" in data and "id" in data:  # a request: its sender waits for an answer
            if _is_known(protocol, method):
                exc.message = f"{exc.message} for {method}"
                _answer(protocol, _id(data), exc)
            else:  # pygls answered -32603 where it had no params
                _answer(protocol, _id(data), JsonRpcMethodNotFound(f"Method Not Found: {method}"))
        return
    try:
        protocol.handle_message(message)
    except Exception:  # boundary: a handler's bug must not end the session
        logger.exception("could not handle %s", data.get("method", "a response"))


def _is_known(protocol: JsonRPCProtocol, method: Any) -> bool:
    """A method of the LSP spec, or one this server registered."""
    features = getattr(getattr(protocol, "fm", None), "features", {})
    return method in METHOD_TO_TYPES or method in features


def _id(data: Any) -> int | str | None:
    msg_id = data.get("id") if isinstance(data, dict) else None
    return msg_id if isinstance(msg_id, (int, str)) and not isinstance(msg_id, bool) else None


def _answer(protocol: JsonRPCProtocol, msg_id: int | str | None, exc: JsonRpcException) -> None:
    error = ResponseError(code=exc.code, message=exc.message)
    protocol._send_response(msg_id, error=error)  # noqa: SLF001 (pygls' own answer path)
