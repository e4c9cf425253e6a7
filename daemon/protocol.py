"""Wire types of the daemon's HTTP API, shared by the daemon, its client, the LSP and tests.

Imports neither torch nor aiohttp. `from_json` checks types and ranges and raises BadRequest.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequest

# The names a client may reach the daemon by (it listens on loopback or a unix socket only).
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})

MAX_TEXT_CHARS = 8_000_000
MAX_URI_CHARS = 16_384  # a path (its name goes into the prompt) percent-encoded
MAX_PATH_CHARS = 4_096
MAX_TOKENS_LIMIT = 1024
MAX_TIME_MS_LIMIT = 600_000
MAX_CONTEXT_SNIPPETS = 16
MAX_CONTEXT_CHARS = 64_000  # all snippets together; the prompt holds context_chars of them
TRIGGERS = ("automatic", "invoked")


def _get(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in body or body[name] is None:
        if default is ...:
            raise BadRequest(name, "is required")
        return default
    value = body[name]
    # bool is an int subclass; a position of `true` is a client bug, not line 1.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise BadRequest(name, f"must be {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise BadRequest(name, f"must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        str: "a string",
        int: "an integer",
        bool: "a boolean",
        list: "a list",
        float: "a number",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _non_negative(body: dict[str, Any], name: str) -> int:
    value = _get(body, name, int)
    if value < 0:
        raise BadRequest(name, f"must be >= 0, got {value}")
    return value


def _int_between(
    body: dict[str, Any], name: str, least: int, most: int, default: int | None
) -> int | None:
    """An integer field within [least, most]; `default` (None: absent) where it is missing."""
    value = _get(body, name, int, default)
    if value is not None and not least <= value <= most:
        raise BadRequest(name, f"must be between {least} and {most}, got {value}")
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop", "must be a non-empty string or a list of them")
    if len(stop) > 16:
        raise BadRequest("stop", "at most 16 stop strings")
    return tuple(stop)


@dataclass(frozen=True, slots=True)
class Snippet:
    """Text from another file the model may read before the document (`context`)."""

    path: str
    text: str


def _context(body: dict[str, Any]) -> tuple[Snippet, ...]:
    items = _get(body, "context", list, [])
    if len(items) > MAX_CONTEXT_SNIPPETS:
        raise BadRequest("context", f"at most {MAX_CONTEXT_SNIPPETS} snippets")
    snippets = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest(f"context[{i}]", 'must be an object {"path": ..., "text": ...}')
        try:
            path = _text(item, "path", limit=MAX_PATH_CHARS)
            text = _text(item, "text", limit=MAX_CONTEXT_CHARS)
        except BadRequest as exc:  # which snippet's field
            raise BadRequest(f"context[{i}].{exc.field}", exc.reason) from None
        snippets.append(Snippet(path=path, text=text))
    if sum(len(s.text) for s in snippets) > MAX_CONTEXT_CHARS:
        raise BadRequest("context", f"longer than {MAX_CONTEXT_CHARS} characters in all")
    return tuple(snippets)


def _text(body: dict[str, Any], name: str, default: Any = ..., limit: int = MAX_TEXT_CHARS) -> str:
    value = _get(body, name, str, default)
    if value is not None and len(value) > limit:
        raise BadRequest(name, f"longer than {limit} characters")
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class CompleteRequest:
    """`POST /v1/complete`: the whole document and an LSP position (0-based, UTF-16 units)."""

    uri: str
    text: str
    line: int
    character: int
    path: str | None = None
    language: str | None = None
    trigger: str = "automatic"
    max_tokens: int = 64  # 0: a warm-up, the prompt's K/V cached for the next request here
    stream: bool = False
    single_line: bool | None = None
    stop: tuple[str, ...] = ()
    # Snippets of other files (the ones the user works in), read before the document.
    context: tuple[Snippet, ...] = ()
    # Decoding stops at the first token after this many ms from the request's start on the
    # engine (`time_limit`); None: no limit.
    max_time_ms: int | None = None

    @classmethod
    def from_json(cls, body: Any) -> CompleteRequest:
        if not isinstance(body, dict):
            raise BadRequest("", "the request body must be a JSON object")
        trigger = _get(body, "trigger", str, "automatic")
        if trigger not in TRIGGERS:
            # (the value at most 60 characters: a client's 20k-character string is no message)
            raise BadRequest(
                "trigger", f"must be one of {', '.join(TRIGGERS)}, got {trigger!r:.60}"
            )
        uri = _text(body, "uri", limit=MAX_URI_CHARS)
        if not uri:
            raise BadRequest("uri", "must not be empty")
        return cls(
            uri=uri,
            text=_text(body, "text"),
            line=_non_negative(body, "line"),
            character=_non_negative(body, "character"),
            path=_text(body, "path", None, limit=MAX_PATH_CHARS),
            language=_get(body, "language", str, None),
            trigger=trigger,
            max_tokens=_int_between(body, "max_tokens", 0, MAX_TOKENS_LIMIT, 64),
            stream=_get(body, "stream", bool, False),
            single_line=_get(body, "single_line", bool, None),
            stop=_stop(body),
            context=_context(body),
            max_time_ms=_int_between(body, "max_time_ms", 1, MAX_TIME_MS_LIMIT, None),
        )

    @property
    def is_warmup(self) -> bool:
        return self.max_tokens == 0

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "uri": self.uri,
            "text": self.text,
            "line": self.line,
            "character": self.character,
            "trigger": self.trigger,
            "max_tokens": self.max_tokens,
            "stream": self.stream,
        }
        for name in ("path", "language", "single_line", "max_time_ms"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.stop:
            body["stop"] = list(self.stop)
        if self.context:
            body["context"] = [{"path": s.path, "text": s.text} for s in self.context]
        return body


@dataclass(frozen=True, kw_only=True, slots=True)
class OpenAICompletionRequest:
    """`POST /v1/completions` (OpenAI-compatible subset; greedy decoding only)."""

    prompt: str
    suffix: str | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stream: bool = False
    model: str | None = None

    @classmethod
    def from_json(cls, body: Any) -> OpenAICompletionRequest:
        if not isinstance(body, dict):
            raise BadRequest("", "the request body must be a JSON object")
        temperature = _get(body, "temperature", (int, float), 0)
        if temperature != 0:
            raise BadRequest("temperature", "only 0 (greedy decoding) is supported")
        # What one greedy completion cannot give is refused, not answered wrongly.
        for name in ("n", "best_of"):
            if _get(body, name, int, 1) != 1:
                raise BadRequest(name, "only 1 is supported (one greedy completion)")
        if _get(body, "echo", bool, False):
            raise BadRequest("echo", "is not supported: the answer holds the completion alone")
        if body.get("logprobs") is not None:
            raise BadRequest("logprobs", "is not supported")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("prompt", "must be a string")
        if len(prompt) > MAX_TEXT_CHARS:
            raise BadRequest("prompt", f"longer than {MAX_TEXT_CHARS} characters")
        return cls(
            prompt=prompt,
            suffix=_text(body, "suffix", None),
            max_tokens=_int_between(body, "max_tokens", 1, MAX_TOKENS_LIMIT, 16),
            stop=_stop(body),
            stream=_get(body, "stream", bool, False),
            model=_get(body, "model", str, None),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Timings:
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    queue_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "cached_tokens": self.cached_tokens,
            "prefilled_tokens": self.prefilled_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_ms": round(self.prefill_ms, 3),
            "decode_ms": round(self.decode_ms, 3),
            "queue_ms": round(self.queue_ms, 3),
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Timings:
        return cls(**{k: body[k] for k in cls.__slots__ if k in body})  # type: ignore[attr-defined]


@dataclass(frozen=True, kw_only=True, slots=True)
class Position:
    line: int
    character: int

    def to_json(self) -> dict[str, int]:
        return {"line": self.line, "character": self.character}


@dataclass(frozen=True, kw_only=True, slots=True)
class Range:
    start: Position
    end: Position

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start.to_json(), "end": self.end.to_json()}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Range:
        return cls(start=Position(**body["start"]), end=Position(**body["end"]))


@dataclass(frozen=True, kw_only=True, slots=True)
class CompletionItem:
    """`text` replaces `range` (an empty range at the cursor inserts)."""

    text: str
    range: Range

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "range": self.range.to_json()}


@dataclass(frozen=True, kw_only=True, slots=True)
class CompleteResponse:
    items: list[CompletionItem]
    timings: Timings
    stop_reason: str = ""
    token_ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "items": [item.to_json() for item in self.items],
            "timings": self.timings.to_json(),
            "stop_reason": self.stop_reason,
            "token_ids": self.token_ids,
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> CompleteResponse:
        items = [
            CompletionItem(text=i["text"], range=Range.from_json(i["range"])) for i in body["items"]
        ]
        return cls(
            items=items,
            timings=Timings.from_json(body.get("timings", {})),
            stop_reason=body.get("stop_reason", ""),
            token_ids=list(body.get("token_ids", [])),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class PromptResponse:
    """What `POST /v1/prompt` answers: the prompt a completion there would run, as text and
    token ids, and the text token healing took back (the suggestion starts by retyping it)."""

    prompt: str
    token_ids: list[int]
    healed: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "token_ids": self.token_ids, "healed": self.healed}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> PromptResponse:
        return cls(
            prompt=body["prompt"],
            token_ids=list(body["token_ids"]),
            healed=body.get("healed", ""),
        )


# -- positions: lines end at \n, \r\n or \r (as LSP says); columns count code units --

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_LINES_CHUNK = 1024
# One regex match per 1024 lines keeps a 100k-line file at C speed; sre scans `[^\n]*`
# much faster than `[^\r\n]*`, so the general pattern is kept for text with a lone \r.
_LF_LINES = re.compile(rf"(?:[^\n]*\n){{{_LINES_CHUNK}}}")
_ANY_LINES = re.compile(rf"(?:[^\r\n]*(?:\r\n|\r|\n)){{{_LINES_CHUNK}}}")
_LF_LINE = re.compile(r"[^\n]*\n")
_ANY_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)")
# Characters of two UTF-16 code units (a surrogate pair); all others take one.
UTF16_WIDE = re.compile("[\U00010000-\U0010ffff]")
Width = Callable[[str], int]  # code units of one character


# What a client sends of a large document: the daemon's prompt reads at most its prefix window
# (8000 characters, whose start may stay put up to 2048 further back) before the cursor and
# its suffix window (1000) after it. The slice's ends move in steps, so while the user types
# the daemon sees the same text, and its window anchors and KV cache hold; a step is a
# multiple of the prefix window's (2048), so the windows are the whole document's.
SEND_MARGIN_CHARS = 32_768
SEND_STEP_CHARS = 65_536


def text_window(text: str, offset: int) -> tuple[int, int]:
    """[start, end) of `text` to send for the cursor at str index `offset`: all of a text of
    up to 2 * SEND_STEP_CHARS, else from a multiple of SEND_STEP_CHARS at least
    SEND_MARGIN_CHARS before the cursor to one at least as far after it (a \\r\\n there kept
    whole). The ends may cut a line: positions are counted in what was sent."""
    if len(text) <= 2 * SEND_STEP_CHARS:
        return 0, len(text)
    start = max(0, (offset - SEND_MARGIN_CHARS) // SEND_STEP_CHARS * SEND_STEP_CHARS)
    end = min(len(text), -(-(offset + SEND_MARGIN_CHARS) // SEND_STEP_CHARS) * SEND_STEP_CHARS)
    if start and text.startswith("\r\n", start - 1):
        start -= 1
    if text.startswith("\r\n", end - 1):
        end += 1
    return start, end


def line_start(text: str, line: int) -> int | None:
    """str index where `line` starts; None if the text has fewer lines."""
    lone_cr = "\r" in text and text.count("\r") != text.count("\r\n")
    many, one = (_ANY_LINES, _ANY_LINE) if lone_cr else (_LF_LINES, _LF_LINE)
    pos = 0
    for pattern, steps in ((many, line // _LINES_CHUNK), (one, line % _LINES_CHUNK)):
        for _ in range(steps):
            match = pattern.match(text, pos)
            if match is None:
                return None
            pos = match.end()
    return pos


def line_count(text: str) -> int:
    return len(_LINE_BREAK.findall(text)) + 1


def line_bounds(text: str, line: int) -> tuple[int, int] | None:
    """(start, end) str indices of `line` without its line break; None if past the end."""
    start = line_start(text, line)
    if start is None:
        return None
    match = _LINE_BREAK.search(text, start)
    return start, match.start() if match else len(text)


def _utf16_width(char: str) -> int:
    return 2


def units_of(
    text: str, wide: re.Pattern[str] | None = UTF16_WIDE, width: Width = _utf16_width
) -> int:
    """Code units of `text`: one a character, `width(c)` for the characters `wide` matches."""
    if wide is None:
        return len(text)
    return len(text) + sum(width(m.group()) - 1 for m in wide.finditer(text))


def position_of(
    text: str, offset: int, wide: re.Pattern[str] | None = UTF16_WIDE, width: Width = _utf16_width
) -> tuple[int, int]:
    """(line, character in code units as units_of counts them) of str index `offset`,
    clamped to the text; between \\r and \\n means before \\r."""
    offset = min(max(offset, 0), len(text))
    if 0 < offset < len(text) and text[offset - 1] == "\r" and text[offset] == "\n":
        offset -= 1
    n_cr = text.count("\r", 0, offset)
    line = text.count("\n", 0, offset) + n_cr - (text.count("\r\n", 0, offset) if n_cr else 0)
    start = text.rfind("\n", 0, offset) + 1
    if n_cr:
        start = max(start, text.rfind("\r", 0, offset) + 1)
    return line, units_of(text[start:offset], wide, width)


def index_of_units(
    text: str,
    start: int,
    end: int,
    units: int,
    wide: re.Pattern[str] | None = UTF16_WIDE,
    width: Width = _utf16_width,
) -> tuple[int, int]:
    """(index, short): the last character boundary of text[start:end] at most `units` code
    units (as units_of counts them) from `start`, and how many units it falls short: 0, or
    more where the line ends first (index == end) or the units end inside a character.
    Only the wide characters are visited: a long line of code costs a regex scan."""
    index, counted = start, 0
    for mark in wide.finditer(text, start, end) if wide is not None else ():
        narrow = mark.start() - index
        if counted + narrow >= units:
            break
        step = width(mark.group())
        if counted + narrow + step > units:
            return mark.start(), units - counted - narrow
        counted += narrow + step
        index = mark.end()
    take = min(units - counted, end - index)
    return index + take, units - counted - take


def offset_at(text: str, line: int, character: int) -> int:
    """String index of an LSP position (0-based line, UTF-16 code units); BadRequest if outside."""
    bounds = line_bounds(text, line)
    if bounds is None:
        lines = line_count(text)
        raise BadRequest("line", f"{line} is past the end of the document ({lines} lines)")
    start, end = bounds
    index, short = index_of_units(text, start, end, character)
    if short and index == end:
        units = units_of(text[start:end])
        raise BadRequest("character", f"{character} is past the end of line {line} ({units} units)")
    if short:
        raise BadRequest("character", f"{character} falls inside a surrogate pair")
    return index
