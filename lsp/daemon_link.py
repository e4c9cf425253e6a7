"""The LSP's link to the daemon: find it (or start it), follow its state, call it.

State changes go to a StatusSink once each (the server turns them into `codelm/status`
notifications, `window/workDoneProgress` while the model loads, and one `window/showMessage`
when the user must act). A daemon that dies is restarted once. The HTTP client
(codelm.daemon.client, hence aiohttp) is imported on first use, after `initialize`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Protocol

from codelm.daemon.errors import (
    CodelmError,
    DaemonUnavailable,
    ModelLoading,
    ServerError,
    Unauthorized,
)
from codelm.daemon.protocol import CompleteRequest, CompleteResponse

if TYPE_CHECKING:
    from codelm.daemon.client import DaemonClient
    from codelm.daemon.runtime import RuntimePaths

    from .settings import LspSettings

logger = logging.getLogger(__name__)

STATES = ("loading", "ready", "busy", "error", "disabled")
HEALTH_POLL_S = (0.05, 0.1, 0.2, 0.5)  # growing gaps between /health polls
START_TIMEOUT_S = 60.0  # process start until /health answers
RESTART_WINDOW_S = 600.0  # a lost daemon is restarted at most once in this long
LOAD_TIMEOUT_S = 300.0  # model load after that
RETRY_AFTER_S = 30.0  # after a failed start, completions wait this long before trying again
STOPPED_MESSAGE = (
    "the codelm daemon was stopped with `codelm-daemon stop`; `codelm-daemon start`, or a "
    "restart of the language server, resumes suggestions"
)
RESTARTING_MESSAGE = "the codelm daemon is restarting (`codelm-daemon restart`)"
# At least: completion.py drops answers sooner (settings.timeout_ms), unless the user set
# more, which the client then waits for too (_request_timeout_s).
REQUEST_TIMEOUT_S = 30.0
# A request that comes while the link comes up waits this long for it: finding a running
# daemon takes milliseconds, and an editor asks for its first suggestion as a file opens.
CONNECT_WAIT_S = 1.0
DEAD_LOCK_WAIT_S = 10.0  # how long a killed daemon's lock may outlive it


class StatusSink(Protocol):
    def status(self, state: str, message: str) -> None: ...
    async def progress(self, stage: str, message: str) -> None: ...  # begin|report|end
    def show(self, message: str, is_error: bool) -> None: ...


class DaemonLink(Protocol):
    """What completion.py and server.py need from the daemon."""

    state: str  # one of STATES, or "" before the first check

    def apply_settings(self, settings: LspSettings) -> None: ...
    def note_slow(self) -> None: ...
    async def close(self) -> None: ...


def health_state(body: dict[str, Any]) -> tuple[str, str]:
    """Map a /health answer to (ready|loading|error, message for the user)."""
    state = str(body.get("state", ""))
    model = body.get("model") or "the model"
    if state in ("loading", "unloaded"):
        progress = body.get("progress")
        percent = f" {progress:.0%}" if isinstance(progress, (int, float)) else ""
        return "loading", f"Loading {model}{percent}"
    if state in ("error", "stopped"):
        return "error", str(body.get("message") or f"the daemon is {state}")
    return "ready", f"codelm is ready ({model})"


class HttpDaemonLink:
    """DaemonLink over codelm.daemon.client: loopback HTTP with the daemon's bearer token."""

    def __init__(self, settings: LspSettings, sink: StatusSink, home: str | None) -> None:
        self.settings = settings
        self.sink = sink
        self.home = home
        self.state = ""
        self.restarts = 0
        self._restarted_at: float | None = None  # event loop time of the last restart
        self._client: DaemonClient | None = None
        self._ready = False
        self._starting: asyncio.Task[None] | None = None
        self._failed_at: float | None = None
        # The user stopped the daemon this session was using (`codelm-daemon stop`): start
        # none until a daemon starts elsewhere (D10).
        self._stopped = False
        self._noted_models: tuple[str, str] | None = None  # (served, wanted) said once
        self._noted_stale = False  # the daemon's code is not the installed code: said once
        self._closed = False  # after `shutdown`: nothing is started, restarted or said

    def _set_state(self, state: str, message: str) -> None:
        if state != self.state:
            logger.info("daemon state %s: %s", state, message)
            self.state = state
            self.sink.status(state, message)

    def apply_settings(self, settings: LspSettings) -> None:
        changed = (settings.daemon_url, settings.model) != (
            self.settings.daemon_url,
            self.settings.model,
        )
        moved = settings.daemon_url != self.settings.daemon_url
        self.settings = settings
        if self._client is not None:
            self._client.timeout_s = self._request_timeout_s()
        if not self.state:
            # Before `initialized` no notification may be sent (LSP); start_in_background
            # reports the state, "disabled" included.
            return
        if not settings.enabled:
            self._set_state("disabled", "codelm is disabled in the settings")
        elif self.state == "disabled" or changed:
            self._ready = False
            if moved and self._starting is not None and not self._starting.done():
                # It waits on the daemon the old url named, for up to LOAD_TIMEOUT_S.
                self._starting.cancel()
                self._starting = None
            self.start_in_background()

    def _request_timeout_s(self) -> float:
        """How long one call to the daemon may take: 30 s, or a little longer than the
        settings' timeoutMs where that is more (it goes up to 10 minutes)."""
        return max(REQUEST_TIMEOUT_S, self.settings.timeout_ms / 1000 + 5)

    def note_slow(self) -> None:
        self._set_state("busy", "the daemon is slow to answer")

    async def ensure_running(self) -> None:
        """Find or start the daemon and wait until its model is loaded (shared by callers)."""
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._bring_up())
        await asyncio.shield(self._starting)

    def start_in_background(self) -> None:
        if self._closed:
            return
        if not self.settings.enabled:
            self._set_state("disabled", "codelm is disabled in the settings")
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._bring_up())
            self._starting.add_done_callback(_log_failure)

    async def _bring_up(self) -> None:
        self._set_state("loading", "connecting to the codelm daemon")
        await self.sink.progress("begin", "Connecting to the codelm daemon")
        try:
            client = await self._connect()
            await self._check_token(client)
            ready_message = await self._wait_until_ready(client)
        except StoppedByUser:
            self._left_stopped()
            raise
        except CodelmError as exc:
            if self._failed_at is None:
                self.sink.show(f"codelm: {exc.message}", True)
            self._failed_at = asyncio.get_running_loop().time()
            self._set_state("error", exc.message)
            raise
        finally:
            await self.sink.progress("end", "")
        # "ready" only after the progress has ended: an editor that sees ready sees no spinner.
        self._set_state("ready", ready_message)
        self._ready = True
        self._failed_at = None

    async def _connect(self) -> DaemonClient:
        from codelm.daemon import client as daemon_client

        if self._client is not None:
            await self._client.close()
        self._client = None
        if self.settings.daemon_url:  # an explicit daemon: never started from here
            self._client = daemon_client.DaemonClient(
                self.settings.daemon_url, self._token(), timeout_s=self._request_timeout_s()
            )
            return self._client
        paths = self._paths()
        try:
            self._client = await _discover_live(paths, self._request_timeout_s())
            return self._client
        except DaemonUnavailable:
            if not self.settings.auto_start:
                raise
            mark = _stop_mark(paths)
            if self._stopped and mark:  # this session saw the stop
                message = RESTARTING_MESSAGE if mark == "restart" else STOPPED_MESSAGE
                raise StoppedByUser(message) from None
        await self.sink.progress("report", "Starting the codelm daemon")
        args = ["--model", self.settings.model] if self.settings.model else []
        await daemon_client.start_daemon(self.home, args=args, timeout_s=START_TIMEOUT_S)
        self._client = daemon_client.DaemonClient.discover(
            paths, timeout_s=self._request_timeout_s()
        )
        return self._client

    def _paths(self) -> RuntimePaths:
        from codelm.daemon.runtime import RuntimePaths

        return RuntimePaths.for_home(self.home)

    def _token(self) -> str:
        from codelm.daemon.runtime import read_daemon_info

        try:
            return read_daemon_info(self._paths()).token
        except DaemonUnavailable:
            return ""

    async def _check_token(self, client: DaemonClient) -> None:
        """/health answers without the token, so a daemon that refuses ours looked ready and
        answered 401 to every request, with nothing said: one call that needs it."""
        try:
            await client.models()
        except Unauthorized as exc:
            raise Unauthorized(self._refused_message(client.url)) from exc
        except DaemonUnavailable:
            raise
        except CodelmError as exc:  # not the token's fault: /health says the rest
            logger.debug("token check: %s", exc.message)

    def _refused_message(self, url: str) -> str:
        token_file = self._paths().token_file
        if not self.settings.daemon_url:  # the token came from that daemon's own folder
            return (
                f"the codelm daemon at {url} refused the token in {token_file}; it is read "
                f"again in {RETRY_AFTER_S:.0f} s"
            )
        if self._token():
            found = f"the one in {token_file} is another daemon's"
        else:
            started = f"with CODELM_HOME={self.home}" if self.home else "without CODELM_HOME"
            found = f"there is none at {token_file}, where a daemon started {started} writes it"
        return (
            f"the daemon at {url} (daemon.url) refused this language server's token: {found}. "
            "Set CODELM_HOME in the editor's environment to the folder that daemon was "
            "started with, so that its token file is found, or leave daemon.url empty to use "
            "the local daemon"
        )

    async def _wait_until_ready(self, client: DaemonClient) -> str:
        """Poll /health (progress while the model loads) until ready (its message) or failed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOAD_TIMEOUT_S
        woken = False
        for n in range(1_000_000):
            body = await client.health()
            if not woken and body.get("state") in ("unloaded", "error"):
                # Nothing loads an unloaded model but a request for it (and a failed load is
                # tried again once its file has changed): ask, once.
                woken = True
                body = await client.load()
            state, message = health_state(body)
            if state == "ready":
                self._note_other_model(body.get("model"))
                self._note_stale_code(body.get("code"))
                return message
            self._set_state(state, message)
            if state == "error":
                raise DaemonUnavailable(message)
            await self.sink.progress("report", message)
            if loop.time() > deadline:
                break
            await asyncio.sleep(HEALTH_POLL_S[min(n, len(HEALTH_POLL_S) - 1)])
        raise DaemonUnavailable(f"the model was not ready within {LOAD_TIMEOUT_S:.0f} s")

    async def complete(self, request: CompleteRequest) -> CompleteResponse:
        client = await self._ready_client()
        try:
            response = await client.complete(request)
        except ModelLoading:
            self._ready = False
            self.start_in_background()  # follows the load with progress
            raise
        except Unauthorized:
            # A restarted daemon has a new token: look it up again. One that still refuses
            # it is an error, said once and tried again after RETRY_AFTER_S (_check_token).
            self._ready = False
            self.start_in_background()
            raise
        except DaemonUnavailable as exc:
            if _is_connection_error(exc):
                self._on_lost(exc)
            raise
        except ServerError as exc:
            # The inference server `model` names is down or refused: say so until it answers.
            self._set_state("error", exc.message)
            raise
        if self.state in ("busy", "error"):
            self._set_state("ready", "codelm is ready")
        return response

    async def close_document(self, uri: str) -> None:
        if self._client is None or not self._ready:
            return
        with contextlib.suppress(CodelmError):
            await self._client.close_document(uri)

    async def _ready_client(self) -> DaemonClient:
        if self._client is not None and self._ready:
            return self._client
        starting = self._starting is not None and not self._starting.done()
        since_failure = asyncio.get_running_loop().time() - (self._failed_at or float("-inf"))
        if self._stopped:
            # Left stopped by the user: one read a request notices `codelm-daemon start`.
            mark = _stop_mark(self._paths())
            if mark == "restart":
                raise ModelLoading(RESTARTING_MESSAGE)
            if mark:
                raise DaemonUnavailable(STOPPED_MESSAGE)
            self._stopped = False
        elif not starting and since_failure < RETRY_AFTER_S:
            raise DaemonUnavailable("the codelm daemon is not available")
        # Not up yet: bring it up in the background, wait a moment for a daemon that is
        # already running, and answer with nothing while a model loads.
        self.start_in_background()
        if self._starting is not None:
            await asyncio.wait({self._starting}, timeout=CONNECT_WAIT_S)
        if self._client is not None and self._ready:
            return self._client
        raise ModelLoading("the codelm daemon is starting")

    def _on_lost(self, exc: BaseException) -> None:
        """The daemon went away: restart it, at most once in RESTART_WINDOW_S (a daemon
        that dies again at once is not restarted in a loop), else tell the user."""
        self._ready = False
        if self._closed:  # our own close cut the call short: the daemon is fine
            return
        logger.warning("lost the daemon: %s", exc)
        if self._starting is not None and not self._starting.done():
            return
        if not self.settings.daemon_url and _stop_mark(self._paths()):
            self._left_stopped()
            return
        if not self.settings.daemon_url and self._replaced():
            # Restarted (`codelm-daemon restart`, or a stop and a start) while this server
            # sent nothing: nothing unexpected, and nothing to start.
            logger.info("the daemon was restarted; connecting to the new one")
            self.start_in_background()
            return
        now = asyncio.get_running_loop().time()
        recent = self._restarted_at is not None and now - self._restarted_at < RESTART_WINDOW_S
        if self.settings.auto_start and not self.settings.daemon_url and not recent:
            self.restarts += 1
            self._restarted_at = now
            self.sink.show("The codelm daemon stopped unexpectedly; restarting it.", False)
            self.start_in_background()
            return
        message = "The codelm daemon stopped. See `codelm-daemon logs`, then `codelm-daemon start`."
        self._failed_at = asyncio.get_running_loop().time()
        self._set_state("error", message)
        self.sink.show(message, True)

    def _note_other_model(self, served: Any) -> None:
        """Say once when the daemon found running serves another model than the `model`
        setting, which applies only to a daemon codelm starts (the setting went unheeded in
        silence)."""
        wanted = self.settings.model
        if not wanted or self.settings.daemon_url or not isinstance(served, str):
            return
        if self._noted_models == (served, wanted) or _same_model(served, wanted):
            return
        self._noted_models = (served, wanted)
        self.sink.show(
            f"codelm: the running daemon serves {served}, not the `model` setting ({wanted}), "
            "which applies to a daemon codelm starts: `codelm-daemon stop`, then restart the "
            "language server",
            False,
        )

    def _note_stale_code(self, served: Any) -> None:
        """Say once when the daemon found running was started from other code than what is
        installed now: after an upgrade it went on serving the old code in silence."""
        from codelm.daemon.runtime import STALE_CODE_MESSAGE, code_stamp, runs_other_code

        if self._noted_stale or self.settings.daemon_url or not runs_other_code(served):
            return
        self._noted_stale = True
        logger.warning("the daemon runs code %s; installed now: %s", served, code_stamp())
        self.sink.show(f"codelm: {STALE_CODE_MESSAGE}", False)

    def _replaced(self) -> bool:
        """Whether another daemon than the one this server used runs now."""
        from codelm.daemon.runtime import read_daemon_info

        try:
            running = read_daemon_info(self._paths())
        except DaemonUnavailable:
            return False
        return self._client is not None and running.url != self._client.url

    def _left_stopped(self) -> None:
        """The user stopped the daemon: say so once, start nothing until they start it. Or
        `codelm-daemon restart` did, which starts the next one itself: wait for it quietly."""
        restarting = _stop_mark(self._paths()) == "restart"
        if not self._stopped and not restarting:
            self.sink.show(f"codelm: {STOPPED_MESSAGE}", False)
        self._stopped = True
        if restarting:
            self._set_state("loading", RESTARTING_MESSAGE)
        else:
            self._set_state("disabled", STOPPED_MESSAGE)

    async def close(self) -> None:
        self._closed = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        if self._client is not None:
            await self._client.close()


async def _discover_live(paths: RuntimePaths, timeout_s: float) -> DaemonClient:
    """The running daemon's client, checked with /health. A daemon that was just killed can
    leave its files and, for a moment, its lock behind: then wait for the lock to go and
    raise DaemonUnavailable, so the caller starts a new one instead of reusing a dead port."""
    from codelm.daemon import client as daemon_client
    from codelm.daemon.runtime import is_lock_held

    client = daemon_client.DaemonClient.discover(paths, timeout_s=timeout_s)
    try:
        await client.health()
        return client
    except DaemonUnavailable:
        await client.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEAD_LOCK_WAIT_S
        while is_lock_held(paths) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        raise


class StoppedByUser(DaemonUnavailable):
    """No daemon runs because the user stopped it: not started from here."""


def _same_model(served: str, wanted: str) -> bool:
    """Whether two `--model` values name one file ("default" and the default's name do)."""
    from codelm.daemon.catalog import resolve_model_path

    try:
        return resolve_model_path(served).resolve() == resolve_model_path(wanted).resolve()
    except (CodelmError, OSError):  # not fetched, not there: only the names can tell
        return served == wanted


def _stop_mark(paths: RuntimePaths) -> str | None:
    from codelm.daemon.runtime import stop_mark

    return stop_mark(paths)


def _is_connection_error(exc: BaseException) -> bool:
    """DaemonUnavailable raised because nothing answered (vs. the daemon saying it is busy)."""
    import aiohttp

    return isinstance(exc.__cause__, aiohttp.ClientConnectionError)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.warning("the daemon did not come up: %s", exc)
