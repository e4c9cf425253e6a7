"""`model` as an inference server's URL: the daemon asks that server (here another real codelm
daemon with the test model, through its OpenAI-compatible API) instead of loading a model."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import random
import re
import socket
import threading
import time

import pytest
from daemon_live import (
    Live,
    cli,
    make_home,
    read_live,
    require_engine,
)

from codelm.daemon import catalog
from codelm.daemon.config import resolve_config
from codelm.daemon.engine import EngineConfig
from codelm.daemon.engine.prompt import FIM_FORMATS
from codelm.daemon.engine.remote import (
    SERVER_FIM,
    RemoteEngine,
    _Answer,
    _take,
    guess_fim,
    server_base,
)
from codelm.daemon.errors import ConfigError, ModelLoadError, ServerError
from codelm.daemon.protocol import CompleteRequest, Snippet
from codelm.daemon.stops import StopReason, StopRules

# -- without a server --


@pytest.mark.parametrize(
    ("name", "fim"),
    [
        ("Qwen/Qwen2.5-Coder-7B", "qwen"),
        ("qwen2.5-coder:1.5b-base", "qwen"),
        ("deepseek-coder-6.7b-base.Q4_K_M.gguf", "deepseek"),
        ("codellama/CodeLlama-7b-hf", "codellama"),
        ("bigcode/starcoder2-3b", "starcoder"),
        ("aiXcoder-7b", "aixcoder"),
    ],
)
def test_auto_fim_follows_the_served_models_name(name, fim):
    assert guess_fim("auto", name) is FIM_FORMATS[fim]


def test_a_model_name_without_a_known_fim_lets_the_server_lay_out_the_prompt():
    assert guess_fim("auto", "llama-3.1-8b-instruct") == SERVER_FIM
    assert guess_fim("auto", "smollm2-135m") == SERVER_FIM  # no FIM (the local engine agrees)
    assert guess_fim("none", "qwen2.5-coder") is None
    assert guess_fim("qwen", "anything") is FIM_FORMATS["qwen"]
    with pytest.raises(ModelLoadError, match="known: auto, none, server"):
        guess_fim("fimless", "anything")


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080", "http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1/"]
)
def test_the_server_url_may_end_in_v1(url):
    assert server_base(url) == "http://127.0.0.1:8080"


def test_a_server_url_is_kept_and_a_bad_one_refused_with_the_form_expected():
    config = resolve_config({"model": "http://127.0.0.1:8080/v1"}, environ={})
    assert config.engine.model == "http://127.0.0.1:8080/v1"  # not made a path
    for bad in ("http://:8080", "http://host:port", "http://host:1/?model=x"):
        with pytest.raises(ConfigError, match="URL"):
            resolve_config({"model": bad}, environ={})
    assert resolve_config({"model": "HTTP://h:1"}, environ={}).engine.model == "HTTP://h:1"
    with pytest.raises(ConfigError, match="server_api_key"):  # /health would show it
        resolve_config({"model": "http://user:secret@127.0.0.1:8080"}, environ={})


def test_status_never_shows_the_servers_api_key():
    environ = {"CODELM_MODEL": "http://127.0.0.1:1", "CODELM_SERVER_API_KEY": "s3cret"}
    config = resolve_config(environ=environ)
    assert config.engine.server_api_key == "s3cret"
    assert "s3cret" not in json.dumps(config.to_json())


def _engine(fim: str, **settings) -> RemoteEngine:
    config = EngineConfig(model="http://127.0.0.1:1", fim=fim, **settings)
    return RemoteEngine(config, "http://127.0.0.1:1", "m", load_s=0.0)


def _request(text: str, cursor: int, **fields) -> CompleteRequest:
    before = text[:cursor].split("\n")
    line, character = len(before) - 1, len(before[-1])
    return CompleteRequest(
        uri="file:///src/a.py", text=text, line=line, character=character, **fields
    )


def test_prompts_are_laid_out_as_the_local_engine_lays_them_out():
    text = "def f(x):\n    return \n\nprint(f(2))\n"
    request = _request(text, text.index("\n\nprint"), trigger="invoked")
    # The space before the cursor leaves the prompt: the answer is to start with it.
    prefix, suffix = "def f(x):\n    return", "\n\nprint(f(2))\n"
    shown = _engine("starcoder").show_prompt(request)
    assert shown.prompt == f"<file_sep>a.py\n<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
    assert shown.healed == " "
    assert _engine("qwen").show_prompt(request).prompt == (
        f"<|file_sep|>a.py\n<|fim_prefix|><|fim_suffix|>{suffix}<|fim_middle|>{prefix}"
    )
    assert _engine("none").show_prompt(request).prompt == f"# a.py\n{prefix}"
    body, heal = _engine("server")._body(request, len(prefix) + 1, remember=False)
    assert body == {"prompt": prefix, "suffix": suffix} and heal == " "


def test_other_files_snippets_come_first_as_the_local_engine_lays_them_out():
    text = "y = \n"
    context = (
        Snippet("/src/u.py", "def half(x):\n    return x / 2"),
        Snippet("/src/v.py", "V = 1\n"),
    )
    request = _request(text, 4, trigger="invoked", context=context)
    files = "<file_sep>/src/u.py\ndef half(x):\n    return x / 2\n<file_sep>/src/v.py\nV = 1\n"
    shown = _engine("starcoder").show_prompt(request).prompt
    assert shown == f"{files}<file_sep>a.py\n<fim_prefix>y =<fim_suffix>\n<fim_middle>"
    # Within context_chars, the nearest first; none for a format that does not name files.
    assert (
        _engine("starcoder", context_chars=10)
        .show_prompt(request)
        .prompt.startswith("<file_sep>/src/v.py\nV = 1\n<file_sep>a.py\n")
    )
    assert _engine("deepseek").show_prompt(request).prompt.startswith("<｜fim▁begin｜>y =")


@pytest.mark.parametrize(
    ("heal", "pieces", "text"),
    [
        ("        ", ["   ", "     ", "return", " f.read()"], "return f.read()"),
        ("        ", ["        return x"], "return x"),
        ("    ", ["          deeper"], "      deeper"),  # more: the model's indentation stays
        ("    ", ["  ", "shallower"], "shallower"),  # other: the user's indentation stays
        ("    ", ["\t", "  ", "other"], "other"),  # however many pieces the model's takes
        ("    ", ["\n    next_line()"], "\n    next_line()"),
        (" ", [" 1"], "1"),  # after "x = "
        ("", [" 1"], " 1"),
        ("    ret", ["    re", "turn x"], "urn x"),  # the word being typed, retyped
        ("    ret", ["        return x"], "urn x"),
        (" fo", [" f", "oo(1)"], "o(1)"),
    ],
)
def test_the_answer_starts_after_the_whitespace_the_prompt_left_out(heal, pieces, text):
    shown = []
    answer = _Answer(StopRules(max_tokens=64), shown.append, heal)
    for piece in pieces:
        assert not answer.add(piece)
    answer.finish(StopReason.EOS)
    assert answer.text == text and "".join(shown) == text


def test_the_answer_does_not_depend_on_how_the_server_cuts_it_into_pieces():
    """Random answers after random healed text, whole and cut at random places: the same
    text shown and the same reason to stop (a server streams tokens of any length)."""
    rng = random.Random(0)
    parts = ["", " ", "  ", "\t", "ret", "return", "re", "x", "\n", "    ", "foo(", "\n    "]
    heals = ["", " ", "    ", "ret", "  ret", "\tx", "    return"]

    def answered(heal: str, pieces: list[str], single_line: bool) -> tuple[str, StopReason]:
        answer = _Answer(StopRules(max_tokens=64, single_line=single_line), None, heal)
        if not any(answer.add(piece) for piece in pieces):
            answer.finish(StopReason.EOS)
        return answer.text, answer.reason

    for _ in range(5000):
        heal, single_line = rng.choice(heals), rng.random() < 0.5
        text = "".join(rng.choices(parts, k=rng.randint(1, 6))) or "x"
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 4))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        whole = answered(heal, [text], single_line)
        assert answered(heal, pieces, single_line) == whole, (heal, pieces)


@pytest.mark.parametrize(
    "chunk",
    ['{"choices": [{"text": 1.5}]}', '{"choices": {"text": "x"}}', '{"choices": [[]]}', "{", "[]"],
)
def test_a_chunk_that_is_not_a_completion_is_the_servers_error(chunk):
    with pytest.raises(ServerError, match="sent what is not a completion"):
        _take(chunk, _Answer(StopRules(max_tokens=8), None, ""), "http://localhost:8080")


def test_an_answer_that_does_not_go_on_with_the_users_word_is_no_suggestion():
    shown = []
    answer = _Answer(StopRules(max_tokens=64), shown.append, "    ret")
    assert not answer.add("    r")
    assert answer.add("aise ValueError")  # done: the server's stream is closed
    assert answer.text == "" and shown == []


def test_an_untitled_buffer_is_named_by_its_language():
    request = dataclasses.replace(_request("", 0), uri="untitled:Untitled-1", language="rust")
    assert _engine("qwen").show_prompt(request).prompt.startswith("<|file_sep|>untitled.rs\n")


def test_special_token_text_in_a_document_stays_text():
    # llama-server reads `<|endoftext|>` in a prompt as the token: a string holding it ended
    # every suggestion in the file.
    text = 's = "<|endoftext|>"\nt = "<fim_middle>"\nx = len('
    shown = _engine("qwen").show_prompt(_request(text, len(text))).prompt
    assert shown.count("<|") == 4 and "<\u200b|endoftext|>" in shown  # the format's own 4
    assert "<\u200bfim_middle>" in shown and "x = len(" in shown


@pytest.mark.parametrize(
    ("before", "healed"),
    [
        ("    ret", "    ret"),
        ("foo(bar", "bar"),
        ("x = ", " "),
        ("x = " + "a" * 40, ""),  # a long run (base64, a hash): left as it is
        ("# 这个函数计算两个整数的和", ""),  # \w would take the whole sentence
    ],
)
def test_what_the_answer_must_retype(before, healed):
    assert _engine("starcoder").show_prompt(_request(before, len(before))).healed == healed


def test_a_word_at_the_cursor_leaves_the_prompt_with_its_indentation():
    text = "def f(x):\n    ret\n"
    shown = _engine("starcoder").show_prompt(_request(text, text.index("\n", 10)))
    assert shown.prompt.startswith("<file_sep>a.py\n<fim_prefix>def f(x):\n<fim_suffix>")
    assert shown.healed == "    ret"


def test_stop_strings_and_max_tokens_count_after_the_healed_word():
    # With the server applying `stop: ["fi"]`, "return fi" stopped inside the retyped "fib".
    answer = _Answer(StopRules(max_tokens=64, stop_texts=("fi",)), None, " fi")
    assert not answer.add(" fib(n - 1) + ")
    assert answer.add("fib(n - 2)")
    assert answer.text == "b(n - 1) + " and answer.reason is StopReason.STOP_TEXT
    answer = _Answer(StopRules(max_tokens=2), None, "        ")
    for piece in ("        ", "return", " x"):
        done = answer.add(piece)
    assert done and answer.text == "return x" and answer.reason is StopReason.MAX_TOKENS


def test_an_answer_past_its_deadline_stops_once_it_has_text_to_show():
    answer = _Answer(StopRules(max_tokens=64, deadline=time.monotonic()), None, "    ")
    assert not answer.add("    ")  # the healed indentation, retyped: nothing to show yet
    assert answer.add("return x")
    assert answer.text == "return x" and answer.reason is StopReason.TIME_LIMIT


def test_a_single_line_answer_stops_after_the_healed_whitespace_too():
    answer = _Answer(StopRules(max_tokens=64, single_line=True), None, "    ")
    assert not answer.add("    ")
    assert answer.add("return x\n    y = 1")
    assert answer.text == "return x" and answer.reason is StopReason.SINGLE_LINE


def test_the_prefix_window_stays_anchored_while_the_user_types():
    # The server's prompt cache matches a prompt's unchanged start: the window must not move
    # with each keystroke (prompt.window_start, as for the local engine).
    engine = _engine("starcoder", prefix_chars=3000)
    lines = "".join(f"value_{i} = {i}\n" for i in range(400))
    first, _ = engine._body(_request(lines + "x", len(lines) + 1), len(lines) + 1, remember=True)
    typed = lines + "x = val"
    second, _ = engine._body(_request(typed, len(typed)), len(typed), remember=True)
    start = first["prompt"][: first["prompt"].index("x")]
    assert second["prompt"].startswith(start) and len(start) < len(lines)
    assert engine.close_document("file:///src/a.py") and not engine.documents


def test_a_server_that_is_not_there_fails_the_load_with_what_to_do():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = EngineConfig(model=f"http://127.0.0.1:{port}")
    with pytest.raises(ModelLoadError, match="could not be reached.*start it, or set `model`"):
        RemoteEngine.load(config)


def test_https_to_a_plain_http_server_says_so():
    # It had read "could not be reached ([SSL: WRONG_VERSION_NUMBER] ...); start it".
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:
        config = EngineConfig(model=f"https://127.0.0.1:{plain.server_address[1]}")
        with pytest.raises(ModelLoadError, match=r"TLS handshake.*plain-HTTP server \(http://\)"):
            RemoteEngine.load(config)
    finally:
        plain.shutdown()


# -- a real daemon behind a real daemon --


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Live:
    """The inference server: a codelm daemon with the everyday model (a FIM model: the
    front lays out its FIM prompt as text, which the server reads as those tokens)."""
    require_engine()
    catalog.fetch("default", log=lambda message: None)  # (make install fetched it)
    home = make_home(tmp_path_factory.mktemp("server"))
    env = {"CODELM_THREADS": "1"}  # one summation order for every request
    started = cli(home, "start", "--model", "default", "--device", "cpu", env=env)
    assert started.returncode == 0, started.stderr
    yield read_live(home)
    cli(home, "stop", timeout=60)


@pytest.fixture(scope="module")
def front(server, tmp_path_factory) -> Live:
    """The daemon the editor talks to, with the server as its model."""
    home = make_home(tmp_path_factory.mktemp("front"))
    env = {"CODELM_SERVER_API_KEY": server.token}
    started = cli(home, "start", "--model", server.url + "/v1", env=env, timeout=60)
    assert started.returncode == 0, started.stderr
    yield read_live(home)
    cli(home, "stop", timeout=60)


ASK = {
    "uri": "file:///remote/add.py",
    "text": "def add(a, b):\n    return a\n\n\nprint(add(1, 2))\n",
    "line": 1,
    "character": 12,
    "max_tokens": 8,
}


@pytest.mark.e2e
@pytest.mark.slow
def test_the_servers_model_answers_as_it_does_for_its_own_clients(server, front):
    # The front leaves the word at the cursor (" a") out of the prompt and the server retypes
    # it, one token more of max_tokens than its own client's request: compare whole lines.
    ask = ASK | {"max_tokens": 16, "single_line": True}
    status, via_front = front.call("POST", "/v1/complete", ask)
    assert status == 200, via_front
    status, direct = server.call("POST", "/v1/complete", ask | {"uri": "file:///direct/add.py"})
    assert status == 200, direct
    assert via_front["items"][0]["text"] == direct["items"][0]["text"]
    assert via_front["items"][0]["text"].strip()
    assert via_front["timings"]["generated_tokens"] > 0


@pytest.mark.e2e
@pytest.mark.slow
def test_the_front_says_it_asks_a_server_and_uses_no_torch(server, front):
    status, body = front.call("GET", "/v1/status")
    assert status == 200
    assert body["device"] == "server" and body["model"] == server.url + "/v1"
    assert body["engine"]["server_model"] == "qwen2.5-coder-0.5b"
    assert body["engine"]["fim"] == "qwen"
    assert server.token not in json.dumps(body)
    # No model here: the front holds a small fraction of what the server does.
    _, held = server.call("GET", "/v1/status")
    assert body["resident_MB"] < held["resident_MB"] / 2


@pytest.mark.e2e
@pytest.mark.slow
def test_a_suggestion_from_the_server_keeps_to_one_line_where_asked(front):
    ask = ASK | {"uri": "file:///remote/one.py", "max_tokens": 48, "single_line": True}
    ask["text"] = "import os\n\n\ndef list_python_files(folder):\n    "
    ask["line"], ask["character"] = 4, 4
    status, body = front.call("POST", "/v1/complete", ask)
    assert status == 200, body
    text = body["items"][0]["text"]
    assert "\n" not in text.strip("\n") and body["stop_reason"] in ("single_line", "eos")


@pytest.mark.e2e
@pytest.mark.slow
def test_a_closed_request_stops_the_servers_work_too(server, front):
    before = server.call("GET", "/v1/status")[1]["requests"]["cancelled"]
    long = ASK | {
        "uri": "file:///remote/long.py",
        "text": "numbers = [\n    1,\n    2,\n    3,\n",
        "line": 4,
        "character": 0,
        "max_tokens": 1024,
        "stream": True,
    }
    conn = front.connection()
    conn.request(
        "POST",
        "/v1/complete",
        body=json.dumps(long),
        headers={"Authorization": f"Bearer {front.token}", "Content-Type": "application/json"},
    )
    response = conn.getresponse()
    assert response.status == 200
    assert response.fp.readline()  # the first event: the server is generating
    conn.close()
    deadline = time.monotonic() + 30
    while server.call("GET", "/v1/status")[1]["requests"]["cancelled"] == before:
        assert time.monotonic() < deadline, "the server went on generating"
        time.sleep(0.05)
    status, _ = front.call("POST", "/v1/complete", ASK)
    assert status == 200


@pytest.mark.e2e
@pytest.mark.slow
def test_a_wrong_api_key_is_said_when_the_daemon_starts(server, tmp_path):
    home = make_home(tmp_path / "wrong-key")
    env = {"CODELM_SERVER_API_KEY": "not-the-token"}
    started = cli(home, "start", "--model", server.url, env=env, timeout=60)
    assert started.returncode == 1
    assert re.search(
        f"answered GET {server.url}/v1/models with 401.*check `server_api_key`", started.stderr
    ), started.stderr


@contextlib.contextmanager
def _front_of_a_stand_in(tmp_path, answer_post):
    """A daemon whose model is a stand-in server: it lists one model, and `answer_post(handler)`
    answers each POST. Yields (the daemon, the stand-in's url)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send(200, {"data": [{"id": "starcoder2-3b"}]})

        def do_POST(self):
            self.body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            answer_post(self)

        def send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    stand_in = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=stand_in.serve_forever, daemon=True).start()
    home = make_home(tmp_path / "front")
    url = f"http://127.0.0.1:{stand_in.server_address[1]}"
    try:
        started = cli(home, "start", "--model", url, timeout=60)
        assert started.returncode == 0, started.stderr
        yield read_live(home), url
    finally:
        cli(home, "stop", timeout=60)
        stand_in.shutdown()


