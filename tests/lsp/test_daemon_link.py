from __future__ import annotations

import asyncio
from typing import Any

import pytest

from codelm.daemon import client as daemon_client
from codelm.daemon.errors import DaemonUnavailable, ModelLoading, ServerError, Unauthorized
from codelm.daemon.protocol import CompleteRequest
from codelm.daemon.runtime import InstanceLock, RuntimePaths, mark_stopped, publish_endpoint
from codelm.lsp.daemon_link import (
    RESTART_WINDOW_S,
    RETRY_AFTER_S,
    STOPPED_MESSAGE,
    HttpDaemonLink,
    health_state,
)
from codelm.lsp.settings import LspSettings


class Sink:
    def __init__(self) -> None:
        self.statuses: list[str] = []
        self.progress_stages: list[str] = []
        self.shown: list[tuple[str, bool]] = []

    def status(self, state: str, message: str) -> None:
        self.statuses.append(state)

    async def progress(self, stage: str, message: str) -> None:
        self.progress_stages.append(stage)

    def show(self, message: str, is_error: bool) -> None:
        self.shown.append((message, is_error))


class FakeClient:
    def __init__(self, health: list[str]) -> None:
        self.health_states = health
        self.closed = False

    async def health(self) -> dict[str, Any]:
        state = self.health_states.pop(0) if len(self.health_states) > 1 else self.health_states[0]
        return {"state": state, "model": "tiny", "progress": 0.25}

    async def close(self) -> None:
        self.closed = True

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "tiny", "object": "model"}]}

    async def load(self) -> dict[str, Any]:
        """What the daemon does for POST /v1/load: an unloaded model starts loading."""
        self.loads = getattr(self, "loads", 0) + 1
        if self.health_states[0] == "unloaded":
            self.health_states = ["loading", "ready"]
        return await self.health()


class AnsweringClient(FakeClient):
    async def complete(self, request: CompleteRequest) -> str:
        return f"answer for {request.uri}"


@pytest.mark.parametrize(
    ("body", "state"),
    [
        ({"state": "ready", "model": "m"}, "ready"),
        ({"state": "loading", "progress": 0.5}, "loading"),
        ({"state": "unloaded"}, "loading"),
        ({"state": "error", "message": "bad file"}, "error"),
    ],
)
def test_health_state_maps_daemon_states(body, state):
    assert health_state(body)[0] == state


def test_health_state_loading_message_has_progress():
    assert health_state({"state": "loading", "model": "m", "progress": 0.5})[1] == "Loading m 50%"


async def test_link_reports_progress_until_the_model_is_loaded(monkeypatch):
    fake = FakeClient(["loading", "loading", "ready"])
    monkeypatch.setattr(daemon_client.DaemonClient, "discover", lambda *a, **k: fake)
    sink = Sink()
    link = HttpDaemonLink(LspSettings(), sink, home=None)
    await link.ensure_running()
    assert sink.statuses == ["loading", "ready"]
    assert sink.progress_stages[0] == "begin" and sink.progress_stages[-1] == "end"
    assert "report" in sink.progress_stages and sink.shown == []


async def test_link_without_daemon_and_auto_start_off_fails_once(monkeypatch, tmp_path):
    started: list[Any] = []
    monkeypatch.setattr(daemon_client, "start_daemon", lambda *a, **k: started.append(a))
    sink = Sink()
    link = HttpDaemonLink(LspSettings(auto_start=False), sink, home=str(tmp_path))
    with pytest.raises(DaemonUnavailable):
        await link.ensure_running()
    assert sink.statuses[-1] == "error" and len(sink.shown) == 1 and sink.shown[0][1]
    request = CompleteRequest(uri="file:///a.py", text="x", line=0, character=1)
    for _ in range(3):  # no new attempt per keystroke during the retry delay
        with pytest.raises(DaemonUnavailable):
            await link.complete(request)
    assert started == [] and len(sink.shown) == 1


