"""First key after opening or switching to a file, with and without the warm-up, through the LSP.

A user opens a file (or goes back to one), the cursor comes to rest on a line, they read for
`--read-ms`, then type that line's first `--keys` characters at `--key-ms` a key. Three
standard-library modules are visited in turn, twice: the first round opens each file (the
daemon has not seen it), the second comes back to it after the user typed in the other two
(their snippets, which go before this file's text in the prompt, changed).

Each mode runs in a codelm-lsp session of its own, which starts a daemon of its own (a new
CODELM_HOME, `--model`): `warm-up off` sends no `codelm/didFocus`, `warm-up on` sends it
where the cursor rests, as the editors do. Each visit types another
line. Rows per round: how long after the first key the first suggestion showed (whichever
key it answered).

    .venv/bin/python benchmarks/file_switch.py [--read-ms 2000] [--keys 1] [--key-ms 150]
        [--rounds 2] [--max-tokens 16] [--model default] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, print_table, temporary_home, write_json  # noqa: E402
from lsp_replay import (  # noqa: E402
    READY_TIMEOUT_S,
    Key,
    Session,
    ask_inline,
    start_session,
    type_char,
)
from lsprotocol import types  # noqa: E402

from codelm.lsp.positions import position_at  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ("textwrap.py", "csv.py", "json/encoder.py")
FIRST_ANSWER_TIMEOUT_MS = 300_000  # a cold prompt on a slow machine: never dropped


def pick_lines(text: str, n: int) -> list[tuple[int, int]]:
    """(start, end) of the content of `n` indented code lines of 24+ characters, one past
    each of n places from the file's middle on: the lines the user types (their indentation
    stays)."""
    picked = []
    for i in range(n):
        offset = len(text) // 2 + i * len(text) // (3 * n)
        offset = text.index("\n", offset) + 1
        while True:
            end = text.index("\n", offset)
            line = text[offset:end]
            content = line.lstrip()
            if line.startswith("    ") and len(content) >= 24 and content[0] not in "#\"'":
                picked.append((end - len(content), end))
                break
            offset = end + 1
    return picked


class File:
    """A file as the editor holds it: the picked lines' contents taken out, then typed back
    in one visit each, `typed[i]` characters of line i so far."""

    def __init__(self, path: Path, visits: int) -> None:
        self.uri = path.resolve().as_uri()
        self.truth = path.read_text(encoding="utf-8")
        self.lines = pick_lines(self.truth, visits)
        self.typed = [0] * visits

    @property
    def text(self) -> str:
        parts, at = [], 0
        for (start, end), n in zip(self.lines, self.typed, strict=True):
            parts += [self.truth[at:start], self.truth[start : start + n]]
            at = end
        return "".join(parts) + self.truth[at:]

    def cursor(self, line: int) -> int:
        """Where typing line `line` goes on, in `text`."""
        start, _ = self.lines[line]
        taken = sum(end - s - n for (s, end), n in zip(self.lines[:line], self.typed, strict=False))
        return start - taken + self.typed[line]


async def visit(session: Session, file: File, line: int, warm: bool, args) -> float:
    """Rest the cursor on `line`, read, type `args.keys` of its characters: how long after
    the first key the first suggestion showed (ms; NaN for none)."""
    client = session.client
    if warm:
        position = position_at(file.text, file.cursor(line))
        client.protocol.notify(
            "codelm/didFocus", {"textDocument": {"uri": file.uri}, "position": position}
        )
    await asyncio.sleep(args.read_ms / 1000)
    keys, tasks = [], []
    due = time.perf_counter()
    for _ in range(args.keys):
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        due += args.key_ms / 1000
        at = file.cursor(line)
        char = file.truth[file.lines[line][0] + file.typed[line]]
        text = type_char(session, file.uri, file.text, at, char)
        file.typed[line] += 1
        key = Key(at + 1, time.perf_counter())
        keys.append(key)
        here = position_at(text, at + 1)
        tasks.append(asyncio.create_task(ask_inline(client, file.uri, here, key)))
    await asyncio.wait_for(asyncio.gather(*tasks), FIRST_ANSWER_TIMEOUT_MS / 1000)
    shown = [k.answered_s for k in keys if k.items and k.answered_s is not None]
    return 1000 * (min(shown) - keys[0].sent_s) if shown else float("nan")


async def run_mode(session: Session, paths: list[Path], warm: bool, args) -> list[dict]:
    client = session.client
    files = [File(path, args.rounds) for path in paths]
    for file in files:
        item = types.TextDocumentItem(uri=file.uri, language_id="python", version=1, text=file.text)
        client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=item))
    rows = []
    for round_ in range(args.rounds):
        firsts = [await visit(session, file, round_, warm, args) for file in files]
        rows.append(
            {
                "warm_up": "on" if warm else "off",
                "round": "open" if round_ == 0 else f"switch {round_}",
                "files": len(files),
                "first_suggestion_p50_ms": median(firsts),
                "first_suggestion_max_ms": max(firsts),
            }
        )
    for file in files:
        client.text_document_did_close(
            types.DidCloseTextDocumentParams(
                text_document=types.TextDocumentIdentifier(uri=file.uri)
            )
        )
    return rows


async def fresh_mode(paths: list[Path], warm: bool, args: argparse.Namespace) -> dict:
    """One mode against a daemon of its own (in a new CODELM_HOME), so neither mode finds
    what the other computed; the daemon is stopped afterwards."""
    from codelm.daemon.catalog import resolve_model_path

    options = {
        "maxTokens": args.max_tokens,
        "timeoutMs": FIRST_ANSWER_TIMEOUT_MS,
        "singleLine": "always",
        "warmup": warm,
        "model": str(resolve_model_path(args.model)),
    }
    with temporary_home("codelm-file-switch-"):
        session = await start_session(options)
        try:
            status = await session.wait_state(("ready", "error"), READY_TIMEOUT_S)
            if status["state"] != "ready":
                raise SystemExit(f"the daemon is not available: {status['message']}")
            rows = await run_mode(session, paths, warm, args)
        finally:
            await session.close()
            stop = [str(Path(sys.executable).with_name("codelm-daemon")), "stop"]
            subprocess.run(stop, capture_output=True, timeout=60)
    return {"daemon": status["message"], "rows": rows}


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    paths = [STDLIB / name for name in FILES]
    modes = [await fresh_mode(paths, warm, args) for warm in (False, True)]
    return {
        "daemon": modes[0]["daemon"],
        "args": vars(args),
        "rows": [row for mode in modes for row in mode["rows"]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--read-ms", type=float, default=2000.0, help="rest before typing")
    parser.add_argument("--keys", type=int, default=1, help="keys typed in each visit")
    parser.add_argument("--key-ms", type=float, default=150.0, help="gap between keys")
    parser.add_argument("--rounds", type=int, default=2, help="visits of each file")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default="default", help="a catalogue name or a file")
    parser.add_argument("--json", default=None, help="default: results/file_switch.json")
    args = parser.parse_args(argv)
    payload = asyncio.run(_run(args))
    print(f"daemon: {payload['daemon']}")
    columns = ["warm_up", "round", "files", "first_suggestion_p50_ms", "first_suggestion_max_ms"]
    print_table(payload["rows"], columns)
    out = write_json("file_switch", payload, args.json)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
