"""The HTTP API in process on the fake engine: security, bad input, streaming, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import random
from typing import Any

import pytest
from fake_daemon import TOKEN, start_fake_daemon

from codelm.daemon.errors import BadRequest
from codelm.daemon.protocol import CompleteRequest, OpenAICompletionRequest, offset_at
from codelm.daemon.runtime import code_stamp
from codelm.daemon.service import read_json

DOC = {"uri": "file:///a.py", "text": "def add(a, b):\n    return ", "line": 1, "character": 11}


async def _good_request_succeeds(daemon) -> None:
    resp = await daemon.post("/v1/complete", {**DOC, "max_tokens": 2})
    assert resp.status == 200, await resp.text()
    assert len((await resp.json())["items"]) == 1


async def _sse(resp) -> list[tuple[str | None, object]]:
    events, event = [], None
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
            events.append((event, data if data == "[DONE]" else json.loads(data)))
            event = None
    return events


async def test_health_answers_without_token(fake_daemon):
    resp = await fake_daemon.client.get("/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["state"] == "ready" and body["model"] == "fake.gguf"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": "Basic x"},
        {"Authorization": "Bearer \xe9\xe9"},  # sent as latin-1 bytes: not UTF-8
    ],
)
async def test_api_refuses_missing_or_wrong_token_with_401(fake_daemon, headers):
    resp = await fake_daemon.client.post("/v1/complete", json=DOC, headers=headers)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert (await resp.json())["error"]["code"] == "unauthorized"
    resp = await fake_daemon.client.get("/v1/status", headers=headers)
    assert resp.status == 401


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:80", "127.0.0.1.nip.io", "localhost.evil", "[::2]:1"]
)
async def test_api_refuses_non_loopback_host_with_403(fake_daemon, host):
    for path in ("/health", "/v1/status"):
        resp = await fake_daemon.client.get(path, headers={**fake_daemon.auth, "Host": host})
        assert resp.status == 403, path
        assert (await resp.json())["error"]["code"] == "forbidden"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:8080", "[::1]:1234", "LOCALHOST"])
async def test_api_accepts_loopback_host_forms(fake_daemon, host):
    resp = await fake_daemon.client.get("/v1/status", headers={**fake_daemon.auth, "Host": host})
    assert resp.status == 200


async def test_api_refuses_any_origin_with_403(fake_daemon):
    for origin in ("http://evil.example", "http://127.0.0.1:3000", "null"):
        resp = await fake_daemon.post("/v1/complete", DOC, headers={"Origin": origin})
        assert resp.status == 403
    resp = await fake_daemon.client.get("/health", headers={"Origin": "http://localhost"})
    assert resp.status == 403
    await _good_request_succeeds(fake_daemon)


BAD_BODIES = [
    (b'{"uri": "file:///a.py", "text": ', "malformed JSON"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b'{"uri": "u", "text": "caf\xe9", "line": 0, "character": 0}', "not valid UTF-8"),
    (b"[1, 2]", "JSON object"),
    (b'{"uri": "u", "text": "\\ud800", "line": 0, "character": 0}', "surrogate"),
    (b'{"uri": "u", "text": "x", "line": NaN, "character": 0}', "NaN"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    # From Python 3.12 json.loads reads 1000 levels: checking them raised RecursionError (500).
    (b'{"x": ' + b"[" * 1000 + b"]" * 1000 + b"}", "nested too deeply"),
    (b'{"x": ' + b"[" * 200 + b"]" * 200 + b"}", "nested too deeply"),
    (b'{"uri": "u", "text": "x", "line": ' + b"9" * 5000 + b', "character": 0}', "digits"),
]


@pytest.mark.parametrize(("body", "reason"), BAD_BODIES)
async def test_complete_answers_400_to_undecodable_body_and_lives_on(fake_daemon, body, reason):
    resp = await fake_daemon.client.post("/v1/complete", data=body, headers=fake_daemon.auth)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "bad_request" and reason in error["message"]
    await _good_request_succeeds(fake_daemon)


async def test_complete_answers_400_to_a_body_that_does_not_decompress(fake_daemon, caplog):
    headers = {**fake_daemon.auth, "Content-Encoding": "gzip"}
    gzip_head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"  # then no deflate data
    for body in (b"not gzip", gzip_head + b"garbage" * 20):
        resp = await fake_daemon.client.post("/v1/complete", data=body, headers=headers)
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["code"] == "bad_request" and "could not be read" in error["message"]
    await _good_request_succeeds(fake_daemon)
    # aiohttp then logged an "Unhandled exception" traceback per request at ERROR.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


BAD_FIELDS = [
    ({"line": "1"}, "line: must be an integer"),
    ({"line": True}, "line: must be an integer, got a boolean"),
    ({"line": -1}, "line: must be >= 0"),
    ({"character": -5}, "character: must be >= 0"),
    ({"line": 7}, "past the end of the document"),
    ({"character": 99}, "past the end of line 1"),
    ({"line": 1.5}, "line: must be an integer"),
    ({"uri": 3}, "uri: must be a string"),
    ({"uri": ""}, "uri: must not be empty"),
    ({"text": None}, "text: is required"),
    ({"trigger": "sometimes"}, "trigger: must be one of"),
    ({"max_tokens": -1}, "max_tokens: must be between 0"),
    ({"max_tokens": 10**9}, "max_tokens: must be between"),
    ({"stream": "yes"}, "stream: must be a boolean"),
    ({"max_time_ms": 0}, "max_time_ms: must be between 1"),
    ({"max_time_ms": "fast"}, "max_time_ms: must be an integer"),
    ({"stop": [1]}, "stop: must be"),
    ({"uri": "file:///" + "a" * 20_000}, "uri: longer than"),
    ({"path": "/" + "a" * 5_000}, "path: longer than"),
    ({"context": {"path": "a.py"}}, "context: must be a list"),
    ({"context": ["def f(): pass"]}, "context[0]: must be an object"),
    ({"context": [{"path": "a.py"}]}, "text: is required"),
    ({"context": [{"path": "a.py", "text": "x"}] * 17}, "context: at most 16 snippets"),
    ({"context": [{"path": "a.py", "text": "x" * 40_000}] * 2}, "characters in all"),
]


@pytest.mark.parametrize(("change", "reason"), BAD_FIELDS)
async def test_complete_answers_400_to_wrong_fields_and_lives_on(fake_daemon, change, reason):
    resp = await fake_daemon.post("/v1/complete", {**DOC, **change})
    assert resp.status == 400
    assert reason in (await resp.json())["error"]["message"]
    await _good_request_succeeds(fake_daemon)


async def test_openai_answers_400_to_wrong_fields(fake_daemon):
    wrong = ({"prompt": 3}, {"prompt": "x", "temperature": 0.7}, {"prompt": "x", "stop": 5})
    # One greedy completion, without the prompt or log probabilities: asked for more, the
    # answer was a 200 without them.
    more = ({"n": 3}, {"best_of": 2}, {"echo": True}, {"logprobs": 5}, {"logprobs": 0})
    for body in [{"suffix": "", **b} for b in wrong] + [{"prompt": "x", **b} for b in more]:
        resp = await fake_daemon.post("/v1/completions", body)
        assert resp.status == 400, body
    plain = {"prompt": "x", "n": 1, "best_of": 1, "echo": False, "logprobs": None}
    assert (await fake_daemon.post("/v1/completions", plain)).status == 200


_FIELDS = {
    CompleteRequest: [*DOC, "path", "language", "trigger", "max_tokens", "stream", "single_line"]
    + ["stop", "context", "max_time_ms"],
    OpenAICompletionRequest: ["prompt", "suffix", "max_tokens", "stop", "stream", "model"]
    + ["temperature", "n", "best_of", "echo", "logprobs"],
}
_JUNK_NAMES = ["", "Uri", "LINE", "context[0]", "__class__", "é", "\ud800", " uri"]
_SCALARS = [None, True, False, "", "x", "invoked", "é🙂\r\n", "\ud800", "\x00", "a" * 20_000]
_NUMBERS = [0, 1, -1, 64, 1024, 1025, 600_001, 10**18, 10**4000, -(10**400), -0.0, 1.5, 1e308]
_NUMBERS += [float("inf"), float("-inf"), 5e-324]  # 1e309 reads as inf; NaN is refused


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value: scalars, huge and odd numbers, nested lists and objects whose keys are
    often the requests' own field names, now and then one nested too deep to check."""
    if rng.random() < 0.005:
        deep: list[Any] = []
        for _ in range(150):  # past MAX_JSON_DEPTH (1000 levels: in BAD_BODIES)
            deep = [deep]
        return deep
    kind = rng.random()
    if depth > 3 or kind < 0.5:
        return rng.choice([*_SCALARS, *_NUMBERS, rng.randint(-5, 5), "x" * rng.randint(0, 40)])
    if kind < 0.75:
        return [_random_json(rng, depth + 1) for _ in range(rng.choice([0, 1, 2, 4, 17]))]
    names = [*_FIELDS[CompleteRequest], *_FIELDS[OpenAICompletionRequest], *_JUNK_NAMES]
    return {rng.choice(names): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _valid_body(rng: random.Random, parser: type) -> dict[str, Any]:
    """A body `parser` accepts, with a random choice of its optional fields."""
    if parser is CompleteRequest:
        text = rng.choice([DOC["text"], "x = 1\r\ny = ", "", "é🙂\n\ttab\r", "a\n" * 3000])
        body = {**DOC, "text": text, "line": rng.randint(0, 3), "character": rng.randint(0, 12)}
        snippet = {"path": "b.py", "text": "def g(): pass"}
        optional = {"path": "a.py", "language": "python", "trigger": "invoked"}
        optional |= {"max_tokens": rng.randint(0, 1024), "stream": True, "single_line": False}
        optional |= {"stop": ["\n\n", "def"], "context": [snippet] * rng.randint(0, 3)}
        optional |= {"max_time_ms": rng.randint(1, 600_000)}
    else:
        body = {"prompt": rng.choice(["def f(", ["x = "], "", "é🙂"])}
        optional = {"suffix": "\n", "max_tokens": rng.randint(1, 1024), "stop": "\n"}
        optional |= {"stream": True, "model": "m", "temperature": 0.0, "n": 1, "best_of": 1}
        optional |= {"echo": False, "logprobs": None}
    return body | {name: optional[name] for name in optional if rng.random() < 0.5}


def _mutated(rng: random.Random, body: dict[str, Any], names: list[str]) -> Any:
    """`body` with one to three changes: a field dropped or set to any JSON value (a known
    name most often), a context snippet's field changed, a stop string or snippet added."""
    body = copy.deepcopy(body)
    for _ in range(rng.randint(1, 3)):
        change, name = rng.random(), rng.choice(names + _JUNK_NAMES[:2])
        if change < 0.15 and body:
            del body[rng.choice(sorted(body))]
        elif change < 0.3 and isinstance(body.get("context"), list) and body["context"]:
            snippet = {"path": "c.py", "text": "x" * rng.choice([1, 1, 1, 33_000])}
            snippet[rng.choice(["path", "text", "x"])] = _random_json(rng)
            body["context"] = [*body["context"], snippet] * rng.choice([1, 2, 6])
        elif change < 0.4 and isinstance(body.get("stop"), list):
            body["stop"] = body["stop"] * rng.choice([1, 9]) + [_random_json(rng)]
        else:
            body[name] = _random_json(rng)
    return body if rng.random() < 0.97 else _random_json(rng)


class _Body:
    """What read_json reads of a request."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    async def read(self) -> bytes:
        return self.raw


def _parsed(parser: type, body: Any) -> Any:
    """`parser.from_json(body)`, None for a BadRequest; a native request also round-trips
    through to_json (the client's way) and its position is found in its text or refused."""
    try:
        request = parser.from_json(body)
    except BadRequest:
        return None
    if parser is CompleteRequest:
        assert CompleteRequest.from_json(request.to_json()) == request
        with contextlib.suppress(BadRequest):
            offset_at(request.text, request.line, request.character)
    return request


def test_a_long_bad_value_is_cut_in_the_error():
    with pytest.raises(BadRequest) as refused:
        CompleteRequest.from_json({**DOC, "trigger": "x" * 20_000})
    assert "must be one of" in refused.value.message and len(refused.value.message) < 200


def test_a_bad_snippet_is_named_by_its_place_in_the_context():
    context = [{"path": "a.py", "text": "A = 1"}, {"path": "b.py"}]
    with pytest.raises(BadRequest, match=r"context\[1\]\.text: "):
        CompleteRequest.from_json({**DOC, "context": context})


async def test_any_json_body_is_parsed_or_refused_with_bad_request():
    """Whatever JSON a client sends, reading and parsing it gives a request or a BadRequest
    (a 400), never another exception (a 500 with a traceback in the log). Bodies start valid
    and get a few fields wrong, so the checks after the first are reached too."""
    parsed = 0
    for seed in range(3000):
        rng = random.Random(seed)
        parser = rng.choice([CompleteRequest, OpenAICompletionRequest])
        body = _valid_body(rng, parser)
        if rng.random() < 0.9:
            body = _mutated(rng, body, _FIELDS[parser])
        parsed += _parsed(parser, body) is not None
        raw = json.dumps(body).encode("utf-8", "surrogatepass")
        try:
            decoded = await read_json(_Body(raw))
        except BadRequest:
            continue
        _parsed(parser, decoded)
    assert parsed > 600  # not all refused by the first check


async def test_prompt_shows_what_a_completion_there_would_run(fake_daemon):
    body = {"uri": "file:///p.py", "text": "x = 1\ny = ", "line": 1, "character": 4}
    resp = await fake_daemon.post("/v1/prompt", body)
    assert resp.status == 200
    answer = await resp.json()
    assert answer["prompt"] == "<suffix><prefix>x = 1\ny = <middle>"
    assert len(answer["token_ids"]) == len(answer["prompt"]) and answer["healed"] == ""
    resp = await fake_daemon.post("/v1/prompt", {**body, "line": 5})
    assert resp.status == 400 and "past the end" in (await resp.json())["error"]["message"]


async def test_close_document_answers_400_without_uri(fake_daemon):
    resp = await fake_daemon.post("/v1/documents/close", {"url": "x"})
    assert resp.status == 400


async def test_unknown_route_and_wrong_method_answer_json_errors(fake_daemon):
    resp = await fake_daemon.client.get("/v2/nothing", headers=fake_daemon.auth)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await fake_daemon.client.get("/v1/complete", headers=fake_daemon.auth)
    assert resp.status == 405 and "error" in await resp.json()


async def test_huge_body_answers_413_and_lives_on(fake_daemon):
    big = b'{"text": "' + b"x" * (50 * 1024 * 1024) + b'"}'
    resp = await fake_daemon.client.post("/v1/complete", data=big, headers=fake_daemon.auth)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"
    await _good_request_succeeds(fake_daemon)


async def test_huge_chunked_body_answers_413(fake_daemon):
    async def chunks():
        for _ in range(64):
            yield b"x" * 65536

    resp = await fake_daemon.client.post("/v1/complete", data=chunks(), headers=fake_daemon.auth)
    assert resp.status == 413
    await _good_request_succeeds(fake_daemon)


async def test_max_tokens_0_warms_the_document_and_answers_no_items(fake_daemon):
    resp = await fake_daemon.post("/v1/complete", {**DOC, "max_tokens": 0})
    body = await resp.json()
    assert resp.status == 200, body
    assert body["items"] == [] and body["timings"]["generated_tokens"] == 0
    status = await (await fake_daemon.client.get("/v1/status", headers=fake_daemon.auth)).json()
    assert status["requests"]["warmed"] == 1 and status["cache"]["entries"] == 1
    resp = await fake_daemon.post("/v1/completions", {"prompt": "def f(", "max_tokens": 0})
    assert resp.status == 400  # (an OpenAI client asks for text)


async def test_complete_answers_contract_fields(fake_daemon):
    resp = await fake_daemon.post("/v1/complete", {**DOC, "max_tokens": 3})
    body = await resp.json()
    item = body["items"][0]
    assert item["range"] == {
        "start": {"line": 1, "character": 11},
        "end": {"line": 1, "character": 11},
    }
    timings = body["timings"]
    for key in ("cached_tokens", "prefilled_tokens", "generated_tokens", "prefill_ms", "decode_ms"):
        assert key in timings
    assert timings["generated_tokens"] == 3
    assert resp.headers["X-Request-Id"]


async def test_complete_streams_sse_text_then_done(fake_daemon):
    resp = await fake_daemon.post("/v1/complete", {**DOC, "max_tokens": 4, "stream": True})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = await _sse(resp)
    assert [e for e, _ in events] == ["text"] * 4 + ["done"]
    assert "".join(d["text"] for _, d in events[:-1]) == events[-1][1]["items"][0]["text"]


async def test_openai_completion_matches_native_text(fake_daemon):
    native = await (await fake_daemon.post("/v1/complete", {**DOC, "max_tokens": 5})).json()
    offset = len("def add(a, b):\n    return ")
    body = {"prompt": DOC["text"][:offset], "suffix": DOC["text"][offset:], "max_tokens": 5}
    resp = await fake_daemon.post("/v1/completions", body)
    openai = await resp.json()
    assert openai["object"] == "text_completion"
    assert openai["choices"][0]["text"] == native["items"][0]["text"]
    assert openai["choices"][0]["finish_reason"] == "length"
    assert openai["usage"]["completion_tokens"] == 5


async def test_openai_stream_ends_with_done_marker(fake_daemon):
    body = {"prompt": "def f(", "suffix": "", "max_tokens": 3, "stream": True}
    events = await _sse(await fake_daemon.post("/v1/completions", body))
    assert events[-1] == (None, "[DONE]")
    chunks = [d for _, d in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    plain = await (await fake_daemon.post("/v1/completions", {**body, "stream": False})).json()
    assert streamed == plain["choices"][0]["text"]


async def test_openai_completion_without_suffix_is_accepted(fake_daemon):
    resp = await fake_daemon.post("/v1/completions", {"prompt": "def f(", "max_tokens": 2})
    assert resp.status == 200


async def test_models_lists_the_loaded_model(fake_daemon):
    resp = await fake_daemon.client.get("/v1/models", headers=fake_daemon.auth)
    assert (await resp.json())["data"][0]["id"] == "fake.gguf"


async def test_models_names_the_default_model_by_its_catalogue_name(tmp_path):
    daemon = await start_fake_daemon(tmp_path, model="default")
    try:
        resp = await daemon.client.get("/v1/models", headers=daemon.auth)
        assert (await resp.json())["data"][0]["id"] == "qwen2.5-coder-0.5b"
    finally:
        await daemon.client.close()


async def test_close_document_reports_whether_cached(fake_daemon):
    resp = await fake_daemon.post("/v1/documents/close", {"uri": DOC["uri"]})
    assert (await resp.json()) == {"closed": False}
    await _good_request_succeeds(fake_daemon)
    resp = await fake_daemon.post("/v1/documents/close", {"uri": DOC["uri"]})
    assert (await resp.json()) == {"closed": True}


async def test_status_reports_state_model_and_statistics(fake_daemon):
    await _good_request_succeeds(fake_daemon)
    status = await (await fake_daemon.client.get("/v1/status", headers=fake_daemon.auth)).json()
    for key in ("state", "pid", "url", "token_file", "model", "device", "quant", "uptime_s"):
        assert key in status, key
    assert status["requests"]["completed"] == 1
    assert status["cache"]["entries"] == 1
    assert status["engine"]["arch"] == "fake"
    health = await (await fake_daemon.client.get("/health")).json()
    assert status["code"] == health["code"] == code_stamp()  # the code this daemon runs


async def test_shutdown_sets_the_shutdown_event(fake_daemon):
    from codelm.daemon.service import SHUTDOWN

    resp = await fake_daemon.post("/shutdown", {})
    assert resp.status == 200
    assert fake_daemon.app[SHUTDOWN].is_set()


async def test_requests_while_loading_answer_503_with_retry_after(tmp_path):
    daemon = await start_fake_daemon(tmp_path, wait_ready=False, load_s=0.5)
    try:
        resp = await daemon.post("/v1/complete", DOC)
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "model_loading"
        health = await (await daemon.client.get("/health")).json()
        assert health["state"] == "loading" and "progress" in health
    finally:
        await daemon.client.close()


async def test_unknown_model_answers_503_with_clear_message(tmp_path):
    daemon = await start_fake_daemon(tmp_path, wait_ready=False, model="/x/missing.gguf")
    try:
        for _ in range(200):
            health = await (await daemon.client.get("/health")).json()
            if health["state"] != "loading":
                break
            await asyncio.sleep(0.01)
        assert health["state"] == "error"
        resp = await daemon.post("/v1/complete", DOC)
        assert resp.status == 503
        error = (await resp.json())["error"]
        assert error["code"] == "model_load_error" and "missing.gguf" in error["message"]
    finally:
        await daemon.client.close()


async def test_client_disconnect_cancels_engine_work(slow_daemon):
    task = asyncio.create_task(slow_daemon.post("/v1/complete", {**DOC, "max_tokens": 1000}))
    while not slow_daemon.engine.running.is_set():
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        if slow_daemon.engine.calls:
            break
        await asyncio.sleep(0.01)
    assert slow_daemon.engine.calls == [(DOC["uri"], "cancelled:client went away")]
    await _good_request_succeeds(slow_daemon)


async def test_streaming_client_disconnect_cancels_engine_work(slow_daemon):
    resp = await slow_daemon.post("/v1/complete", {**DOC, "max_tokens": 1000, "stream": True})
    await resp.content.readline()
    resp.close()
    for _ in range(200):
        if slow_daemon.engine.calls:
            break
        await asyncio.sleep(0.01)
    assert slow_daemon.engine.calls == [(DOC["uri"], "cancelled:client went away")]


async def test_newer_request_for_same_uri_supersedes_older_with_409(slow_daemon):
    first = asyncio.create_task(slow_daemon.post("/v1/complete", {**DOC, "max_tokens": 1000}))
    while not slow_daemon.engine.running.is_set():
        await asyncio.sleep(0.005)
    second = await slow_daemon.post("/v1/complete", {**DOC, "max_tokens": 2})
    assert second.status == 200
    old = await first
    assert old.status == 409
    assert (await old.json())["error"]["code"] == "cancelled"


async def test_engine_crash_answers_generic_500_and_lives_on(fake_daemon, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(fake_daemon.engine, "complete", boom)
    resp = await fake_daemon.post("/v1/complete", DOC)
    assert resp.status == 500
    error = (await resp.json())["error"]
    assert error["code"] == "internal_error" and "secret" not in error["message"]
    monkeypatch.undo()
    await _good_request_succeeds(fake_daemon)