async def test_the_first_request_waits_for_a_running_daemon_to_be_found(monkeypatch):
    """An editor asks as a file opens, while the link still looks for the daemon: a daemon
    found ready within moments answers that request, rather than an empty list."""
    monkeypatch.setattr(
        daemon_client.DaemonClient, "discover", lambda *a, **k: AnsweringClient(["ready"])
    )
    sink = Sink()
    link = HttpDaemonLink(LspSettings(), sink, home=None)
    request = CompleteRequest(uri="file:///a.py", text="x", line=0, character=1)
    assert await link.complete(request) == "answer for file:///a.py"
    assert sink.statuses == ["loading", "ready"]


async def test_a_request_while_the_model_loads_is_not_held_up(monkeypatch):
    monkeypatch.setattr("codelm.lsp.daemon_link.CONNECT_WAIT_S", 0.01)
    fake = AnsweringClient(["loading"] * 4 + ["ready"])
    monkeypatch.setattr(daemon_client.DaemonClient, "discover", lambda *a, **k: fake)
    sink = Sink()
    link = HttpDaemonLink(LspSettings(), sink, home=None)
    request = CompleteRequest(uri="file:///a.py", text="x", line=0, character=1)
    with pytest.raises(ModelLoading):
        await link.complete(request)
    assert sink.statuses == ["loading"]
    await link.ensure_running()
    assert await link.complete(request) == "answer for file:///a.py"


async def test_lost_daemon_is_restarted_once_then_reported(monkeypatch, tmp_path):
    sink = Sink()
    link = HttpDaemonLink(LspSettings(), sink, home=str(tmp_path))
    restarts: list[int] = []
    monkeypatch.setattr(link, "start_in_background", lambda: restarts.append(1))
    link._on_lost(ConnectionResetError("gone"))
    assert restarts == [1] and sink.shown == [
        ("The codelm daemon stopped unexpectedly; restarting it.", False)
    ]
    link._on_lost(ConnectionResetError("gone again"))
    assert restarts == [1]
    assert sink.statuses == ["error"] and sink.shown[-1][1] is True
    # Lost again after a long run (the user stopped it, or it crashed a day later).
    link._restarted_at -= RESTART_WINDOW_S
    link._on_lost(ConnectionResetError("gone a day later"))
    assert restarts == [1, 1]


def _stopped_home(tmp_path) -> RuntimePaths:
    """A CODELM_HOME whose last daemon was stopped with `codelm-daemon stop`."""
    paths = RuntimePaths.for_home(tmp_path)
    paths.ensure_dirs()
    mark_stopped(paths)
    return paths


async def test_a_daemon_the_user_stopped_stays_stopped_until_they_start_it(monkeypatch, tmp_path):
    # Before, the editor restarted it on the next keystroke and called the stop "unexpected".
    paths = _stopped_home(tmp_path)
    started: list[Any] = []
    monkeypatch.setattr(daemon_client, "start_daemon", lambda *a, **k: started.append(a))
    sink = Sink()
    link = HttpDaemonLink(LspSettings(), sink, home=str(tmp_path))
    link._on_lost(ConnectionResetError("stopped"))
    assert sink.statuses == ["disabled"] and sink.shown == [(f"codelm: {STOPPED_MESSAGE}", False)]
    request = CompleteRequest(uri="file:///a.py", text="x", line=0, character=1)
    for _ in range(3):
        with pytest.raises(DaemonUnavailable):
            await link.complete(request)
    assert started == [] and len(sink.shown) == 1
    # `codelm-daemon start`: the daemon's start removes the mark; the next request connects.
    paths.stopped_file.unlink()
    monkeypatch.setattr(
        daemon_client.DaemonClient, "discover", lambda *a, **k: AnsweringClient(["ready"])
    )
    assert await link.complete(request) == "answer for file:///a.py"
    assert sink.statuses[-1] == "ready" and started == []


