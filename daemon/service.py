"""The daemon's HTTP API on aiohttp: routes, the error middleware and the loopback/token checks.

`create_app(config, scheduler, token=...)` builds the application; server.py binds and runs it.
Streaming answers are Server-Sent Events (see docs/daemon.md for the event names).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestPayloadError

from .catalog import DEFAULT_MODEL
from .config import DaemonConfig
from .errors import (
    BadRequest,
    CodelmError,
    Forbidden,
    ModelLoading,
    PayloadTooLarge,
    Unauthorized,
)
from .protocol import (
    LOOPBACK_NAMES,
    CompleteRequest,
    CompleteResponse,
    OpenAICompletionRequest,
    offset_at,
)
from .runtime import code_stamp, resident_mb
from .scheduler import Scheduler

logger = logging.getLogger(__name__)

CONFIG = web.AppKey("config", DaemonConfig)
SCHEDULER = web.AppKey("scheduler", Scheduler)
TOKEN = web.AppKey("token", str)
INFO = web.AppKey("info", dict)  # pid, url, token_file, log_file, started (monotonic)
SHUTDOWN = web.AppKey("shutdown", asyncio.Event)  # set by POST /shutdown and signals
REQUEST_IDS = web.AppKey("request_ids", itertools.count)

PUBLIC_PATHS = frozenset({"/health"})
RETRY_AFTER_S = "1"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
MAX_JSON_DEPTH = 100  # a request body nests 3 deep (its context snippets)


def create_app(config: DaemonConfig, scheduler: Scheduler, *, token: str) -> web.Application:
    """The application; its cleanup context starts and stops the scheduler (and model load)."""
    app = web.Application(
        middlewares=[error_middleware, security_middleware],
        client_max_size=config.max_body_bytes,
    )
    app[CONFIG] = config
    app[SCHEDULER] = scheduler
    app[TOKEN] = token
    app[INFO] = {"pid": os.getpid(), "started": time.monotonic(), "url": None}
    app[INFO]["code"] = code_stamp()  # the code this process runs (runtime.code_stamp)
    app[SHUTDOWN] = asyncio.Event()
    app[REQUEST_IDS] = itertools.count(1)
    app.cleanup_ctx.append(_scheduler_ctx)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/v1/status", handle_status)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_post("/v1/complete", handle_complete)
    app.router.add_post("/v1/completions", handle_openai_completions)
    app.router.add_post("/v1/prompt", handle_prompt)
    app.router.add_post("/v1/documents/close", handle_close_document)
    app.router.add_post("/v1/load", handle_load)
    app.router.add_post("/shutdown", handle_shutdown)
    return app


async def _scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SCHEDULER].start()
    yield
    await app[SCHEDULER].stop()


class _MalformedRequests(logging.Filter):
    """aiohttp logs an ERROR with a traceback for each malformed request (a Content-Length
    that is no number, a body that does not decode as its Content-Encoding says): the
    client's fault, already answered 400. One INFO line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (BadHttpMessage, RequestPayloadError)):
            record.msg, record.args = "%s: %s", (record.getMessage(), str(exc).replace("\n", " "))
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("aiohttp.server").addFilter(_MalformedRequests())


# -- middlewares --


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """CodelmError → its status and JSON body; anything unexpected → logged traceback + 500."""
    try:
        return await handler(request)
    except CodelmError as exc:
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        logger.log(
            level,
            "%s %s -> %d %s: %s",
            request.method,
            request.path,
            exc.status,
            exc.code,
            exc.message,
        )
        response = error_response(exc)
        if isinstance(exc.__cause__, RequestPayloadError):
            response.force_close()  # the rest of such a body cannot be read: a new connection
        return response
    except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, body too large
        if exc.status == 413:
            return error_response(PayloadTooLarge(_too_large(request.app)))
        code = exc.reason.lower().replace(" ", "_")
        body = {
            "error": {"code": code, "message": f"{request.method} {request.path}: {exc.reason}"}
        }
        return web.json_response(body, status=exc.status, headers=_allow_header(exc))
    except Exception:  # boundary: the daemon must answer and live on
        logger.exception("unexpected error in %s %s", request.method, request.path)
        body = {
            "error": {"code": "internal_error", "message": "internal error; see the daemon log"}
        }
        return web.json_response(body, status=500)


def error_response(exc: CodelmError) -> web.Response:
    headers = {}
    if isinstance(exc, ModelLoading):
        headers["Retry-After"] = RETRY_AFTER_S
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return web.json_response(exc.to_json(), status=exc.status, headers=headers)


