"""The `complete`, `prompt` and `models` subcommands: a suggestion or a prompt at FILE:LINE:COL.

`complete` uses the running daemon when there is one, else loads the engine in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import catalog
from .errors import BadRequest, CodelmError
from .protocol import (
    MAX_TEXT_CHARS,
    CompleteRequest,
    line_bounds,
    line_count,
    position_of,
    text_window,
)

_NUMBER = re.compile(r"[0-9]{1,9}")  # ASCII digits ("²".isdigit() is true, int() refuses it)
MAX_FILE_BYTES = 4 * MAX_TEXT_CHARS  # the most the daemon takes, in UTF-8


@dataclass(frozen=True, slots=True)
class Location:
    path: Path
    line: int  # 1-based
    column: int  # 1-based, in characters (code points)

    @classmethod
    def parse(cls, spec: str) -> Location:
        parts = spec.rsplit(":", 2)
        if len(parts) != 3 or not all(_NUMBER.fullmatch(part) for part in parts[1:]):
            raise BadRequest(
                "location", f"{spec!r} is not FILE:LINE:COL (1-based, e.g. app.py:12:5)"
            )
        line, column = int(parts[1]), int(parts[2])
        if line < 1 or column < 1:
            raise BadRequest("location", "LINE and COL start at 1")
        return cls(Path(parts[0]), line, column)


def build_request(
    location: Location,
    max_tokens: int,
    trigger: str = "invoked",
    max_time_ms: int | None = None,
) -> CompleteRequest:
    """The daemon request for a location; the column is converted to UTF-16 units. The text
    is the file's as it is (its line endings kept, a UTF-8 byte order mark left out, as
    editors show it)."""
    path = location.path
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a pipe would never end, a device never stop
            raise BadRequest("location", f"{path} is not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise BadRequest("location", f"{path} is larger than {MAX_FILE_BYTES >> 20} MiB")
        with path.open(encoding="utf-8-sig", newline="") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequest("location", f"cannot read {path}: {exc}") from exc
    bounds = line_bounds(text, location.line - 1)
    if bounds is None:
        raise BadRequest("location", f"{path} has {line_count(text)} lines, not {location.line}")
    line_text = text[slice(*bounds)]
    if location.column > len(line_text) + 1:
        raise BadRequest(
            "location",
            f"line {location.line} has {len(line_text)} characters; COL is at most "
            f"{len(line_text) + 1}",
        )
    # Of a large file the text around the location (the daemon takes at most 8M characters).
    offset = bounds[0] + location.column - 1
    start, end = text_window(text, offset)
    line, character = position_of(text[start:end], offset - start)
    return CompleteRequest(
        uri=location.path.resolve().as_uri(),
        text=text[start:end],
        line=line,
        character=character,
        # A name in bytes that are not UTF-8 (kept by Python as surrogates) as readable text.
        path=str(location.path).encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
        trigger=trigger,
        max_tokens=max_tokens,
        max_time_ms=max_time_ms,
    )


def _engine_config(args: argparse.Namespace):
    from .config import resolve_config

    overrides = {name: getattr(args, name, None) for name in ("model", "device", "quant")}
    return resolve_config(overrides).engine


def _load_engine(args: argparse.Namespace):
    from .engine import load_engine

    return load_engine(_engine_config(args))


def _ask_daemon(args: argparse.Namespace, fn):
    """`fn(client)` answered by the running daemon; None when none runs, or when the command
    asks for its own engine (--no-daemon, or a model, device or quant of its own)."""
    if args.no_daemon or _overrides_model(args):
        return None
    from .client import ask_sync

    return ask_sync(fn)


def run_complete(args: argparse.Namespace) -> int:
    try:
        request = build_request(
            Location.parse(args.location),
            getattr(args, "max_tokens", 64),
            max_time_ms=getattr(args, "max_time_ms", None),
        )
        response = _ask_daemon(args, lambda client: client.complete(request))
        if response is None:
            response = _load_engine(args).complete(request)
    except CodelmError as exc:
        print(f"codelm-daemon complete: {exc.message}", file=sys.stderr)
        return 2
    text = response.items[0].text if response.items else ""
    if args.json:
        body = {
            "text": text,
            "token_ids": response.token_ids,
            "timings": response.timings.to_json(),
        }
        print(json.dumps({**body, "stop_reason": response.stop_reason}, ensure_ascii=False))
    else:
        print(text)
    return 0


def _overrides_model(args: argparse.Namespace) -> bool:
    # The running daemon serves its own model; asking for another means loading it here.
    return any(getattr(args, name, None) for name in ("model", "device", "quant"))


def run_prompt(args: argparse.Namespace) -> int:
    try:
        request = build_request(Location.parse(args.location), 1)
        # The running daemon's: its model, and the window it keeps for this file.
        shown = _ask_daemon(args, lambda client: client.prompt(request))
        if shown is None:
            shown = _load_engine(args).show_prompt(request)
    except CodelmError as exc:
        print(f"codelm-daemon prompt: {exc.message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(shown.to_json(), ensure_ascii=False))
    else:
        print(shown.prompt)
        healed = shown.healed
        note = f" (healed: {healed!r}, which the suggestion starts by retyping)" if healed else ""
        # An inference server as the model tokenizes the prompt itself: no ids to count.
        count = f"{len(shown.token_ids)} tokens" if shown.token_ids else "tokens: the server's"
        print(f"--- {count}{note}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a closed terminal) interrupt as Ctrl-C does, so that a fetch's
    working folder is removed on the way out, not left behind with hundreds of MB."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fetched_state(entry: catalog.CatalogModel, path: Path) -> str:
    """What `models list` says of a catalogue model's file (by its size: no hashing here)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "not fetched"
    if size != entry.size_bytes:
        return f"damaged (not its {entry.size_bytes} bytes; `models fetch {entry.name} --force`)"
    return "fetched"


def run_models(args: argparse.Namespace) -> int:
    """`models [list [NAME]]` or `models fetch [NAME]`."""
    name = getattr(args, "name", None)  # "" is no model's name (catalog says so)
    listed = catalog.CATALOG
    try:
        if args.action == "fetch":
            with _signals_interrupt():
                catalog.fetch(
                    "default" if name is None else name, force=getattr(args, "force", False)
                )
            return 0
        if name is not None:  # (it was ignored: the whole catalogue was listed)
            entry = catalog.known_entry(name)
            listed = {entry.name: entry}
    except CodelmError as exc:
        print(f"codelm-daemon models: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("codelm-daemon models: fetch interrupted; no model was changed", file=sys.stderr)
        return 130
    for name, entry in listed.items():
        path = catalog.models_dir() / entry.filename
        state = _fetched_state(entry, path)
        marker = " (default)" if name == catalog.DEFAULT_MODEL else ""
        print(f"{name}{marker}: {entry.description} [{state}: {path}]")
    return 0