async def test_a_restart_has_open_editors_wait_for_the_new_daemon_quietly(monkeypatch, tmp_path):
    # `codelm-daemon restart` stops the daemon to start the next itself: an editor that
    # started one meanwhile (the old daemon "stopped unexpectedly") would win the race, with
    # its own settings, and `restart` would fail as one runs already.
    paths = RuntimePaths.for_home(tmp_path)
    paths.ensure_dirs()
    mark_stopped(paths, restarting=True)
    started: list[Any] = []
    monkeypatch.setattr(daemon_client, "start_daemon", lambda *a, **k: started.append(a))
    sink = Sink()
    link = HttpDaemonLink(LspSettings(), sink, home=str(tmp_path))
    link._on_lost(ConnectionResetError("stopped"))
    assert sink.statuses == ["loading"] and sink.shown == []
    request = CompleteRequest(uri="file:///a.py", text="x", line=0, character=1)
    for _ in range(3):
        with pytest.raises(ModelLoading, match="restarting"):
            await link.complete(request)
    # The new daemon's start removes the mark; the next request connects to it.
    paths.stopped_file.unlink()
    monkeypatch.setattr(
        daemon_client.DaemonClient, "discover", lambda *a, **k: AnsweringClient(["ready"])
    )
    assert await link.complete(request) == "answer for file:///a.py"
    assert sink.statuses[-1] == "ready" and started == [] and sink.shown == []


async def test_a_stop_keeps_the_daemon_off_in_open_editors_only(monkeypatch, tmp_path):
    # An editor opened (or its server restarted) after the stop starts one, as on any start.
    _stopped_home(tmp_path)
    started: list[Any] = []

    async def start_daemon(*args, **kwargs):
        started.append(args)

    monkeypatch.setattr(daemon_client, "start_daemon", start_daemon)
    monkeypatch.setattr(
        daemon_client.DaemonClient, "discover", lambda *a, **k: FakeClient(["ready"])
    )
    monkeypatch.setattr("codelm.lsp.daemon_link._discover_live", _nothing_runs)
    sink = Sink()
    link = HttpDaemonLink(LspSettings(), sink, home=str(tmp_path))
    await link.ensure_running()
    assert len(started) == 1 and sink.statuses[-1] == "ready" and sink.shown == []


async def _nothing_runs(paths, timeout_s):
    raise DaemonUnavailable("the codelm daemon is not running")


@pytest.mark.parametrize(
    ("served", "wanted", "said"),
    [
        ("tiny", "other", True),
        ("tiny", "tiny", False),
        ("default", "qwen2.5-coder-0.5b", False),  # one file by two names
        ("smollm2-135m", "qwen2.5-coder-0.5b", True),
    ],
)
async def test_a_running_daemon_with_another_model_is_said_once(monkeypatch, served, wanted, said):
    # The `model` setting applies to a daemon codelm starts; one found running with another
    # model was used in silence.
    settings = LspSettings(model=wanted)
    notes = await _notes_over_two_connections(monkeypatch, settings, {"model": served})
    assert len([m for m in notes if "not the `model` setting" in m]) == (1 if said else 0)


@pytest.mark.parametrize("stale", [False, True])
async def test_a_daemon_running_other_code_than_the_installed_is_said_once(monkeypatch, stale):
    # After an upgrade the daemon that was running went on serving the old code, unsaid.
    from codelm.daemon.runtime import code_stamp

    health = {"code": "0" * 12 if stale else code_stamp()}
    notes = await _notes_over_two_connections(monkeypatch, LspSettings(), health)
    said = [m for m in notes if "has changed since the running daemon" in m]
    assert len(said) == (1 if stale else 0)


