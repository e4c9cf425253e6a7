"""LSP typing replay: what an editor sees from codelm-lsp while a user types.

Spawns `codelm-lsp` (timing spawn -> `initialize` result), then retypes a region of a real file
keystroke by keystroke at a typist's pace against the running daemon (the LSP finds it, or
starts it), asking for an inline completion at every key as VS Code does. Reports p50/p90
suggestion latency, the share of keys answered from the typing-through cache, how often a
suggestion was on screen before the next key, and how well suggestions matched what the user
then typed (all of it, its first line, or the share of its characters).

    .venv/bin/python benchmarks/lsp_replay.py [--file F] [--anchor REGEX] [--lines 8]
        [--key-ms 120] [--pause-ms 1500] [--max-tokens 16] [--spawn-runs 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, percentile, print_table, write_json  # noqa: E402
from lsprotocol import types  # noqa: E402
from pygls.lsp.client import LanguageClient  # noqa: E402

from codelm.lsp.positions import position_at  # noqa: E402

READY_TIMEOUT_S = 300.0
WARMUP_TIMEOUT_MS = 300_000


def lsp_command() -> list[str]:
    script = Path(sys.executable).with_name("codelm-lsp")
    found = str(script) if script.exists() else shutil.which("codelm-lsp")
    if found is None:
        raise SystemExit("codelm-lsp is not installed: pip install -e .")
    return [found]


@dataclass
class Session:
    client: LanguageClient
    initialize_ms: float
    statuses: list[dict[str, Any]] = field(default_factory=list)
    version: int = 1

    async def wait_state(self, states: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.statuses and self.statuses[-1]["state"] in states:
                return self.statuses[-1]
            await asyncio.sleep(0.02)
        raise SystemExit(f"the LSP never reported {states}: {self.statuses}")

    async def close(self) -> None:
        await self.client.shutdown_async(None)
        self.client.exit(None)
        await self.client.stop()


async def start_session(options: dict[str, Any]) -> Session:
    client = LanguageClient("lsp-replay", "1")
    statuses: list[dict[str, Any]] = []

    @client.feature("codelm/status")
    def on_status(params: Any) -> None:
        statuses.append({"state": params.state, "message": params.message})

    for method in (types.WINDOW_LOG_MESSAGE, types.WINDOW_SHOW_MESSAGE):
        client.feature(method)(lambda params: None)
    started = time.perf_counter()
    await client.start_io(*lsp_command(), env=dict(os.environ))
    await client.initialize_async(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(), initialization_options=options
        )
    )
    initialize_ms = 1000 * (time.perf_counter() - started)
    client.initialized(types.InitializedParams())
    return Session(client, initialize_ms, statuses)


async def measure_initialize(runs: int) -> list[float]:
    """Spawn -> initialize result, in ms, for fresh processes (completion disabled)."""
    times = []
    for _ in range(runs):
        session = await start_session({"enabled": False})
        times.append(session.initialize_ms)
        await session.close()
    return times


def pick_region(text: str, anchor: str, n_lines: int) -> tuple[int, int]:
    """(start, end) str indices of `n_lines` lines after the docstring of the anchored def."""
    lines = text.splitlines(keepends=True)
    pattern = re.compile(anchor)
    body = next(i for i, line in enumerate(lines) if pattern.search(line)) + 1
    quote = lines[body].strip()[:3]
    if quote in ('"""', "'''"):
        if lines[body].count(quote) < 2:
            while quote not in lines[body + 1]:
                body += 1
            body += 1
        body += 1
    start = sum(len(line) for line in lines[:body])
    end = start + sum(len(line) for line in lines[body : body + n_lines]) - 1  # keep a \n
    return start, end


@dataclass
class Key:
    offset: int  # cursor after this key
    sent_s: float
    answered_s: float | None = None
    items: list[str] = field(default_factory=list)


async def replay(
    session: Session,
    path: Path,
    region: tuple[int, int],
    key_ms: float,
    pause_ms: float,
    timeout_ms: int,
) -> dict:
    truth = path.read_text(encoding="utf-8")
    start, end = region
    uri = path.resolve().as_uri()
    text = truth[:start] + truth[end:]
    client = session.client
    item = types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)
    client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=item))
    # Warm-up (not measured): the user opened the file and paused where they will type; the
    # daemon prefills the whole file once, however long that takes on this machine.
    await configure(client, {"timeoutMs": WARMUP_TIMEOUT_MS})
    await ask_inline(client, uri, position_at(text, start), Key(start, 0.0), invoked=True)
    await configure(client, {"timeoutMs": timeout_ms})
    before = await lsp_stats(client)
    keys: list[Key] = []
    tasks = []
    due = time.perf_counter()
    for offset in range(start, end):
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        # A typist keeps a rhythm and pauses at the end of each line.
        due += (key_ms + (pause_ms if truth[offset] == "\n" else 0.0)) / 1000
        text = type_char(session, uri, text, offset, truth[offset])
        key = Key(offset + 1, time.perf_counter())
        keys.append(key)
        here = position_at(text, offset + 1)
        tasks.append(asyncio.create_task(ask_inline(client, uri, here, key)))
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    after = await lsp_stats(client)
    stats = {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, int)}
    return summarize(keys, truth, key_ms, stats)


