"""Async HTTP client of the daemon, used by codelm-lsp and the CLI (aiohttp only; never torch).

`connect()` finds the running daemon from its runtime files, starting it when asked;
`DaemonClient` maps error bodies back to the CodelmError classes of errors.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiohttp

from . import errors
from .config import resolve_paths
from .errors import BadRequest, CodelmError, DaemonUnavailable
from .protocol import CompleteRequest, CompleteResponse, PromptResponse
from .runtime import DaemonInfo, RuntimePaths, read_daemon_info

logger = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 30.0
START_TIMEOUT_S = 60.0
LOADING_POLL_S = 0.2  # ask_sync asks again this often while the model loads
_ERRORS_BY_CODE: dict[str, type[CodelmError]] = {
    cls.code: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, CodelmError)
}


class DaemonClient:
    """One connection pool to one daemon; use `async with` or call `close()`."""

    def __init__(self, url: str, token: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._token = token
        self._session: aiohttp.ClientSession | None = None
        if url.startswith("unix:"):
            self._base = "http://localhost"
            self._socket_path: str | None = url.removeprefix("unix:")
        else:
            self._base = url.rstrip("/")
            self._socket_path = None

    @classmethod
    def from_info(cls, info: DaemonInfo, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> DaemonClient:
        return cls(info.url, info.token, timeout_s=timeout_s)

    @classmethod
    def discover(
        cls, paths: RuntimePaths | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> DaemonClient:
        """A client for the running daemon; DaemonUnavailable when none runs."""
        return cls.from_info(read_daemon_info(paths or resolve_paths()), timeout_s=timeout_s)

    async def __aenter__(self) -> DaemonClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- API --

    async def complete(self, request: CompleteRequest) -> CompleteResponse:
        """POST /v1/complete (non-streaming). Raises the CodelmError the daemon answered."""
        body = request.to_json()
        body["stream"] = False
        return CompleteResponse.from_json(await self.request("POST", "/v1/complete", body))

    async def prompt(self, request: CompleteRequest) -> PromptResponse:
        """POST /v1/prompt: the prompt a completion of `request` would run."""
        return PromptResponse.from_json(await self.request("POST", "/v1/prompt", request.to_json()))

    async def stream(self, request: CompleteRequest) -> AsyncIterator[str | CompleteResponse]:
        """POST /v1/complete with stream: yields text pieces, then the final CompleteResponse."""
        body = request.to_json()
        body["stream"] = True
        async with self._send("POST", "/v1/complete", body) as resp:
            await _raise_for_error(resp)
            async for event, data in _sse_events(resp):
                if event == "text":
                    yield data["text"]
                elif event == "done":
                    yield CompleteResponse.from_json(data)
                elif event == "error":
                    raise _error_from_body(data, 500)

    async def close_document(self, uri: str) -> bool:
        body = await self.request("POST", "/v1/documents/close", {"uri": uri})
        return bool(body.get("closed"))

    async def health(self) -> dict[str, Any]:
        """GET /health: {"state": "loading"|"ready"|"error"|..., "progress"?, "message"?}."""
        return await self.request("GET", "/health")

    async def models(self) -> dict[str, Any]:
        """GET /v1/models: the model served, as OpenAI lists it. Needs the token, which
        /health does not: the cheapest check that the daemon takes ours."""
        return await self.request("GET", "/v1/models")

    async def load(self) -> dict[str, Any]:
        """POST /v1/load: the model loads again if idle unload dropped it, or if its load
        failed and its file has changed since; the health after."""
        return await self.request("POST", "/v1/load", {})

    async def status(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/status")

    async def shutdown(self) -> None:
        await self.request("POST", "/shutdown", {})

    async def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One JSON call; the decoded answer, or the daemon's error raised as CodelmError.
        An answer that is not a JSON object comes from some other program (a stale runtime
        file or a `daemon.url` naming another server's port): DaemonUnavailable."""
        async with self._send(method, path, body) as resp:
            await _raise_for_error(resp)
            try:
                answer = await resp.json(content_type=None)
            except (json.JSONDecodeError, UnicodeDecodeError):
                answer = None
        if not isinstance(answer, dict):
            raise DaemonUnavailable(
                f"{self.url} answered {path} with something other than the codelm daemon's "
                "JSON: another program may use that port; check `codelm-daemon status` "
                "(and the language server's daemon.url setting)"
            )
        return answer

    # -- internals --

    def _send(self, method: str, path: str, body: Any) -> Any:
        session = self._get_session()
        headers = {"Authorization": f"Bearer {self._token}"}
        # Per call: timeout_s as it is now (the language server follows its settings).
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        call = session.request(
            method, self._base + path, json=body, headers=headers, timeout=timeout
        )
        return _Call(call, self)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.UnixConnector(path=self._socket_path) if self._socket_path else None
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self._session


