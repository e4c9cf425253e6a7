"""When a completion stops: stop strings, end of line, max tokens. Text only (no torch), so
the engine that asks an inference server stops as the local one does."""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass

_FIRST_LINE = re.compile(r"\S[^\n]*?(\r?\n)")  # group 1: its line break, \r\n in a CRLF file


class StopReason(str, enum.Enum):
    EOS = "eos"
    STOP_TEXT = "stop_text"
    MAX_TOKENS = "max_tokens"
    SINGLE_LINE = "single_line"
    CANCELLED = "cancelled"
    CONTEXT = "context"


@dataclass(frozen=True, kw_only=True, slots=True)
class StopRules:
    """When to stop: stop token ids, stop strings, max tokens, end of line."""

    stop_ids: frozenset[int] = frozenset()
    stop_texts: tuple[str, ...] = ()
    max_tokens: int = 64
    single_line: bool = False

    def scan(self, text: str) -> tuple[int, StopReason | None]:
        """Given all generated text so far: (how much of it may be shown, stop reason or None).

        Text that could still become a stop string is held back until it cannot.
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
        for stop in self.stop_texts:
            index = text.find(stop)
            if 0 <= index < cut:
                cut, reason = index, StopReason.STOP_TEXT
        if reason is None:
            cut = min(cut, len(text) - _partial_stop(text, self.stop_texts))
        return cut, reason


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

    def add(self, piece: str) -> StopReason | None:
        """Appends `piece`; a stop string or the line's end cuts the text and is returned."""
        self.text += piece
        cut, reason = self.rules.scan(self.text)
        if cut > self.shown and self.on_text is not None:
            self.on_text(self.text[self.shown : cut])
        self.shown = max(self.shown, cut)
        if reason is not None:
            self.text = self.text[:cut]
        return reason

    def finish(self, reason: StopReason, tail: str = "") -> str:
        """The whole text once generation ended for `reason`. Unless a stop string or the line's
        end cut it, `tail` (what the detokenizer still held) joins it, and what was held back
        as a possible stop string is shown: nothing more can complete one."""
        if reason not in (StopReason.STOP_TEXT, StopReason.SINGLE_LINE):
            self.text += tail
            if self.on_text is not None and len(self.text) > self.shown:
                self.on_text(self.text[self.shown :])
            self.shown = len(self.text)
        return self.text