def type_char(session: Session, uri: str, text: str, offset: int, char: str) -> str:
    """Sends the insertion of `char` at `offset` of the document (`text`); the new text."""
    here = position_at(text, offset)
    session.version += 1
    session.client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=session.version),
            content_changes=[
                types.TextDocumentContentChangePartial(
                    range=types.Range(start=here, end=here), text=char
                )
            ],
        )
    )
    return text[:offset] + char + text[offset:]


async def lsp_stats(client: LanguageClient) -> dict[str, Any]:
    params = types.ExecuteCommandParams(command="codelm.stats")
    return dict(await client.workspace_execute_command_async(params))


async def configure(client: LanguageClient, settings: dict[str, Any]) -> None:
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"codelm": settings})
    )
    await lsp_stats(client)  # a round trip: the notification has been handled


async def ask_inline(
    client: LanguageClient, uri: str, position: types.Position, key: Key, invoked: bool = False
) -> None:
    kind = types.InlineCompletionTriggerKind
    params = types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=position,
        context=types.InlineCompletionContext(
            trigger_kind=kind.Invoked if invoked else kind.Automatic
        ),
    )
    result = await client.text_document_inline_completion_async(params)
    key.answered_s = time.perf_counter()
    if isinstance(result, types.InlineCompletionList):
        key.items = [i.insert_text for i in result.items if isinstance(i.insert_text, str)]


def summarize(keys: list[Key], truth: str, key_ms: float, stats: dict[str, Any]) -> dict:
    shown = [k for k in keys if k.items and k.answered_s is not None]
    latencies = [1000 * (k.answered_s - k.sent_s) for k in shown]  # type: ignore[operator]
    in_time = [k for k in shown if 1000 * (k.answered_s - k.sent_s) < key_ms]  # type: ignore[operator]
    exact = [k for k in shown if truth[k.offset :].startswith(k.items[0])]
    # Of a multi-line suggestion the user may well type the first line and go on otherwise.
    first_lines = [k for k in shown if truth[k.offset :].startswith(k.items[0].split("\n")[0])]
    matched = [_common_prefix(truth[k.offset :], k.items[0]) / len(k.items[0]) for k in shown]
    requests = max(int(stats.get("requests", 0)), 1)
    return {
        "keystrokes": len(keys),
        "shown": len(shown),
        "latency_p50_ms": percentile(latencies, 50),
        "latency_p90_ms": percentile(latencies, 90),
        "before_next_key": len(in_time) / max(len(keys), 1),
        "cache_share": int(stats.get("cache_hits", 0)) / requests,
        "exact_match_rate": len(exact) / max(len(shown), 1),
        "first_line_match_rate": len(first_lines) / max(len(shown), 1),
        "matched_fraction": statistics.fmean(matched) if matched else float("nan"),
        "daemon_calls": stats.get("daemon_calls", 0),
        "superseded": stats.get("superseded", 0),
        "timeouts": stats.get("timeouts", 0),
        "errors": stats.get("errors", 0),
    }


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_file = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    parser.add_argument("--file", type=Path, default=default_file, help="default: textwrap.py")
    parser.add_argument("--anchor", default=r"^def indent\(", help="regex of the def to retype")
    parser.add_argument("--lines", type=int, default=8, help="lines retyped after its docstring")
    parser.add_argument("--key-ms", type=float, default=120.0, help="gap between keys (ms)")
    parser.add_argument("--pause-ms", type=float, default=1500.0, help="pause after each line")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--debounce-ms", type=int, default=None, help="default: the LSP's")
    parser.add_argument("--timeout-ms", type=int, default=10_000)
    parser.add_argument("--spawn-runs", type=int, default=5)
    parser.add_argument("--initialize-only", action="store_true", help="skip the replay")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/lsp_replay.json")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    spawn = await measure_initialize(args.spawn_runs)
    spawn_stats = {"runs": spawn, "median": median(spawn), "min": min(spawn)}
    if args.initialize_only:
        return {"initialize_ms": spawn_stats}
    options: dict[str, Any] = {"maxTokens": args.max_tokens, "timeoutMs": args.timeout_ms}
    if args.debounce_ms is not None:
        options["debounceMs"] = args.debounce_ms
    session = await start_session(options)
    status = await session.wait_state(("ready", "error"), READY_TIMEOUT_S)
    if status["state"] != "ready":
        raise SystemExit(f"the daemon is not available: {status['message']}")
    region = pick_region(args.file.read_text(encoding="utf-8"), args.anchor, args.lines)
    result = await replay(session, args.file, region, args.key_ms, args.pause_ms, args.timeout_ms)
    await session.close()
    return {
        "initialize_ms": spawn_stats,
        "daemon": status["message"],
        "file": str(args.file),
        "region_chars": region[1] - region[0],
        "key_ms": args.key_ms,
        "pause_ms": args.pause_ms,
        "max_tokens": args.max_tokens,
        "replay": result,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    payload = asyncio.run(_run(args))
    init = payload["initialize_ms"]
    print(f"spawn -> initialize: median {init['median']:.0f} ms, min {init['min']:.0f} ms")
    if args.initialize_only:
        return 0
    print(f"daemon: {payload['daemon']}; retyped {payload['region_chars']} chars of {args.file}")
    r = payload["replay"]
    print_table(
        [{"metric": k, "value": v} for k, v in r.items()],
        ["metric", "value"],
    )
    out = write_json("lsp_replay", payload, args.json)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