class _Call:
    """Wraps a request context manager so connection failures become DaemonUnavailable."""

    def __init__(self, ctx: Any, client: DaemonClient) -> None:
        self._ctx = ctx
        self._client = client

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            return await self._ctx.__aenter__()
        except aiohttp.ClientConnectionError as exc:
            raise DaemonUnavailable(
                f"cannot reach the codelm daemon at {self._client.url} ({exc}); "
                "is it running? `codelm-daemon status`"
            ) from exc
        except asyncio.TimeoutError as exc:
            raise DaemonUnavailable(
                f"the daemon did not answer within {self._client.timeout_s:.0f} s"
            ) from exc

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._ctx.__aexit__(*exc_info)


async def _raise_for_error(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    try:
        body = await resp.json(content_type=None)
    except (aiohttp.ContentTypeError, json.JSONDecodeError, UnicodeDecodeError):
        body = {}
    raise _error_from_body(body, resp.status)


def _error_from_body(body: Any, status: int) -> CodelmError:
    error = body.get("error", {}) if isinstance(body, dict) else {}
    code = error.get("code", "http_error") if isinstance(error, dict) else "http_error"
    message = error.get("message", f"HTTP {status}") if isinstance(error, dict) else str(error)
    cls = _ERRORS_BY_CODE.get(code, CodelmError)
    exc = BadRequest("", message) if cls is BadRequest else cls(message)
    if cls is CodelmError:
        exc.code, exc.status = code, status  # type: ignore[misc]
    return exc


async def _sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    event, data = "message", []
    async for raw in resp.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                text = "\n".join(data)
                yield event, (text if text == "[DONE]" else json.loads(text))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


# -- finding and starting the daemon --


async def connect(
    home: str | None = None,
    *,
    start: bool = True,
    start_args: Sequence[str] = (),
    timeout_s: float = START_TIMEOUT_S,
    request_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> DaemonClient:
    """A client for the running daemon, starting one (`codelm-daemon start`) when none runs.

    `home` is a CODELM_HOME folder (None: $CODELM_HOME or the platformdirs folders).
    Returns once /health answers (the model may still be loading: poll `health()`).
    Raises DaemonUnavailable with the reason when it cannot start within `timeout_s`.
    """
    paths = _paths_for(home)
    try:
        return DaemonClient.discover(paths, timeout_s=request_timeout_s)
    except DaemonUnavailable:
        if not start:
            raise
    await start_daemon(home, args=start_args, timeout_s=timeout_s)
    return DaemonClient.discover(paths, timeout_s=request_timeout_s)


async def start_daemon(
    home: str | None = None,
    *,
    args: Sequence[str] = (),
    timeout_s: float = START_TIMEOUT_S,
) -> None:
    """Run `codelm-daemon start --wait 0 ARGS`; returns once the daemon's /health answers."""
    paths = _paths_for(home)
    command = [sys.executable, "-m", "codelm.daemon.cli", "start", "--wait", "0", *args]
    env = {**os.environ, "CODELM_HOME": home} if home else None
    logger.info("starting the daemon: %s", " ".join(command))
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except asyncio.TimeoutError as exc:
        proc.kill()
        raise DaemonUnavailable(
            f"the daemon did not start within {timeout_s:.0f} s; see {paths.log_file}"
        ) from exc
    if proc.returncode != 0:
        with contextlib.suppress(DaemonUnavailable):
            read_daemon_info(paths)  # another client started it first: fine
            return
        text = output.decode(errors="replace").strip()
        raise DaemonUnavailable(f"the daemon did not start: {text or 'no output'}")


def _paths_for(home: str | None) -> RuntimePaths:
    return RuntimePaths.for_home(home) if home else resolve_paths()


def call_sync(
    fn: Callable[[DaemonClient], Awaitable[T]],
    paths: RuntimePaths | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> T:
    """For the CLI: discover the daemon and run one async call to completion."""
    client = DaemonClient.discover(paths, timeout_s=timeout_s)

    async def run() -> T:
        async with client:
            return await fn(client)

    return asyncio.run(run())


def ask_sync(
    fn: Callable[[DaemonClient], Awaitable[T]],
    paths: RuntimePaths | None = None,
    *,
    timeout_s: float = 120.0,
) -> T | None:
    """For the CLI: `fn`'s answer from the running daemon, or None when no daemon runs. A
    model that is loading (the daemon just started, or loads again after an idle unload) is
    waited for, up to `timeout_s`, as `codelm-daemon start` waits."""
    try:
        client = DaemonClient.discover(paths, timeout_s=timeout_s)
    except DaemonUnavailable:
        return None

    async def run() -> T:
        deadline = time.monotonic() + timeout_s
        async with client:
            while True:
                try:
                    return await fn(client)
                except errors.ModelLoading:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(LOADING_POLL_S)

    return asyncio.run(run())
