"""When a completion stops: stop strings, end of line, the end of the cursor's block, max
tokens, a time limit. Text only (no torch), so the engine that asks an inference server
stops as the local one does, and the language server's post-processing measures blocks as
these rules do."""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

_FIRST_LINE = re.compile(r"\S[^\n]*?(\r?\n)")  # group 1: its line break, \r\n in a CRLF file
# A line that ends so that the lines after it go deeper: `if x:`, `{`, `foo(`, `=> `.
BLOCK_OPENER = re.compile(r"(?:[:{(\[]|=>|->)\s*$")
# At the indentation of the line that opened the block: the same statement goes on
# (`else:`, `} catch (e) {`, `case 2:`, `public:`, a YAML list under its key).
_CONTINUES = re.compile(
    r"(?:else|elif|except|finally|catch|case|default|public|private|protected)\b|-(?:\s|$)"
)
_WORD = re.compile(r"\w*")


class StopReason(str, enum.Enum):
    EOS = "eos"
    STOP_TEXT = "stop_text"
    MAX_TOKENS = "max_tokens"
    SINGLE_LINE = "single_line"
    BLOCK_END = "block_end"
    CANCELLED = "cancelled"
    CONTEXT = "context"
    TIME_LIMIT = "time_limit"


@dataclass(frozen=True, kw_only=True, slots=True)
class StopRules:
    """When to stop: stop token ids, stop strings, max tokens, end of line, and with
    `block_line` (the cursor's line up to the cursor) before the first line that leaves the
    cursor's block (`block_end`); at the first token after `deadline` (time.monotonic()) once
    there is text to show."""

    stop_ids: frozenset[int] = frozenset()
    stop_texts: tuple[str, ...] = ()
    max_tokens: int = 64
    single_line: bool = False
    block_line: str | None = None
    deadline: float | None = None

    def scan(self, text: str, *, final: bool = False) -> tuple[int, StopReason | None]:
        """Given all generated text so far: (how much of it may be shown, stop reason or None).

        The text stops where the first rule cuts it. Text that could still become a stop
        string is held back until it cannot, and a rule that cuts after its start waits until
        then: where the text stops does not depend on how it was split into pieces. `final`:
        no more text comes, nothing is held back.
        """
        cut, reason = len(text), None
        if self.single_line:
            # Stop at the first line break that follows visible text (a leading break is kept:
            # the suggestion then fills the next line).
            line = _FIRST_LINE.search(text)
            if line is not None:
                cut, reason = line.start(1), StopReason.SINGLE_LINE
            elif text.endswith("\r") and text.strip():
                cut = len(text) - 1  # held back: the \r of a \r\n ends the line too
        elif self.block_line is not None:
            start, leaves = block_end(self.block_line, text)
            if start < cut:  # a line that may still leave the block is held back
                cut, reason = start, StopReason.BLOCK_END if leaves else None
        if final and reason is None:
            cut = len(text)  # what was held back is shown, up to a stop string in it
        for stop in self.stop_texts:
            index = text.find(stop)
            if 0 <= index < cut:
                cut, reason = index, StopReason.STOP_TEXT
        held = len(text) - _partial_stop(text, self.stop_texts)
        if held < cut and not final:  # a stop string there would cut earlier
            cut, reason = held, None
        return cut, reason


def deadline_after(max_time_ms: int | None) -> float | None:
    """`StopRules.deadline` for a request's `max_time_ms`, counted from now."""
    return None if max_time_ms is None else time.monotonic() + max_time_ms / 1000


def block_line(text: str, cursor: int) -> str | None:
    """The cursor's line up to the cursor (`StopRules.block_line`), or None where the cursor is
    inside a multi-line string (an odd number of triple quotes or backticks before it), whose
    lines may sit at any indentation."""
    quotes = sum(text.count(quote, 0, cursor) for quote in _STRING_QUOTES)
    if quotes % 2:
        return None
    return text[text.rfind("\n", 0, cursor) + 1 : cursor].replace("\r", "")