async def _notes_over_two_connections(monkeypatch, settings: LspSettings, health: dict) -> list:
    """What the link shows the user over two connections to a ready daemon whose /health
    also holds `health`."""
    fake = FakeClient(["ready"])
    plain = fake.health

    async def health_with():
        return {**(await plain()), **health}

    fake.health = health_with
    monkeypatch.setattr(daemon_client.DaemonClient, "discover", lambda *a, **k: fake)
    sink = Sink()
    link = HttpDaemonLink(settings, sink, home=None)
    for _ in range(2):
        link._ready = False
        await link.ensure_running()
    assert sink.statuses[-1] == "ready"
    return [message for message, _ in sink.shown]


def test_link_disabled_by_settings_reports_disabled():
    sink = Sink()
    link = HttpDaemonLink(LspSettings(), sink, home=None)
    link.apply_settings(LspSettings(enabled=False))
    link.start_in_background()
    assert sink.statuses == ["disabled"]


async def test_a_new_daemon_url_replaces_a_start_still_waiting_on_the_old_one(monkeypatch):
    clients = {"http://a": FakeClient(["loading"]), "http://b": FakeClient(["ready"])}
    monkeypatch.setattr(daemon_client, "DaemonClient", lambda url, *a, **k: clients[url])
    sink = Sink()
    link = HttpDaemonLink(LspSettings(daemon_url="http://a"), sink, home=None)
    link.start_in_background()
    await asyncio.sleep(0.3)  # a's model is "loading", and stays so
    assert sink.statuses[-1] == "loading"
    link.apply_settings(LspSettings(daemon_url="http://b"))
    await asyncio.wait_for(link.ensure_running(), timeout=5)
    assert sink.statuses[-1] == "ready" and clients["http://a"].closed


async def test_a_timeout_over_30_s_in_the_settings_is_the_clients_too():
    # The editor's timeoutMs goes up to 10 minutes; the HTTP client had cut every call at 30 s.
    url = "http://127.0.0.1:9"
    link = HttpDaemonLink(LspSettings(daemon_url=url, timeout_ms=60_000), Sink(), home=None)
    client = await link._connect()
    assert client.timeout_s == 65
    link.apply_settings(LspSettings(daemon_url=url, timeout_ms=3_000))
    assert client.timeout_s == 30
    await client.close()


async def test_a_daemon_found_unloaded_is_asked_to_load(monkeypatch):
    # An editor that connects after the daemon's idle unload: /health alone never loads it.
    fake = FakeClient(["unloaded"])
    monkeypatch.setattr(daemon_client.DaemonClient, "discover", lambda *a, **k: fake)
    sink = Sink()
    link = HttpDaemonLink(LspSettings(), sink, home=None)
    await asyncio.wait_for(link.ensure_running(), timeout=5)
    assert fake.loads == 1 and sink.statuses[-1] == "ready"


async def test_a_shutdown_during_a_request_is_not_a_lost_daemon():
    # The editor closes while the user types: closing our HTTP session cuts the call in
    # flight, which had read as the daemon gone (a message, a restart, after `shutdown`).
    from aiohttp import web

    async def health(_request):
        return web.json_response({"state": "ready", "model": "tiny"})

    released = asyncio.Event()

    async def complete(_request):
        await released.wait()  # (the server's cleanup waits for its handlers)

    runner, url = await _serve(health, complete)
    sink = Sink()
    link = HttpDaemonLink(LspSettings(daemon_url=url), sink, home=None)
    try:
        await link.ensure_running()
        call = asyncio.create_task(
            link.complete(CompleteRequest(uri="file:///a.py", text="x", line=0, character=1))
        )
        await asyncio.sleep(0.2)
        await link.close()
        with pytest.raises(DaemonUnavailable):
            await call
        link.start_in_background()  # as a request that arrives after the close would
        assert link._starting is None or link._starting.done()
        assert sink.shown == [] and sink.statuses == ["loading", "ready"]
    finally:
        released.set()
        await runner.cleanup()


