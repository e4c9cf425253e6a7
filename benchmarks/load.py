"""Load test of the daemon: N concurrent clients typing in different files (loopback only).

Bounded in keystrokes per client and in wall time. Prints a table and writes
benchmarks/results/load.json. Uses the running daemon, or starts one in a temporary
CODELM_HOME (models linked from the user data dir) and stops it afterwards.

    python benchmarks/load.py [--clients 50] [--keystrokes 8] [--max-seconds 120]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from codelm.daemon.client import DaemonClient
from codelm.daemon.errors import CodelmError, DaemonUnavailable
from codelm.daemon.protocol import CompleteRequest
from codelm.daemon.runtime import RuntimePaths, read_daemon_info

RESULTS = Path(__file__).parent / "results" / "load.json"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Each client types this function body into its own file, one character per keystroke.
TEMPLATE = "import math\n\n\ndef area_{n}(radius):\n    "
TYPED = "return math.pi * radius ** 2\n"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    with _daemon(args) as (url, token):
        result = asyncio.run(_run(url, token, args))
    _print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")
    return 0 if result["errors"] == 0 else 1


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--keystrokes", type=int, default=8, help="per client (bounded)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="wall-time bound")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--typing-ms", type=float, default=80.0, help="pause between keys")
    parser.add_argument("--url", help="daemon url (loopback); default: the running daemon")
    parser.add_argument("--token", help="bearer token (with --url)")
    args = parser.parse_args(argv)
    args.clients = max(1, min(args.clients, 200))
    args.keystrokes = max(1, min(args.keystrokes, len(TYPED)))
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        parser.error("--url must be a loopback address")
    return args


class _daemon:  # noqa: N801 (a context manager used like a function)
    """Yields (url, token): the given or running daemon, else a temporary one."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.home: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> tuple[str, str]:
        if self.args.url:
            return self.args.url, self.args.token or ""
        paths = RuntimePaths.for_home(os.environ.get("CODELM_HOME"))
        try:
            info = read_daemon_info(paths)
            return info.url, info.token
        except DaemonUnavailable:
            pass
        self.home = tempfile.TemporaryDirectory(prefix="codelm-load-")
        home = Path(self.home.name)
        (home / "data").mkdir()
        (home / "data" / "models").symlink_to(paths.data_dir / "models")
        print(f"no daemon running: starting one in {home} …", file=sys.stderr, flush=True)
        done = self._cli("start", "--device", "cpu")
        if done.returncode != 0:
            self.home.cleanup()
            raise SystemExit(f"could not start the daemon:\n{done.stderr}")
        tmp = RuntimePaths.for_home(home)
        return tmp.url_file.read_text().strip(), tmp.token_file.read_text().strip()

    def __exit__(self, *exc_info: object) -> None:
        if self.home is not None:
            self._cli("stop")
            self.home.cleanup()

    def _cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.home is not None
        env = {**os.environ, "CODELM_HOME": self.home.name}
        command = [sys.executable, "-m", "codelm.daemon.cli", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


async def _run(url: str, token: str, args: argparse.Namespace) -> dict[str, Any]:
    async with DaemonClient(url, token, timeout_s=args.max_seconds) as client:
        await _wait_ready(client)
        await client.complete(_request(0, 0, args.max_tokens))  # warm-up, not measured
        before = (await client.status())["requests"]
        deadline = time.monotonic() + args.max_seconds
        latencies: dict[str, list[float]] = {"all": [], "last_key": []}
        outcomes: Counter[str] = Counter()
        started = time.perf_counter()
        await asyncio.gather(
            *(_typist(client, n, args, deadline, latencies, outcomes) for n in range(args.clients))
        )
        wall_s = time.perf_counter() - started
        status = await client.status()
    return _summary(args, latencies, outcomes, wall_s, before, status)


async def _wait_ready(client: DaemonClient) -> None:
    for _ in range(6000):
        health = await client.health()
        if health["state"] == "ready":
            return
        if health["state"] == "error":
            raise SystemExit(f"the daemon cannot serve: {health.get('message')}")
        await asyncio.sleep(0.1)
    raise SystemExit("the model did not load within 10 minutes")


def _request(n: int, typed: int, max_tokens: int) -> CompleteRequest:
    head = TEMPLATE.format(n=n)
    text = head + TYPED[:typed]
    lines = text.split("\n")
    return CompleteRequest(
        uri=f"file:///load/client_{n}.py",
        text=text + "\n\nprint('done')\n",
        line=len(lines) - 1,
        character=len(lines[-1]),
        max_tokens=max_tokens,
    )


async def _typist(
    client: DaemonClient,
    n: int,
    args: argparse.Namespace,
    deadline: float,
    latencies: dict[str, list[float]],
    outcomes: Counter[str],
) -> None:
    """Types one character every `typing_ms` without waiting for answers, as a user does:
    each keystroke's request supersedes the previous one still queued or running."""
    tasks = []
    for typed in range(1, args.keystrokes + 1):
        if time.monotonic() >= deadline:
            outcomes["not_sent"] += args.keystrokes - typed + 1
            break
        last = typed == args.keystrokes
        request = _request(n, typed, args.max_tokens)
        tasks.append(asyncio.create_task(_keystroke(client, request, deadline, last, latencies)))
        await asyncio.sleep(args.typing_ms / 1000)
    for outcome in await asyncio.gather(*tasks):
        outcomes[outcome] += 1


async def _keystroke(
    client: DaemonClient,
    request: CompleteRequest,
    deadline: float,
    last: bool,
    latencies: dict[str, list[float]],
) -> str:
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(client.complete(request), max(0.001, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        return "timeout"
    except CodelmError as exc:
        return exc.code  # "cancelled": superseded by the next keystroke
    latency_ms = (time.perf_counter() - t0) * 1000
    latencies["all"].append(latency_ms)
    if last:
        latencies["last_key"].append(latency_ms)
    return "ok"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 1)


def _summary(
    args: argparse.Namespace,
    latencies: dict[str, list[float]],
    outcomes: Counter[str],
    wall_s: float,
    before: dict[str, Any],
    status: dict[str, Any],
) -> dict[str, Any]:
    after = status["requests"]
    benign = ("ok", "not_sent", "timeout", "cancelled")
    errors = sum(v for k, v in outcomes.items() if k not in benign)
    return {
        "benchmark": "load",
        "clients": args.clients,
        "keystrokes_per_client": args.keystrokes,
        "max_tokens": args.max_tokens,
        "typing_ms": args.typing_ms,
        "wall_s": round(wall_s, 3),
        "completed": outcomes["ok"],
        "throughput_rps": round(outcomes["ok"] / wall_s, 3) if wall_s else None,
        "latency_ms": {
            "p50": _percentile(latencies["all"], 50),
            "p99": _percentile(latencies["all"], 99),
            "last_key_p50": _percentile(latencies["last_key"], 50),
            "last_key_p99": _percentile(latencies["last_key"], 99),
        },
        "outcomes": dict(outcomes),
        "errors": errors,
        "server": {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], int)},
        "model": status.get("model"),
        "device": status.get("device"),
        "quant": status.get("quant"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "torch": _version("torch"),
        "commit": _commit(),
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() or None


def _print_table(result: dict[str, Any]) -> None:
    rows = [
        ("clients", result["clients"]),
        ("keystrokes per client", result["keystrokes_per_client"]),
        ("completed", result["completed"]),
        ("errors", result["errors"]),
        ("outcomes", ", ".join(f"{k} {v}" for k, v in sorted(result["outcomes"].items()))),
        ("wall time (s)", result["wall_s"]),
        ("throughput (req/s)", result["throughput_rps"]),
        ("latency p50 (ms)", result["latency_ms"]["p50"]),
        ("latency p99 (ms)", result["latency_ms"]["p99"]),
        ("last keystroke p50 (ms)", result["latency_ms"]["last_key_p50"]),
        ("last keystroke p99 (ms)", result["latency_ms"]["last_key_p99"]),
        ("server superseded", result["server"].get("superseded")),
        ("server cancelled", result["server"].get("cancelled")),
        ("model / device", f"{result['model']} / {result['device']} ({result['quant']})"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