def _drop_the_connection(handler):
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_server_that_stops_answering_gets_a_502_naming_it(tmp_path):
    with _front_of_a_stand_in(tmp_path, _drop_the_connection) as (live, url):
        status, body = live.call("POST", "/v1/complete", ASK)
        assert status == 502 and body["error"]["code"] == "server_error"
        assert url in body["error"]["message"]
        assert live.call("GET", "/health", auth=False)[1]["state"] == "ready"
        # ...so status says what the last request ran into.
        last = live.call("GET", "/v1/status")[1]["requests"]["last_error"]
        assert last["message"] == body["error"]["message"]
        shown = cli(live.home, "status")
        assert re.search(rf"last error \d+ s ago: {re.escape(last['message'])}", shown.stdout)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_server_that_does_not_stream_is_read_whole(tmp_path):
    # ASK's cursor follows "return a": the answer retypes " a", which the suggestion drops.
    whole = {"choices": [{"text": " a + b\n", "finish_reason": "stop"}]}
    with _front_of_a_stand_in(tmp_path, lambda handler: handler.send(200, whole)) as (live, _):
        status, body = live.call("POST", "/v1/complete", ASK)
        assert status == 200, body
        assert body["items"][0]["text"] == " + b\n" and body["stop_reason"] == "eos"


