"""The client against an in-process daemon on the fake engine; import boundary."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from fake_daemon import TOKEN

from codelm.daemon.client import DaemonClient, connect
from codelm.daemon.errors import (
    BadRequest,
    Cancelled,
    DaemonUnavailable,
    ModelLoading,
    Unauthorized,
)
from codelm.daemon.protocol import CompleteRequest
from codelm.daemon.runtime import InstanceLock, RuntimePaths, publish_endpoint

REQUEST = CompleteRequest(uri="file:///a.py", text="x = 1\ny = ", line=1, character=4, max_tokens=3)


def test_client_import_does_not_load_torch():
    code = "import sys, codelm.daemon.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _client(daemon, token: str = TOKEN) -> DaemonClient:
    return DaemonClient(str(daemon.client.make_url("/")), token, timeout_s=10)


async def test_client_complete_stream_close_and_status(fake_daemon):
    async with _client(fake_daemon) as client:
        response = await client.complete(REQUEST)
        assert response.timings.generated_tokens == 3
        events = [e async for e in client.stream(REQUEST)]
        assert "".join(events[:-1]) == events[-1].items[0].text == response.items[0].text
        assert await client.close_document(REQUEST.uri) is True
        assert (await client.health())["state"] == "ready"
        assert (await client.status())["requests"]["completed"] == 2


async def test_client_raises_the_daemons_error_classes(fake_daemon, tmp_path):
    async with _client(fake_daemon) as client:
        bad = CompleteRequest(uri="file:///a.py", text="x", line=5, character=0)
        with pytest.raises(BadRequest, match="past the end"):
            await client.complete(bad)
    async with _client(fake_daemon, token="wrong") as client:
        with pytest.raises(Unauthorized):
            await client.status()


async def test_client_raises_cancelled_when_superseded(slow_daemon):
    import asyncio

    async with _client(slow_daemon) as client:
        long = CompleteRequest(uri="file:///a.py", text="x", line=0, character=1, max_tokens=900)
        first = asyncio.create_task(client.complete(long))
        while not slow_daemon.engine.running.is_set():
            await asyncio.sleep(0.005)
        await client.complete(REQUEST)
        with pytest.raises(Cancelled):
            await first


async def test_client_raises_model_loading_while_loading(tmp_path):
    from fake_daemon import start_fake_daemon

    daemon = await start_fake_daemon(tmp_path, wait_ready=False, load_s=0.5)
    try:
        async with _client(daemon) as client:
            with pytest.raises(ModelLoading):
                await client.complete(REQUEST)
    finally:
        await daemon.client.close()


async def test_the_cli_call_waits_for_a_model_that_is_loading(tmp_path):
    # `codelm-daemon complete` right after an idle unload (or a start) had failed at once.
    import asyncio

    from fake_daemon import start_fake_daemon

    from codelm.daemon.client import ask_sync

    daemon = await start_fake_daemon(tmp_path, wait_ready=False, load_s=0.5)
    paths = RuntimePaths.for_home(tmp_path / "home")
    try:
        with InstanceLock(paths):
            publish_endpoint(paths, str(daemon.client.make_url("/")).rstrip("/"), None, TOKEN)
            call = DaemonClient.complete
            response = await asyncio.to_thread(
                ask_sync, lambda c: call(c, REQUEST), paths, timeout_s=10
            )
        assert response is not None and response.timings.generated_tokens == 3
    finally:
        await daemon.client.close()


async def test_client_reports_unreachable_daemon():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with DaemonClient(f"http://127.0.0.1:{port}", "t", timeout_s=2) as client:
        with pytest.raises(DaemonUnavailable, match="cannot reach"):
            await client.health()


@pytest.mark.parametrize(
    "body, content_type",
    [("<html>hello</html>", "text/html"), ('["ok"]', "application/json"), ("", "text/plain")],
)
async def test_another_program_on_the_port_is_not_taken_for_the_daemon(body, content_type):
    # A stale runtime file or a wrong daemon.url can name a port another server now holds.
    from aiohttp import web

    async def health(_request):
        return web.Response(text=body, content_type=content_type)

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with DaemonClient(f"http://127.0.0.1:{port}", "t", timeout_s=5) as client:
            with pytest.raises(DaemonUnavailable, match="another program may use that port"):
                await client.health()
    finally:
        await runner.cleanup()


async def test_connect_discovers_daemon_from_runtime_files(fake_daemon, tmp_path):
    home = str(tmp_path / "home")
    paths = RuntimePaths.for_home(home)
    with pytest.raises(DaemonUnavailable):
        await connect(home, start=False)
    with InstanceLock(paths):
        publish_endpoint(paths, str(fake_daemon.client.make_url("/")).rstrip("/"), None, TOKEN)
        client = await connect(home, start=False)
        async with client:
            assert (await client.health())["state"] == "ready"
