"""Where the daemon keeps its files (platformdirs, or one CODELM_HOME folder) and the
single-instance lock, pid, url/port and token files that clients read to find it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from .errors import ConfigError, Conflict, DaemonUnavailable

logger = logging.getLogger(__name__)

APP_NAME = "codelm"
LOCK_RETRIES = 5
LOCK_RETRY_S = 0.05


@dataclass(frozen=True, kw_only=True, slots=True)
class RuntimePaths:
    """Folders the daemon uses; file names are derived properties."""

    runtime_dir: Path
    log_dir: Path
    data_dir: Path
    cache_dir: Path
    config_dir: Path

    @classmethod
    def for_home(cls, home: str | os.PathLike[str] | None) -> RuntimePaths:
        """Everything under `home` when given (CODELM_HOME), else the platformdirs user dirs."""
        if home:
            base = Path(home).expanduser().resolve()
            return cls(
                runtime_dir=base / "run",
                log_dir=base / "log",
                data_dir=base / "data",
                cache_dir=base / "cache",
                config_dir=base / "config",
            )
        try:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset and falls back to
                # /tmp/runtime-UID.
                warnings.simplefilter("ignore")
                runtime_dir = platformdirs.user_runtime_dir(APP_NAME)
            return cls(
                runtime_dir=Path(runtime_dir),
                log_dir=Path(platformdirs.user_log_dir(APP_NAME)),
                data_dir=Path(platformdirs.user_data_dir(APP_NAME)),
                cache_dir=Path(platformdirs.user_cache_dir(APP_NAME)),
                config_dir=Path(platformdirs.user_config_dir(APP_NAME)),
            )
        except RuntimeError as exc:  # no HOME and a user id with no passwd entry (containers)
            raise ConfigError(
                f"cannot tell where codelm's files go ({exc}); set HOME, or CODELM_HOME to "
                "a folder for them"
            ) from None

    @property
    def lock_file(self) -> Path:
        return self.runtime_dir / "daemon.lock"

    @property
    def pid_file(self) -> Path:
        return self.runtime_dir / "daemon.pid"

    @property
    def port_file(self) -> Path:
        return self.runtime_dir / "daemon.port"

    @property
    def url_file(self) -> Path:
        return self.runtime_dir / "daemon.url"

    @property
    def token_file(self) -> Path:
        return self.runtime_dir / "daemon.token"

    @property
    def socket_file(self) -> Path:
        return self.runtime_dir / "daemon.sock"

    @property
    def stopped_file(self) -> Path:
        """Left by `codelm-daemon stop`, removed by the next daemon's start: while it is there,
        editors do not start a daemon of their own (mark_stopped)."""
        return self.runtime_dir / "daemon.stopped"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "daemon.log"

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    def ensure_dirs(self) -> None:
        """Create the folders; the runtime folder is private (0700) since it holds the token.
        ConfigError names a folder that cannot be made (a file in the way, read-only), or a
        log file that cannot be appended to (a folder in its place, a read-only file)."""
        for path in (self.log_dir, self.data_dir, self.cache_dir, self.runtime_dir):
            private = path == self.runtime_dir
            try:
                path.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
                if private:
                    os.chmod(path, 0o700)
            except OSError as exc:
                raise ConfigError(
                    f"cannot create the folder {path} ({exc.strerror}); make it writable, or "
                    "set CODELM_HOME to a writable folder"
                ) from exc
        try:
            with self.log_file.open("ab"):
                pass
        except OSError as exc:
            raise ConfigError(
                f"cannot write the log file {self.log_file} ({exc.strerror}); move what is "
                "there away, or set CODELM_HOME to a writable folder"
            ) from exc


@dataclass(frozen=True, kw_only=True, slots=True)
class DaemonInfo:
    """What a client needs to reach the running daemon."""

    pid: int
    url: str
    token: str
    token_file: Path


class InstanceLock:
    """An exclusive flock on the lock file, held for the daemon's lifetime.

    The kernel drops it when the process dies (even on kill -9), which is what makes a
    leftover pid file detectably stale.
    """

    def __init__(self, paths: RuntimePaths) -> None:
        self.paths = paths
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise Conflict naming the running daemon."""
        self.paths.ensure_dirs()
        fd = os.open(self.paths.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        # A client probing the lock (is_daemon_alive) holds it for microseconds: retry briefly.
        for attempt in range(LOCK_RETRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or attempt == LOCK_RETRIES - 1:
                    os.close(fd)
                    pid = _read_int(self.paths.pid_file)
                    raise Conflict(
                        f"a codelm daemon is already running (pid {pid or 'unknown'}); "
                        "stop it with `codelm-daemon stop`"
                    ) from exc
                time.sleep(LOCK_RETRY_S)
        self._fd = fd
        remove_daemon_files(self.paths)
        with contextlib.suppress(FileNotFoundError):
            self.paths.stopped_file.unlink()  # started again: editors may start it too
        write_private(self.paths.pid_file, f"{os.getpid()}\n")

    def release(self) -> None:
        if self._fd is None:
            return
        if self.holds_the_lock_file():
            remove_daemon_files(self.paths)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def holds_the_lock_file(self) -> bool:
        """Whether the lock file at its path is still ours: after the runtime folder was
        deleted under a running daemon another may have started there, and its files are
        not this one's to remove."""
        try:
            return os.stat(self.paths.lock_file).st_ino == os.fstat(self._fd).st_ino
        except OSError:
            return False

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def is_lock_held(paths: RuntimePaths) -> bool:
    """True when some process holds the instance lock (a daemon is alive)."""
    try:
        fd = os.open(paths.lock_file, os.O_RDWR)
    except (FileNotFoundError, NotADirectoryError):  # no lock file there: no daemon
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def write_private(path: Path, text: str) -> None:
    """Write a 0600 file atomically (readers never see half a token)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def publish_endpoint(paths: RuntimePaths, url: str, port: int | None, token: str) -> None:
    """Write token, port and url files; the url file goes last since clients look for it."""
    write_private(paths.token_file, token + "\n")
    if port is not None:
        write_private(paths.port_file, f"{port}\n")
    write_private(paths.url_file, url + "\n")


def remove_daemon_files(paths: RuntimePaths) -> None:
    """Remove pid/port/url/token/socket files (the lock file stays: it is only a lock)."""
    for path in (
        paths.url_file,
        paths.port_file,
        paths.token_file,
        paths.pid_file,
        paths.socket_file,
    ):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def mark_stopped(paths: RuntimePaths, restarting: bool = False) -> None:
    """Record that the user stopped the daemon (`codelm-daemon stop`), so a connected editor
    does not start it again behind their back; the next daemon's start removes the mark.
    `restarting`: stopped by `codelm-daemon restart`, which starts the next one at once (an
    editor that started one meanwhile would win the race and pick its own settings)."""
    with contextlib.suppress(OSError):  # no runtime folder: nothing ran, nothing to keep off
        paths.stopped_file.write_text(f"{'restart' if restarting else 'stop'} {time.time():.0f}\n")


def stop_mark(paths: RuntimePaths) -> str | None:
    """How the last daemon was stopped, where none has started since: "stop" (by the user;
    also a mark of an older version) or "restart"; None where it was not."""
    try:
        text = paths.stopped_file.read_text()
    except OSError:  # none, or not a file
        return None
    return "restart" if text.startswith("restart") else "stop"


def stopped_by_user(paths: RuntimePaths) -> bool:
    """Whether the last daemon was stopped with `codelm-daemon stop` and none started since."""
    return stop_mark(paths) == "stop"


def cleanup_stale(paths: RuntimePaths) -> bool:
    """Remove files left by a daemon that died without cleaning up; True if there were some."""
    if is_lock_held(paths):
        return False
    stale = paths.pid_file.exists() or paths.url_file.exists()
    if stale:
        logger.info("removing stale daemon files (pid %s)", _read_int(paths.pid_file))
        remove_daemon_files(paths)
    return stale


def read_daemon_info(paths: RuntimePaths) -> DaemonInfo:
    """The running daemon's pid, url and token; DaemonUnavailable when none is running."""
    if not is_lock_held(paths):
        if cleanup_stale(paths):
            raise DaemonUnavailable("the codelm daemon died; start it with `codelm-daemon start`")
        raise DaemonUnavailable("the codelm daemon is not running; start it: codelm-daemon start")
    pid = _read_int(paths.pid_file)
    try:
        url = paths.url_file.read_text().strip()
        token = paths.token_file.read_text().strip()
    except FileNotFoundError as exc:
        raise DaemonUnavailable("the codelm daemon is starting; try again in a moment") from exc
    if pid is None or not url or not token:
        raise DaemonUnavailable("the codelm daemon is starting; try again in a moment")
    return DaemonInfo(pid=pid, url=url, token=token, token_file=paths.token_file)


def read_pid(paths: RuntimePaths) -> int | None:
    """The pid of the daemon holding the lock, or None when no daemon is alive."""
    return _read_int(paths.pid_file) if is_lock_held(paths) else None


def is_process_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, its parent yet to reap it) runs no more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # Linux: the state follows the parenthesised name, which may hold any character
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill() said it exists
    return state not in ("Z", "X")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


# The package's folders whose code a daemon runs (Python, and the native kernels' source).
_PACKAGE = Path(__file__).resolve().parent.parent
_CODE_FOLDERS = ("daemon", "quant")
_CODE_SUFFIXES = (".py", ".c")


def code_stamp(package: Path = _PACKAGE) -> str:
    """A hash of codelm's code as installed now (its files' names and contents, ~5 ms). A
    daemon keeps the one it started with, so a client can tell that the daemon runs code
    other than what is installed: after an upgrade it went on serving the old code, as long
    as it ran, with nothing said."""
    digest = hashlib.sha256()
    files: list[Path] = []
    for folder in _CODE_FOLDERS:
        files += sorted(p for p in (package / folder).rglob("*") if p.suffix in _CODE_SUFFIXES)
    for path in files:
        with contextlib.suppress(OSError):
            digest.update(f"{path.relative_to(package)}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def runs_other_code(code: object) -> bool:
    """Whether a daemon that reported `code` (its code_stamp when it started; None from a
    daemon older than the field) runs other code than what is installed now."""
    return isinstance(code, str) and code != code_stamp()


STALE_CODE_MESSAGE = (
    "the installed codelm has changed since the running daemon started, and the daemon "
    "still runs the code it started with: `codelm-daemon restart`"
)


def trim_heap() -> None:
    """Give the system back the heap pages glibc keeps after frees (malloc_trim); nothing
    where the C library has none (musl, macOS)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def resident_mb() -> float | None:
    """This process's resident memory in MB, where /proc tells (Linux), else None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