@pytest.mark.e2e
@pytest.mark.slow
def test_a_page_that_is_not_a_completion_is_a_502(tmp_path):
    def page(handler):
        data = b"<html><body>Hello</body></html>"
        handler.send_response(200)
        handler.send_header("Content-Type", "text/html")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    with _front_of_a_stand_in(tmp_path, page) as (live, _):
        status, body = live.call("POST", "/v1/complete", ASK)
        assert status == 502 and "text/html, not a completion" in body["error"]["message"]


@pytest.mark.e2e
@pytest.mark.slow
def test_openai_requests_pass_through_to_the_server(server, front):
    ask = {"prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))\n", "max_tokens": 8}
    status, via_front = front.call("POST", "/v1/completions", ask)
    assert status == 200, via_front
    status, direct = server.call("POST", "/v1/completions", ask)
    assert status == 200, direct
    assert via_front["choices"][0]["text"] == direct["choices"][0]["text"]
    assert via_front["choices"][0]["text"].strip()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_server_that_lays_out_the_prompt_itself_answers_alike(server, tmp_path):
    # fim = server: the prefix goes as `prompt` and the rest as `suffix` (as for Ollama).
    home = make_home(tmp_path / "suffix")
    env = {"CODELM_SERVER_API_KEY": server.token, "CODELM_FIM": "server"}
    started = cli(home, "start", "--model", server.url, env=env, timeout=60)
    assert started.returncode == 0, started.stderr
    try:
        live = read_live(home)
        assert live.call("GET", "/v1/status")[1]["engine"]["fim"].startswith("laid out by")
        ask = ASK | {"max_tokens": 16, "single_line": True}
        status, via_front = live.call("POST", "/v1/complete", ask)
        assert status == 200, via_front
        status, direct = server.call("POST", "/v1/complete", ask | {"uri": "file:///d/s.py"})
        assert via_front["items"][0]["text"] == direct["items"][0]["text"]
        assert via_front["items"][0]["text"].strip()
    finally:
        cli(home, "stop", timeout=60)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_prompt_longer_than_the_servers_context_is_narrowed_to_fit(tmp_path):
    prompts = []

    def short_context(handler):
        prompts.append(handler.body["prompt"])
        if len(handler.body["prompt"]) > 3000:
            message = "request (2500 tokens) exceeds the available context size (1024 tokens)"
            handler.send(400, {"error": {"code": 400, "message": message}})
        else:
            answer = {"text": "last = 1\n", "finish_reason": "stop"}  # retypes "last"
            handler.send(200, {"choices": [answer]})

    text = "".join(f"value_{i} = {i}\n" for i in range(1000)) + "last"
    ask = {"uri": "file:///big.py", "text": text, "line": 1000, "character": 4}
    with _front_of_a_stand_in(tmp_path, short_context) as (live, _):
        status, body = live.call("POST", "/v1/complete", ask)
        assert status == 200, body
        assert body["items"][0]["text"] == " = 1\n"
        assert [len(p) > 3000 for p in prompts] == [True, True, False]  # 8000, 4000, 2000
        assert live.call("GET", "/v1/status")[1]["cache"]["narrowed_to_fit"] == 1
        live.call("POST", "/v1/complete", ask)
        assert len(prompts) == 4 and len(prompts[-1]) <= 3000  # the next fits at once
        # Another document starts from the whole windows: only the dense one is narrowed.
        live.call("POST", "/v1/complete", ask | {"uri": "file:///other.py"})
        assert len(prompts) == 7 and len(prompts[4]) > 3000


@pytest.mark.e2e
@pytest.mark.slow
def test_other_refusals_are_not_asked_again(tmp_path):
    posts = []

    def refuse(handler):
        posts.append(1)
        handler.send(400, {"error": {"message": "temperature must be positive"}})

    with _front_of_a_stand_in(tmp_path, refuse) as (live, url):
        status, body = live.call("POST", "/v1/complete", ASK)
        assert status == 502 and "temperature must be positive" in body["error"]["message"]
        assert len(posts) == 1
