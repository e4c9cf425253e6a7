"""`codelm-daemon`: start | stop | status | logs | complete | prompt | models.

The only module that parses arguments, sets up logging handlers and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import (
    CHOICES,
    DaemonConfig,
    daemon_environment,
    resolve_config,
    resolve_paths,
)
from .errors import CodelmError, DaemonUnavailable
from .protocol import MAX_TIME_MS_LIMIT, MAX_TOKENS_LIMIT
from .runtime import (
    STALE_CODE_MESSAGE,
    RuntimePaths,
    cleanup_stale,
    mark_stopped,
    read_daemon_info,
    read_pid,
    runs_other_code,
    stopped_by_user,
)

logger = logging.getLogger(__name__)

PROG = "codelm-daemon"
EXIT_NOT_RUNNING = 3  # `status` when no daemon runs (as in LSB init scripts)
LOG_ROTATE_BYTES = 10 * 1024 * 1024
STOP_TIMEOUT_S = 10.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not hasattr(args, "func"):
        build_parser().print_help(sys.stderr)
        return 2
    if not (args.func is cmd_start and args.foreground):
        _setup_client_logging(args.verbose)
    try:
        return int(args.func(args))
    except CodelmError as exc:
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `status --json | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; `-v` counts both before and after the subcommand."""
    args = build_parser().parse_args(argv)
    args.verbose += getattr(args, "sub_verbose", 0)
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="The codelm completion daemon.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv)")
    common = argparse.ArgumentParser(add_help=False)
    # A subcommand parses into its own namespace: count its -v apart, then add (parse_args).
    common.add_argument("-v", "--verbose", action="count", default=0, dest="sub_verbose")
    engine = argparse.ArgumentParser(add_help=False)
    engine.add_argument("--model", help="default, a catalogue name, a .gguf file or an HF folder")
    engine.add_argument("--device", choices=CHOICES["device"])
    engine.add_argument("--quant", choices=CHOICES["quant"])
    launch = argparse.ArgumentParser(add_help=False)  # what `start` and `restart` start with
    launch.add_argument("--port", type=int, help="TCP port on 127.0.0.1 (0: any free port)")
    launch.add_argument(
        "--wait",
        type=_seconds,
        default=300.0,
        metavar="S",
        help="wait up to S seconds for the model to load (0: return once the socket answers)",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    start = sub.add_parser("start", parents=[common, engine, launch], help="start the daemon")
    start.add_argument("--foreground", action="store_true", help="run in this process")
    start.set_defaults(func=cmd_start)

    stop = sub.add_parser("stop", parents=[common], help="stop the running daemon")
    stop.set_defaults(func=cmd_stop)

    restart = sub.add_parser(
        "restart",
        parents=[common, engine, launch],
        help="stop the running daemon and start it again with its model, device, quant and port",
    )
    restart.set_defaults(func=cmd_restart, foreground=False)

    status = sub.add_parser("status", parents=[common], help="state, model and statistics")
    status.add_argument("--json", action="store_true", help="print the full status as JSON")
    status.set_defaults(func=cmd_status)

    logs = sub.add_parser("logs", parents=[common], help="print the daemon's log")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--lines", type=_count, default=50, help="lines to show (default 50)")
    logs.set_defaults(func=cmd_logs)

    _add_engine_commands(sub, common, engine)
    return parser


def _add_engine_commands(sub: Any, common: Any, engine: Any) -> None:
    """complete, prompt and models: implemented in commands.py."""
    for name, text in (("complete", "print the suggestion"), ("prompt", "print the prompt")):
        cmd = sub.add_parser(name, parents=[common, engine], help=f"{text} at FILE:LINE:COL")
        cmd.add_argument("location", help="FILE:LINE:COL, 1-based like compiler messages")
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
        cmd.add_argument("--no-daemon", action="store_true", help="load the engine in-process")
        if name == "complete":
            cmd.add_argument(
                "--max-tokens",
                type=_one_to(MAX_TOKENS_LIMIT),
                default=64,
                help="1 to 1024, default 64",
            )
            cmd.add_argument(
                "--max-time-ms",
                type=_one_to(MAX_TIME_MS_LIMIT),
                default=None,
                help="stop decoding after this many ms (1 to 600000; default: no limit)",
            )
        cmd.set_defaults(func=_lead_command(f"run_{name}"))

    models = sub.add_parser("models", parents=[common], help="list or fetch catalogue models")
    models.add_argument("action", choices=("list", "fetch"), nargs="?", default="list")
    models.add_argument(
        "name", nargs="?", help="a catalogue model (fetch: `default` if none; list: all if none)"
    )
    models.add_argument("--force", action="store_true", help="fetch again even if present")
    models.set_defaults(func=_lead_command("run_models"))


def _one_to(limit: int) -> Callable[[str], int]:
    """An option's type: a whole number from 1 to `limit`, as the daemon takes it
    (--max-tokens, --max-time-ms; in-process runs took any number)."""

    def parse(text: str) -> int:
        if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= limit:
            raise argparse.ArgumentTypeError(f"must be 1 to {limit}, got {text!r}")
        return int(text)

    return parse


def _seconds(text: str) -> float:
    """--wait: a finite number of seconds, 0 or more (nan returned at once, inf never)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, got {text!r}")
    return value


def _count(text: str) -> int:
    """--lines: 0 or more (a negative count printed nothing, and said nothing)."""
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return int(text)


def _lead_command(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        from . import commands

        return int(getattr(commands, name)(args))

    return run


# -- start --


def cmd_start(args: argparse.Namespace) -> int:
    overrides = {"model": args.model, "device": args.device, "quant": args.quant, "port": args.port}
    if args.verbose:
        overrides["log_level"] = "DEBUG"
    config = resolve_config(overrides)
    if args.foreground:
        return _run_foreground(config)
    return _daemonize(config, args)


def _run_foreground(config: DaemonConfig) -> int:
    from .server import run_server

    config.paths.ensure_dirs()
    _setup_daemon_logging(config)

    def on_ready(url: str) -> None:
        if sys.stdout.isatty():
            print(f"codelm daemon listening on {url} (pid {os.getpid()}); Ctrl-C stops it")

    try:
        return run_server(config, on_ready)
    except CodelmError as exc:
        logger.error("%s", exc.message)
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return 1


def _daemonize(config: DaemonConfig, args: argparse.Namespace) -> int:
    """Spawn `start --foreground` in a new session, detached from this terminal."""
    paths = config.paths
    pid = read_pid(paths)
    if pid is not None:
        print(f"{PROG}: a daemon is already running (pid {pid}); {_see(paths)}", file=sys.stderr)
        return 1
    cleanup_stale(paths)
    paths.ensure_dirs()
    _rotate_log(paths.log_file)
    command = [sys.executable, "-m", "codelm.daemon.cli", *["-v"] * args.verbose, "start"]
    command += ["--foreground", "--model", config.engine.model, "--port", str(config.port)]
    command += ["--device", config.engine.device, "--quant", config.engine.quant]
    with paths.log_file.open("ab") as log:
        # stdout/stderr go to the log: a crash before logging is set up still leaves a trace.
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd="/",
            env=daemon_environment(config),
        )
    try:
        health = _wait_for_socket(proc, paths, config.start_timeout_s)
        if health is None:
            return 1
        if args.wait > 0:
            health = _wait_for_model(paths, args.wait, health)
    except KeyboardInterrupt:  # the daemon runs in a session of its own: Ctrl-C left it be
        print(
            f"\n{PROG}: stopped waiting; the daemon (pid {proc.pid}) goes on starting in the "
            f"background: `{PROG} status` shows it, `{PROG} stop` stops it",
            file=sys.stderr,
        )
        return 130
    if args.wait > 0 and health.get("state") == "error":
        print(f"{PROG}: the model failed to load: {health.get('message')}", file=sys.stderr)
        print(f"{PROG}: log: {paths.log_file}", file=sys.stderr)
        _stop(paths)
        return 1
    info = read_daemon_info(paths)
    print(f"codelm daemon running: {info.url}")
    print(f"  pid:   {info.pid}")
    print(f"  model: {config.engine.model} ({_describe_state(health)})")
    print(f"  log:   {paths.log_file}")
    return 0


def _wait_for_socket(
    proc: subprocess.Popen[bytes], paths: RuntimePaths, timeout_s: float
) -> dict[str, Any] | None:
    """The first /health answer, or None after printing why the daemon did not come up."""
    from .client import DaemonClient, call_sync

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            if (other := read_pid(paths)) is not None and other != proc.pid:
                # Another `start` at the same moment won the instance lock.
                print(
                    f"{PROG}: a daemon is already running (pid {other}); see `{PROG} status`",
                    file=sys.stderr,
                )
                return None
            print(f"{PROG}: the daemon exited during start-up (code {code}):", file=sys.stderr)
            print(_tail(paths.log_file, 8), file=sys.stderr)
            print(f"{PROG}: full log: {paths.log_file}", file=sys.stderr)
            return None
        try:
            health = call_sync(DaemonClient.health, paths, timeout_s=2.0)
        except DaemonUnavailable:
            time.sleep(0.05)
            continue
        if read_pid(paths) == proc.pid:
            return health
        time.sleep(0.05)  # another start's daemon answered: this one is about to exit
    proc.terminate()
    print(f"{PROG}: the daemon did not answer within {timeout_s:.0f} s", file=sys.stderr)
    print(f"{PROG}: see the log: {paths.log_file}", file=sys.stderr)
    return None


def _wait_for_model(
    paths: RuntimePaths, timeout_s: float, health: dict[str, Any]
) -> dict[str, Any]:
    from .client import DaemonClient, call_sync

    deadline = time.monotonic() + timeout_s
    shown = ""
    while health.get("state") == "loading" and time.monotonic() < deadline:
        message = _describe_state(health)
        if sys.stderr.isatty() and message != shown:
            print(f"\r{message[:78]:78}", end="", file=sys.stderr, flush=True)
            shown = message
        time.sleep(0.1)
        health = call_sync(DaemonClient.health, paths, timeout_s=5.0)
    if shown:
        print(file=sys.stderr)
    return health


def _describe_state(health: dict[str, Any]) -> str:
    state = health.get("state", "unknown")
    if state == "loading":
        return f"loading {health.get('progress', 0.0):.0%}: {health.get('message', '')}"
    if state == "error":
        return f"error: {health.get('message', '')}"
    return str(state)


def _rotate_log(log_file: Path) -> None:
    try:
        if log_file.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(log_file, log_file.with_name(log_file.name + ".1"))
    except FileNotFoundError:
        pass


# -- stop / status / logs --


def cmd_stop(args: argparse.Namespace) -> int:
    paths = resolve_paths()
    pid = read_pid(paths)
    if pid is None:
        stale = cleanup_stale(paths)
        mark_stopped(paths)
        print("codelm daemon is not running" + (" (removed stale files)" if stale else ""))
        return 0
    _stop(paths)
    if read_pid(paths) is not None:
        print(f"{PROG}: the daemon (pid {pid}) did not stop", file=sys.stderr)
        return 1
    mark_stopped(paths)  # open editors leave it stopped until `start`
    print(f"codelm daemon stopped (pid {pid})")
    return 0


def _see(paths: RuntimePaths) -> str:
    """What to do about the daemon found running: `restart` where it runs other code than
    the installed (after an upgrade, `make start` found the old daemon and left it)."""
    from .client import DaemonClient, call_sync

    running: Any = None
    with contextlib.suppress(CodelmError):
        running = call_sync(DaemonClient.health, paths, timeout_s=2.0).get("code")
    if runs_other_code(running):
        return STALE_CODE_MESSAGE
    return f"see `{PROG} status`"


def cmd_restart(args: argparse.Namespace) -> int:
    """`stop`, then `start` with the running daemon's model, device, quant and port where the
    command line names none (the rest comes from config.toml and the environment, read
    again). The editors that use it wait meanwhile (mark_stopped) and reconnect."""
    from .client import DaemonClient, call_sync

    paths = resolve_paths()
    running: dict[str, Any] = {}
    # None runs (one is started as asked), or none answers (it is stopped all the same).
    with contextlib.suppress(DaemonUnavailable):
        running = call_sync(DaemonClient.status, paths, timeout_s=5.0).get("config", {})
    engine = running.get("engine", {})
    for name in ("model", "device", "quant"):
        if getattr(args, name) is None:
            setattr(args, name, engine.get(name))
    if args.port is None:
        args.port = running.get("port")
    pid = read_pid(paths)
    if pid is not None:
        mark_stopped(paths, restarting=True)  # open editors wait for the next daemon
        _stop(paths)
        if read_pid(paths) is not None:
            paths.stopped_file.unlink(missing_ok=True)  # the editors carry on with it
            print(f"{PROG}: the daemon (pid {pid}) did not stop", file=sys.stderr)
            return 1
        print(f"codelm daemon stopped (pid {pid})")
    started = cmd_start(args)
    if started != 0 and read_pid(paths) is None:
        mark_stopped(paths)  # none runs: the editors say it was stopped, not restarting
    return started


def _stop(paths: RuntimePaths) -> None:
    """Ask over HTTP, then SIGTERM, then SIGKILL; returns when the lock is free or all failed."""
    from .client import DaemonClient, call_sync

    pid = read_pid(paths)
    if pid is None:
        return
    try:
        call_sync(DaemonClient.shutdown, paths, timeout_s=5.0)
    except CodelmError as exc:
        logger.info("shutdown over HTTP failed (%s); sending SIGTERM", exc.message)
    for signum in (None, signal.SIGTERM, signal.SIGKILL):
        if signum is not None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                break
        if _wait_for_exit(paths, STOP_TIMEOUT_S if signum is None else 5.0):
            break
    cleanup_stale(paths)


def _wait_for_exit(paths: RuntimePaths, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if read_pid(paths) is None:
            return True
        time.sleep(0.05)
    return False


def cmd_status(args: argparse.Namespace) -> int:
    from .client import DaemonClient, call_sync

    paths = resolve_paths()
    try:
        status = call_sync(DaemonClient.status, paths, timeout_s=5.0)
    except DaemonUnavailable as exc:
        pid = read_pid(paths)
        state = "starting" if pid is not None else "stopped"
        message = exc.message
        if pid is not None and paths.url_file.exists():
            # It listened (the url is published once it does) and answers no more: stopped
            # with SIGSTOP or in a debugger, swapping, or hung.
            state = "not responding"
            message = (
                f"pid {pid} is running but did not answer within 5 s ({exc.message}); "
                f"`{PROG} stop` stops it, `{PROG} logs` may say why"
            )
        if pid is None and stopped_by_user(paths):
            message = (
                "stopped with `codelm-daemon stop`; the editors that were using it leave it "
                "stopped until `codelm-daemon start`"
            )
        status = {"state": state, "pid": pid, "message": message}
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        _print_status(status, paths)
    if status["state"] == "not responding":
        return 1
    return 0 if status["state"] != "stopped" else EXIT_NOT_RUNNING


def _print_status(status: dict[str, Any], paths: RuntimePaths) -> None:
    if status["state"] in ("stopped", "starting", "not responding"):
        print(f"codelm daemon: {status['state']} ({status.get('message', '')})")
        return
    requests = status.get("requests", {})
    latency = requests.get("latency_ms", {})
    cache = status.get("cache", {})
    print(f"codelm daemon: {_describe_state(status)}")
    print(f"  url:      {status.get('url')}  (pid {status.get('pid')})")
    print(f"  model:    {status.get('model')}  device {status.get('device')}")
    print(f"            quant {status.get('quant')}  up {status.get('uptime_s', 0):.0f} s")
    engine = status.get("engine", {})
    if engine.get("server_model"):
        print(f"            serves {engine['server_model']}  fim {engine.get('fim')}")
    if engine.get("quant_reason"):
        print(f"            why {engine['quant_reason']}")
    if engine.get("kernels"):
        print(f"            kernels {engine['kernels']}")
    if engine.get("decode_step"):
        print(f"            decode step {engine['decode_step']}  kv cache {engine.get('kv_cache')}")
    if memory := _memory_line(status, engine):
        print(f"  memory:   {memory}")
    print(
        f"  requests: {requests.get('requests', 0)} total, {requests.get('completed', 0)} done, "
        f"{requests.get('cancelled', 0)} cancelled, {requests.get('superseded', 0)} superseded, "
        f"{requests.get('errors', 0)} errors, {requests.get('warmed', 0)} warm-ups"
    )
    if latency.get("p50") is not None:  # none before the first completion
        print(
            f"  latency:  p50 {latency['p50']} ms, p90 {latency.get('p90')} ms, "
            f"p99 {latency.get('p99')} ms"
        )
    if last_error := requests.get("last_error"):
        age = max(0.0, time.time() - last_error.get("at", time.time()))
        print(f"  last error {_ago(age)}: {last_error.get('message')}")
    if cache:
        print("  cache:    " + ", ".join(f"{k} {v}" for k, v in sorted(cache.items())))
    print(f"  token:    {status.get('token_file')}")
    print(f"  log:      {paths.log_file}")
    if runs_other_code(status.get("code")):
        print(f"  note:     {STALE_CODE_MESSAGE}")


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def _memory_line(status: dict[str, Any], engine: dict[str, Any]) -> str:
    """Resident memory, and what the model's layers hold of it: "" where neither is known."""
    parts = []
    if status.get("resident_MB") is not None:
        parts.append(f"resident {status['resident_MB']:.0f} MB")
    if engine.get("layers_MB") is not None:
        layers = f"layers {engine['layers_MB']:.0f} MB"
        if engine.get("copies_MB"):
            layers += f" ({engine['copies_MB']:.0f} MB of copies for prompts)"
        parts.append(layers)
    return ", ".join(parts)


def cmd_logs(args: argparse.Namespace) -> int:
    log_file = resolve_paths().log_file
    if not log_file.exists():
        print(f"{PROG}: no log yet at {log_file}", file=sys.stderr)
        return 1
    try:
        if text := _tail(log_file, args.lines):
            print(text)
        if args.follow:
            _follow(log_file)
    except BrokenPipeError:
        raise  # `logs | head`: main() handles it
    except OSError as exc:  # FileNotFoundError: the log was removed as it was read
        print(f"{PROG}: cannot read the log {log_file} ({exc.strerror})", file=sys.stderr)
        return 1
    return 0


def _follow(log_file: Path) -> None:
    """Print what is added to the log until Ctrl-C. A start moves the old log aside: then
    the new one is followed from its start (and a truncated one from its start too)."""
    f = log_file.open("rb")
    f.seek(0, os.SEEK_END)
    try:
        while True:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
                continue
            try:
                stat = log_file.stat()
                if stat.st_ino != os.fstat(f.fileno()).st_ino:  # rotated: a new file there
                    f.close()
                    f = log_file.open("rb")
                    continue
            except FileNotFoundError:  # between the move and the new file
                stat = None
            if stat is not None and f.tell() > stat.st_size:  # truncated
                f.seek(0)
            else:
                time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        f.close()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _tail(path: Path, n_lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, _size(path) - 256 * 1024))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(lines[-n_lines:]) if n_lines > 0 else ""


# -- logging --


def _setup_daemon_logging(config: DaemonConfig) -> None:
    """The daemon logs to its log file, and to the terminal only when it has one."""
    root = logging.getLogger()
    root.setLevel(config.log_level)
    handler = logging.FileHandler(config.paths.log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    if sys.stderr.isatty():
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(console)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _setup_client_logging(verbose: int) -> None:
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


if __name__ == "__main__":
    sys.exit(main())
