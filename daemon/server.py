"""Run the daemon in this process: take the instance lock, bind loopback, publish url and token,
serve until POST /shutdown or SIGTERM/SIGINT, then clean up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from .config import DaemonConfig
from .errors import CodelmError, Conflict
from .runtime import InstanceLock, new_token, publish_endpoint
from .scheduler import Scheduler
from .service import INFO, SHUTDOWN, create_app

logger = logging.getLogger(__name__)


class BindError(CodelmError):
    code = "bind_error"
    status = 500


def run_server(config: DaemonConfig, on_ready: Callable[[str], None] | None = None) -> int:
    """Serve until shut down; returns an exit code. `on_ready(url)` is called once listening.

    Raises Conflict when another daemon holds the lock and BindError when the port is taken.
    """
    return asyncio.run(_serve(config, on_ready))


async def _serve(config: DaemonConfig, on_ready: Callable[[str], None] | None) -> int:
    token = new_token()
    scheduler = Scheduler(
        config.engine, idle_unload_s=config.idle_unload_s, max_pending=config.max_pending
    )
    app = create_app(config, scheduler, token=token)
    # The lock is taken first and released last: a second daemon is refused before binding.
    app.cleanup_ctx.insert(0, _instance_ctx(config))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        sock, url, port = _bind(config)
        await web.SockSite(runner, sock).start()
        publish_endpoint(config.paths, url, port, token)
        app[INFO]["url"] = url
        logger.info("listening on %s (pid %d, model %s)", url, os.getpid(), config.engine.model)
        if on_ready is not None:
            on_ready(url)
        _install_signal_handlers(app[SHUTDOWN])
        await app[SHUTDOWN].wait()
        logger.info("shutting down")
    finally:
        await runner.cleanup()
    return 0


def _instance_ctx(config: DaemonConfig) -> Callable[[web.Application], AsyncIterator[None]]:
    async def instance_files(app: web.Application) -> AsyncIterator[None]:
        lock = InstanceLock(config.paths)
        lock.acquire()
        watch = asyncio.create_task(_watch_lock(lock, app[SHUTDOWN]))
        try:
            yield
        finally:
            watch.cancel()
            # The socket goes before the lock: `stop` returns once the lock is free, and must
            # find no socket left (the sites stopped listening before this cleanup).
            if config.unix_socket and _is_socket(config.unix_socket):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(config.unix_socket)
            lock.release()

    return instance_files


LOCK_CHECK_S = 5.0


async def _watch_lock(lock: InstanceLock, shutdown: asyncio.Event) -> None:
    """Stop when the lock file is no longer this daemon's: its runtime folder was deleted
    (by hand, or at logout). No client can find the daemon any more, and the next start
    would load a second model beside it."""
    while True:
        await asyncio.sleep(LOCK_CHECK_S)
        if not lock.holds_the_lock_file():
            logger.warning(
                "the runtime folder %s was removed: no client can find this daemon; stopping",
                lock.paths.runtime_dir,
            )
            shutdown.set()
            return


def _bind(config: DaemonConfig) -> tuple[socket.socket, str, int | None]:
    """Bind the listening socket ourselves so the OS-picked port is known before serving."""
    if config.unix_socket:
        path = config.unix_socket
        if os.path.lexists(path):
            if not _is_socket(path):  # never remove what the user wrote
                raise BindError(
                    f"unix_socket {path} exists and is not a socket; name a path that does not "
                    "exist yet (or remove that file)"
                )
            os.unlink(path)  # a stale socket: we hold the instance lock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o077)
        try:
            sock.bind(path)  # created owner-only under the umask: no window for other users
        except OSError as exc:  # a missing folder, a path too long for a socket
            sock.close()
            raise BindError(f"cannot listen on unix socket {path} ({exc})") from exc
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        return sock, f"unix:{path}", None
    host = "127.0.0.1" if config.host == "localhost" else config.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, config.port))
    except OSError as exc:
        sock.close()
        raise BindError(
            f"cannot listen on {host}:{config.port} ({exc.strerror}); "
            "pick another port with --port or CODELM_PORT, or 0 for any free port"
        ) from exc
    port = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    return sock, f"http://{shown}:{port}", port


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _install_signal_handlers(shutdown: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shutdown.set)


__all__ = ["BindError", "Conflict", "run_server"]