def _allow_header(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


@web.middleware
async def security_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Loopback Host only, no browser Origin, bearer token (except /health), body size."""
    check_host(request.headers.get("Host"))
    if "Origin" in request.headers:
        raise Forbidden("requests from web pages are refused (an Origin header was sent)")
    if request.path not in PUBLIC_PATHS:
        check_token(request.headers.get("Authorization"), request.app[TOKEN])
    length = request.content_length
    if length is not None and length > request.app[CONFIG].max_body_bytes:
        raise PayloadTooLarge(_too_large(request.app))
    return await handler(request)


def check_host(host: str | None) -> None:
    """Refuse a Host that is not loopback (DNS rebinding protection)."""
    if not host:
        raise Forbidden("a Host header is required")
    name = host.strip().lower()
    if name.startswith("["):
        name, _, port = name.partition("]")
        name += "]"
        port = port.removeprefix(":")
    elif name.count(":") == 1:
        name, port = name.split(":")
    else:
        port = ""
    if name not in LOOPBACK_NAMES or (port and not port.isdigit()):
        raise Forbidden(f"Host {host!r} is not a loopback address; connect to 127.0.0.1")


def check_token(authorization: str | None, token: str) -> None:
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("a bearer token is required; it is in the daemon's token file")
    # aiohttp keeps header bytes that are not UTF-8 as surrogate escapes: compare them as sent.
    if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode()):
        raise Unauthorized("wrong token; read it again from the daemon's token file")


def _too_large(app: web.Application) -> str:
    limit = app[CONFIG].max_body_bytes
    return f"the request body is larger than max_body_bytes ({limit} bytes)"


# -- request bodies --


async def read_json(request: web.Request) -> Any:
    """The body as JSON; BadRequest for a body that cannot be decompressed, invalid UTF-8,
    malformed JSON, numbers too long to convert or lone surrogates."""
    try:
        raw = await request.read()  # (413 for a body over max_body_bytes: error_middleware)
    except RequestPayloadError as exc:  # e.g. a Content-Encoding the body does not follow
        raise BadRequest("", f"the body could not be read: {exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("", f"the body is not valid UTF-8 (byte {exc.start})") from exc
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise BadRequest("", f"malformed JSON: {exc.msg} ({where})") from exc
    except RecursionError as exc:
        raise BadRequest("", "the JSON body is nested too deeply") from exc
    except ValueError as exc:  # an integer of more digits than int() converts
        raise BadRequest("", f"malformed JSON: {exc}") from exc
    _check_strings(body)
    return body


def _reject_constant(name: str) -> Any:
    raise BadRequest("", f"malformed JSON: {name} is not a JSON number")


def _check_strings(value: Any, depth: int = 0) -> None:
    """Strings must be encodable as UTF-8: JSON allows lone surrogate escapes such as \\ud800.
    Nesting deeper than MAX_JSON_DEPTH is refused: from Python 3.12 json.loads parses
    deeper than this recursion may go."""
    if depth > MAX_JSON_DEPTH:
        raise BadRequest("", "the JSON body is nested too deeply")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequest("", "a string holds a lone UTF-16 surrogate") from exc
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, depth + 1)
            _check_strings(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item, depth + 1)


# -- handlers --


async def handle_health(request: web.Request) -> web.Response:
    return _health_response(request, request.app[SCHEDULER].health())


async def handle_load(request: web.Request) -> web.Response:
    """A client waits for the model: load it if idle unload dropped it, or if it failed to
    load and its file has changed since. Answers the health."""
    return _health_response(request, request.app[SCHEDULER].wake())


def _health_response(request: web.Request, body: dict[str, Any]) -> web.Response:
    body["pid"] = request.app[INFO]["pid"]
    body["code"] = request.app[INFO]["code"]
    return web.json_response(body)


async def handle_status(request: web.Request) -> web.Response:
    app = request.app
    scheduler, info, config = app[SCHEDULER], app[INFO], app[CONFIG]
    status = scheduler.status()
    engine = status.get("engine", {})
    status.update(
        pid=info["pid"],
        url=info["url"],
        token_file=str(config.paths.token_file),
        log_file=str(config.paths.log_file),
        uptime_s=round(time.monotonic() - info["started"], 3),
        code=info["code"],
        device=engine.get("device", config.engine.device),
        quant=engine.get("quant", config.engine.quant),
        config=config.to_json(),
    )
    if (resident := resident_mb()) is not None:
        status["resident_MB"] = round(resident, 1)
    return web.json_response(status)


async def handle_models(request: web.Request) -> web.Response:
    """The model by its catalogue name ("default" says nothing of what it is: a client such
    as another codelm picks its FIM layout by this name), its path, or its server's URL."""
    model = request.app[CONFIG].engine.model
    entry = {"id": DEFAULT_MODEL if model == "default" else model, "object": "model"}
    entry["owned_by"] = "codelm"
    return web.json_response({"object": "list", "data": [entry]})


async def read_complete_request(request: web.Request) -> CompleteRequest:
    """The body of /v1/complete (and /v1/prompt); a position outside the text is a 400."""
    complete = CompleteRequest.from_json(await read_json(request))
    offset_at(complete.text, complete.line, complete.character)
    return complete


async def handle_complete(request: web.Request) -> web.StreamResponse:
    complete = await read_complete_request(request)
    rid = next(request.app[REQUEST_IDS])
    scheduler = request.app[SCHEDULER]
    if complete.stream:
        events = _native_events(scheduler.stream(complete), rid, complete)
        return await stream_sse(request, events)
    response = await scheduler.complete(complete)
    _log_completion(rid, complete, response)
    return web.json_response(response.to_json(), headers={"X-Request-Id": str(rid)})


async def handle_prompt(request: web.Request) -> web.Response:
    """The prompt a /v1/complete with this body would run (`codelm-daemon prompt`)."""
    complete = await read_complete_request(request)
    response = await request.app[SCHEDULER].prompt(complete)
    return web.json_response(response.to_json())


async def handle_openai_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    completion = OpenAICompletionRequest.from_json(body)
    rid = next(request.app[REQUEST_IDS])
    scheduler = request.app[SCHEDULER]
    model = completion.model or request.app[CONFIG].engine.model
    if completion.stream:
        events = _openai_events(scheduler.stream(completion), rid, model)
        return await stream_sse(request, events)
    response = await scheduler.complete(completion)
    _log_completion(rid, completion, response)
    return web.json_response(openai_body(response, rid, model))


async def handle_close_document(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("", "the request body must be a JSON object")
    uri = body.get("uri")
    if not isinstance(uri, str) or not uri:
        raise BadRequest("uri", "must be a non-empty string")
    closed = await request.app[SCHEDULER].close_document(uri)
    return web.json_response({"closed": closed})


async def handle_shutdown(request: web.Request) -> web.Response:
    logger.info("shutdown requested over HTTP")
    request.app[SHUTDOWN].set()
    return web.json_response({"ok": True})


# -- streaming --


async def stream_sse(
    request: web.Request, events: AsyncIterator[tuple[str | None, Any]]
) -> web.StreamResponse:
    """Send (event, data) pairs as SSE. Errors before the first event are plain JSON errors."""
    async with contextlib.aclosing(events):
        first = await anext(events)  # queueing, loading and supersede errors keep their status
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        event: tuple[str | None, Any] | None = first
        while event is not None:
            await response.write(_sse_frame(*event))
            try:
                event = await anext(events)
            except StopAsyncIteration:
                event = None
            except CodelmError as exc:
                await response.write(_sse_frame("error", exc.to_json()))
                break
            except Exception:  # headers are sent: the error goes in the stream
                logger.exception("unexpected error while streaming %s", request.path)
                error = CodelmError("internal error; see the daemon log")
                await response.write(_sse_frame("error", error.to_json()))
                break
        await response.write_eof()
    return response


def _sse_frame(event: str | None, data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


async def _native_events(
    stream: AsyncIterator[str | CompleteResponse], rid: int, request: CompleteRequest
) -> AsyncIterator[tuple[str | None, Any]]:
    async with contextlib.aclosing(stream):
        async for item in stream:
            if isinstance(item, str):
                yield "text", {"text": item}
            else:
                _log_completion(rid, request, item)
                yield "done", item.to_json()


async def _openai_events(
    stream: AsyncIterator[str | CompleteResponse], rid: int, model: str
) -> AsyncIterator[tuple[str | None, Any]]:
    async with contextlib.aclosing(stream):
        async for item in stream:
            if isinstance(item, str):
                yield None, _openai_chunk(rid, model, item, None)
            else:
                _log_completion(rid, None, item)
                yield None, _openai_chunk(rid, model, "", _finish_reason(item))
    yield None, "[DONE]"


def openai_body(response: CompleteResponse, rid: int, model: str) -> dict[str, Any]:
    timings = response.timings
    prompt_tokens = timings.cached_tokens + timings.prefilled_tokens
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "text": response.items[0].text if response.items else "",
                "index": 0,
                "logprobs": None,
                "finish_reason": _finish_reason(response),
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": timings.generated_tokens,
            "total_tokens": prompt_tokens + timings.generated_tokens,
        },
        "timings": timings.to_json(),
    }


def _openai_chunk(rid: int, model: str, text: str, finish: str | None) -> dict[str, Any]:
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def _finish_reason(response: CompleteResponse) -> str:
    return "length" if response.stop_reason == "max_tokens" else "stop"


def _log_completion(
    rid: int, request: CompleteRequest | OpenAICompletionRequest | None, response: CompleteResponse
) -> None:
    t = response.timings
    uri = request.uri if isinstance(request, CompleteRequest) else "openai"
    trigger = request.trigger if isinstance(request, CompleteRequest) else "-"
    logger.info(
        "complete #%d uri=%s trigger=%s cached=%d prefilled=%d generated=%d "
        "prefill_ms=%.1f decode_ms=%.1f queue_ms=%.1f stop=%s",
        rid,
        hashlib.sha1(uri.encode()).hexdigest()[:8],
        trigger,
        t.cached_tokens,
        t.prefilled_tokens,
        t.generated_tokens,
        t.prefill_ms,
        t.decode_ms,
        t.queue_ms,
        response.stop_reason,
    )