def block_end(line_before: str, text: str) -> tuple[int, bool]:
    """Where the first line of `text` (the generated text, going on from the cursor's line
    `line_before`) that leaves the cursor's block starts, and whether it is known to leave
    it; (len(text), False) where none may.

    The block is what is indented deeper than the cursor's line when that line ends by
    opening one (`if x:`, `{`) after the text before the cursor, else as deep as it: a line
    that leaves it is indented less.
    Never a line that starts with a closer (`}`, `)`, `</div>`; the language server keeps the
    block's own), a line inside a multi-line string, nor, at the opener's indentation, one
    that goes on with its statement (`else:`, `except KeyError:`). The language server's
    post-processing (lsp/postprocess.py, stop_at_block_end) cuts there or earlier: stopping
    here only spares the decoding of what it would drop."""
    first = text.find("\n")
    if first < 0:
        return len(text), False
    cursor_line = line_before + text[:first].rstrip("\r")
    base = indent_width(cursor_line)
    # (On a line of nothing but indentation, a first line that opens a block may be followed
    # by statements at its own indentation: the server keeps them where the document's block
    # ends below the cursor.)
    opens = line_before.strip() and BLOCK_OPENER.search(cursor_line)
    min_indent = base + 1 if opens else base
    in_string = _string_quotes(text[:first]) % 2 == 1
    start = first + 1
    while True:
        end = text.find("\n", start)
        line = (text[start:] if end < 0 else text[start:end]).rstrip("\r")
        if not in_string:
            leaves = _leaves(line, end >= 0, base, min_indent)
            if leaves is not False:
                return start, leaves is True
        if end < 0:
            return len(text), False
        in_string ^= _string_quotes(line) % 2 == 1
        start = end + 1


def _leaves(line: str, complete: bool, base: int, min_indent: int) -> bool | None:
    """Whether `line` leaves the block; None while it is too short to tell."""
    stripped = line.lstrip(" \t")
    width = indent_width(line)
    if width >= min_indent:
        return False
    if not stripped or (not complete and "</".startswith(stripped)):
        return False if complete else None
    if stripped[0] in ")]}" or stripped.startswith("</"):
        return False
    if not complete and (_WORD.match(stripped).end() == len(stripped) or stripped == "-"):
        return None  # its first word may go on (`el` to `else`, `-` to `- item` or `-x`)
    return not (min_indent > base and width == base and _CONTINUES.match(stripped))


_STRING_QUOTES = ('"""', "'''", "`")  # what opens a string that may span lines


def _string_quotes(text: str) -> int:
    return sum(text.count(quote) for quote in _STRING_QUOTES)


def indent_width(line: str, tab_size: int = 4) -> int:
    """Columns of `line`'s indentation, a tab to the next multiple of `tab_size`."""
    expanded = line[: len(line) - len(line.lstrip(" \t"))].expandtabs(tab_size)
    return len(expanded)


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class ShownText:
    """Generated text as the stop rules let it through: `on_text` gets each piece once nothing
    after it can make it part of a stop string. Both engines stream through it."""

    def __init__(self, rules: StopRules, on_text: Callable[[str], None] | None) -> None:
        self.rules = rules
        self.on_text = on_text
        self.text = ""
        self.shown = 0  # how much of `text` went to on_text
        self.past_stop = ""  # what a stop string, the line's end or the block's end cut off

    def add(self, piece: str) -> StopReason | None:
        """Appends `piece`; a stop string or the line's end cuts the text and is returned."""
        self.text += piece
        cut, reason = self.rules.scan(self.text)
        if cut > self.shown and self.on_text is not None:
            self.on_text(self.text[self.shown : cut])
        self.shown = max(self.shown, cut)
        if reason is not None:
            self.text, self.past_stop = self.text[:cut], self.text[cut:]
        elif self._out_of_time():
            reason = StopReason.TIME_LIMIT  # finish() shows what was held back, as at max_tokens
        return reason

    def _out_of_time(self) -> bool:
        """Past the deadline with some text to show (not only the healed indentation)."""
        deadline = self.rules.deadline
        return deadline is not None and time.monotonic() >= deadline and bool(self.text.strip())

    def finish(self, reason: StopReason, tail: str = "") -> str:
        """The whole text once generation ended for `reason`. Unless a stop rule cut it, `tail`
        (what the detokenizer still held) joins it, and what was held back is shown up to the
        first cut a rule found in it: nothing more can complete a stop string."""
        if reason not in (StopReason.STOP_TEXT, StopReason.SINGLE_LINE, StopReason.BLOCK_END):
            self.text += tail
            cut, found = self.rules.scan(self.text, final=True)
            if found is not None:
                self.text, self.past_stop = self.text[:cut], self.text[cut:]
            if self.on_text is not None and len(self.text) > self.shown:
                self.on_text(self.text[self.shown :])
            self.shown = len(self.text)
        return self.text