async def test_an_inference_server_that_fails_is_said_until_it_answers_again():
    # With `model` a server's URL the daemon answers 502 while that server is down: the
    # status says so (it had been logged only), and the next answer clears it.
    from aiohttp import web

    answers = [502, 200]

    async def health(_request):
        return web.json_response({"state": "ready", "model": "http://127.0.0.1:8080"})

    async def complete(_request):
        if answers.pop(0) == 502:
            message = "the inference server at http://127.0.0.1:8080 could not be reached"
            error = {"code": "server_error", "message": message}
            return web.json_response({"error": error}, status=502)
        timings = {"prefill_ms": 1.0, "decode_ms": 1.0}
        return web.json_response({"items": [], "timings": timings})

    runner, url = await _serve(health, complete)
    sink = Sink()
    link = HttpDaemonLink(LspSettings(daemon_url=url), sink, home=None)
    request = CompleteRequest(uri="file:///a.py", text="x", line=0, character=1)
    try:
        await link.ensure_running()
        with pytest.raises(ServerError, match="could not be reached"):
            await link.complete(request)
        assert link.state == "error"
        await link.complete(request)
        assert sink.statuses == ["loading", "ready", "error", "ready"] and sink.shown == []
    finally:
        await link.close()
        await runner.cleanup()


async def test_a_daemon_that_refuses_the_token_is_said_once_until_it_takes_it(tmp_path):
    # daemon.url naming a daemon started with another CODELM_HOME: /health said ready, each
    # request got 401, the status went loading -> ready at each one, and nothing was said.
    from aiohttp import web

    tokens, calls = ["the daemon's token"], []

    def guarded(answer):
        async def handler(request):
            calls.append(request.path)
            if request.headers.get("Authorization") != f"Bearer {tokens[0]}":
                error = {"code": "unauthorized", "message": "wrong token"}
                return web.json_response({"error": error}, status=401)
            return web.json_response(answer)

        return handler

    async def health(_request):
        return web.json_response({"state": "ready", "model": "tiny"})

    completed = {"items": [], "timings": {"prefill_ms": 1.0, "decode_ms": 1.0}}
    runner, url = await _serve(health, guarded(completed), guarded({"data": []}))
    sink = Sink()
    link = HttpDaemonLink(LspSettings(daemon_url=url), sink, home=str(tmp_path))
    request = CompleteRequest(uri="file:///a.py", text="x", line=0, character=1)
    try:
        with pytest.raises(Unauthorized, match="CODELM_HOME"):
            await link.ensure_running()
        assert sink.statuses == ["loading", "error"] and len(sink.shown) == 1
        message, is_error = sink.shown[0]
        assert is_error and "refused" in message and "leave daemon.url empty" in message
        for _ in range(3):  # keystrokes within RETRY_AFTER_S: nothing sent, nothing said
            with pytest.raises(DaemonUnavailable):
                await link.complete(request)
        assert calls == ["/v1/models"] and len(sink.shown) == 1
        assert sink.statuses == ["loading", "error"]
        paths = RuntimePaths.for_home(tmp_path)
        with InstanceLock(paths):  # that daemon's token file is where this server looks now
            publish_endpoint(paths, url, None, tokens[0])
            link._failed_at -= RETRY_AFTER_S
            # The next attempt reads it again, and that request is answered.
            assert await link.complete(request) and sink.statuses[-1] == "ready"
            tokens[0] = "a restarted daemon's token"  # refused while ready: said again
            with pytest.raises(Unauthorized):
                await link.complete(request)
            with pytest.raises(Unauthorized, match="another daemon's"):
                await link.ensure_running()
        assert sink.statuses[-2:] == ["loading", "error"] and len(sink.shown) == 2
    finally:
        await link.close()
        await runner.cleanup()


async def _serve(health, complete, models=None):
    """A stand-in daemon on loopback answering /health, /v1/complete and, when given,
    /v1/models: (runner, its url)."""
    from aiohttp import web

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/complete", complete)
    if models is not None:
        app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
