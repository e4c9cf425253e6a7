"""The LSP's link to the daemon: find it (or start it), follow its state, call it.

State changes go to a StatusSink once each (the server turns them into `codelm/status`
notifications, `window/workDoneProgress` while the model loads, and one `window/showMessage`
when the user must act). A daemon that dies is restarted once. aiohttp is imported on first
use, after `initialize` has been answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from codelm.daemon.errors import (
    Cancelled,
    CodelmError,
    DaemonUnavailable,
    ModelLoading,
)
from codelm.daemon.protocol import CompleteRequest, CompleteResponse

if TYPE_CHECKING:
    import aiohttp

    from .settings import LspSettings

logger = logging.getLogger(__name__)

STATES = ("loading", "ready", "busy", "error", "disabled")
HEALTH_POLL_S = (0.05, 0.1, 0.2, 0.5)  # growing gaps between /health polls
START_TIMEOUT_S = 120.0  # process start + model load
RETRY_AFTER_S = 30.0  # after a failed start, completions wait this long before trying again


class StatusSink(Protocol):
    def status(self, state: str, message: str) -> None: ...
    async def progress(self, stage: str, message: str) -> None: ...  # begin|report|end
    def show(self, message: str, is_error: bool) -> None: ...


class DaemonLink(Protocol):
    """What completion.py and server.py need from the daemon."""

    state: str  # one of STATES, or "" before the first check

    def apply_settings(self, settings: LspSettings) -> None: ...
    def start_in_background(self) -> None: ...
    async def complete(self, request: CompleteRequest) -> CompleteResponse: ...
    async def close_document(self, uri: str) -> None: ...
    async def ensure_running(self) -> None: ...
    def note_timeout(self) -> None: ...
    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str
    token: str


def discover(settings: LspSettings, home: str | None) -> Endpoint | None:
    """The daemon's url and token: the configured url, else the runtime dir's files."""
    from codelm.daemon.runtime import RuntimePaths, read_daemon_info

    paths = RuntimePaths.for_home(home)
    try:
        info = read_daemon_info(paths)
    except DaemonUnavailable as exc:
        logger.debug("no daemon found: %s", exc.message)
        if settings.daemon_url is None:
            return None
        return Endpoint(settings.daemon_url, "")
    return Endpoint(settings.daemon_url or info.url, info.token)


def daemon_start_command(settings: LspSettings) -> list[str]:
    """`codelm-daemon start [--model M]`, run with this interpreter (same install)."""
    cmd = [sys.executable, "-c", "import sys; from codelm.daemon.cli import main; sys.exit(main())"]
    cmd.append("start")
    if settings.model:
        cmd += ["--model", settings.model]
    return cmd


class HttpDaemonLink:
    """DaemonLink over loopback HTTP with the daemon's bearer token."""

    def __init__(self, settings: LspSettings, sink: StatusSink, home: str | None) -> None:
        self.settings = settings
        self.sink = sink
        self.home = home
        self.state = ""
        self.restarts = 0
        self._endpoint: Endpoint | None = None
        self._session: aiohttp.ClientSession | None = None
        self._starting: asyncio.Task[None] | None = None
        self._failed_at: float | None = None

    def _set_state(self, state: str, message: str) -> None:
        if state != self.state:
            logger.info("daemon state %s: %s", state, message)
            self.state = state
            self.sink.status(state, message)

    def apply_settings(self, settings: LspSettings) -> None:
        self.settings = settings
        if not settings.enabled:
            self._set_state("disabled", "codelm is disabled in the settings")
        elif self.state == "disabled":
            self.state = ""
            self.start_in_background()

    def note_timeout(self) -> None:
        self._set_state("busy", "the daemon is slow to answer")

    async def ensure_running(self) -> None:
        """Find or start the daemon and wait until its model is loaded (shared by callers)."""
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._bring_up())
        await asyncio.shield(self._starting)

    def start_in_background(self) -> None:
        if not self.settings.enabled:
            self._set_state("disabled", "codelm is disabled in the settings")
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._bring_up())
            self._starting.add_done_callback(_log_failure)

    async def _bring_up(self) -> None:
        self._set_state("loading", "connecting to the codelm daemon")
        await self.sink.progress("begin", "Starting codelm")
        try:
            endpoint = discover(self.settings, self.home)
            if endpoint is None or not await self._is_alive(endpoint):
                if not self.settings.auto_start or self.settings.daemon_url:
                    raise DaemonUnavailable(
                        "the codelm daemon is not running; start it with `codelm-daemon start`"
                    )
                endpoint = await self._start_daemon()
            await self._wait_until_ready(endpoint)
        except CodelmError as exc:
            if self._failed_at is None:
                self.sink.show(f"codelm: {exc.message}", True)
            self._failed_at = asyncio.get_running_loop().time()
            self._set_state("error", exc.message)
            raise
        finally:
            await self.sink.progress("end", "")
        self._endpoint = endpoint
        self._failed_at = None
        self._set_state("ready", "codelm is ready")

    async def _start_daemon(self) -> Endpoint:
        await self.sink.progress("report", "Starting the codelm daemon")
        cmd = daemon_start_command(self.settings)
        logger.info("starting the daemon: %s", " ".join(cmd[:1] + cmd[3:]))
        env = dict(os.environ)
        if self.home:
            env["CODELM_HOME"] = self.home
        # stdout is the LSP protocol: the daemon must never inherit it.
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        _, stderr = await proc.communicate()
        if proc.returncode != 0:
            message = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            logger.warning("codelm-daemon start exited with %s: %s", proc.returncode, stderr)
            raise DaemonUnavailable(f"could not start the codelm daemon: {message[0]}")
        return await self._wait_for_endpoint()

    async def _wait_for_endpoint(self) -> Endpoint:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        for n in range(1_000_000):
            endpoint = discover(self.settings, self.home)
            if endpoint is not None:
                return endpoint
            if loop.time() > deadline:
                break
            await asyncio.sleep(HEALTH_POLL_S[min(n, len(HEALTH_POLL_S) - 1)])
        raise DaemonUnavailable("the codelm daemon started but never published its address")

    async def _wait_until_ready(self, endpoint: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        for n in range(1_000_000):
            state, message = await self._health(endpoint)
            if state == "ready":
                return
            if state == "error":
                raise DaemonUnavailable(message)
            await self.sink.progress("report", message)
            self._set_state("loading", message)
            if loop.time() > deadline:
                break
            await asyncio.sleep(HEALTH_POLL_S[min(n, len(HEALTH_POLL_S) - 1)])
        raise DaemonUnavailable(f"the codelm daemon was not ready within {START_TIMEOUT_S:.0f} s")

    async def _is_alive(self, endpoint: Endpoint) -> bool:
        state, _ = await self._health(endpoint)
        return state != "down"

    async def _health(self, endpoint: Endpoint) -> tuple[str, str]:
        """(ready|loading|error|down, message) from GET /health."""
        import aiohttp

        try:
            async with self._http().get(
                f"{endpoint.url}/health", headers=_auth(endpoint), timeout=aiohttp.ClientTimeout(2)
            ) as resp:
                body = await _json(resp)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return "down", f"the daemon does not answer ({exc.__class__.__name__})"
        return health_state(resp.status, body)

    def _http(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def complete(self, request: CompleteRequest) -> CompleteResponse:
        endpoint = await self._ready_endpoint()
        body = await self._post(endpoint, "/v1/complete", request.to_json())
        if self.state == "busy":
            self._set_state("ready", "codelm is ready")
        return CompleteResponse.from_json(body)

    async def close_document(self, uri: str) -> None:
        if self._endpoint is None:
            return
        with contextlib.suppress(CodelmError):
            await self._post(self._endpoint, "/v1/documents/close", {"uri": uri})

    async def _ready_endpoint(self) -> Endpoint:
        if self._endpoint is not None:
            return self._endpoint
        # Not up yet: start it in the background and answer this request with nothing.
        failed_at = self._failed_at
        if failed_at is not None and asyncio.get_running_loop().time() - failed_at < RETRY_AFTER_S:
            raise DaemonUnavailable("the codelm daemon is not available")
        self.start_in_background()
        raise ModelLoading("the codelm daemon is starting")

    async def _post(self, endpoint: Endpoint, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import aiohttp

        try:
            async with self._http().post(
                f"{endpoint.url}{path}", json=body, headers=_auth(endpoint)
            ) as resp:
                answer = await _json(resp)
        except aiohttp.ClientConnectionError as exc:
            self._on_lost(exc)
            raise DaemonUnavailable("the codelm daemon is not reachable") from exc
        if resp.status == 401:  # a restarted daemon has a new token: look it up again
            self._endpoint = None
        if resp.status >= 400:
            raise _error_from(resp.status, answer)
        return answer

    def _on_lost(self, exc: BaseException) -> None:
        """The daemon went away: restart it once, then tell the user."""
        logger.warning("lost the daemon: %s", exc)
        self._endpoint = None
        if self._starting is not None and not self._starting.done():
            return
        if self.settings.auto_start and self.restarts == 0:
            self.restarts += 1
            self.sink.show("The codelm daemon stopped unexpectedly; restarting it.", False)
            self.start_in_background()
            return
        message = (
            "The codelm daemon stopped. Check `codelm-daemon logs`, then `codelm-daemon start`."
        )
        self._set_state("error", message)
        self.sink.show(message, True)

    async def close(self) -> None:
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        if self._session is not None:
            await self._session.close()


def health_state(status: int, body: dict[str, Any]) -> tuple[str, str]:
    """Map a /health answer to (ready|loading|error, message)."""
    state = str(body.get("state") or body.get("status") or "")
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    message = str(body.get("message") or error.get("message") or state or status)
    if status == 503 or state in ("loading", "starting"):
        return "loading", f"Loading model {body.get('model') or ''}".strip()
    if status >= 400 or state in ("error", "failed"):
        return "error", message
    return "ready", message


def _error_from(status: int, body: dict[str, Any]) -> CodelmError:
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    code = error.get("code", "")
    message = str(error.get("message") or f"HTTP {status}")
    if code == "cancelled":
        return Cancelled(message)
    if code == "model_loading":
        return ModelLoading(message)
    err = CodelmError(message)
    err.code, err.status = code or "http_error", status
    return err


async def _json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await resp.json(content_type=None)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _auth(endpoint: Endpoint) -> dict[str, str]:
    return {"Authorization": f"Bearer {endpoint.token}"} if endpoint.token else {}


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.warning("the daemon did not come up: %s", exc)
