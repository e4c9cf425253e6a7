"""LSP positions (line, character in the negotiated encoding, UTF-16 by default) <-> str index.

Lines end at \\n, \\r\\n or \\r, as the LSP spec says (str.splitlines also splits on form
feed and U+2028, which would shift every line below them). Units are counted with pygls'
position codec. Out-of-range positions are clamped and logged, never fatal.
"""

from __future__ import annotations

import logging
import re

from lsprotocol import types
from pygls.workspace.position_codec import PositionCodec

logger = logging.getLogger(__name__)

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_LINES_CHUNK = 1024
# One regex match per 1024 lines keeps a 100k-line file at C speed; sre scans `[^\n]*`
# much faster than `[^\r\n]*`, so the general pattern is kept for text with a lone \r.
_LF_LINES = re.compile(rf"(?:[^\n]*\n){{{_LINES_CHUNK}}}")
_ANY_LINES = re.compile(rf"(?:[^\r\n]*(?:\r\n|\r|\n)){{{_LINES_CHUNK}}}")
_LF_LINE = re.compile(r"[^\n]*\n")
_ANY_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)")
_UTF16 = types.PositionEncodingKind.Utf16


def _codec(encoding: str | None) -> PositionCodec:
    return PositionCodec(encoding or _UTF16)


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


def line_bounds(text: str, line: int) -> tuple[int, int] | None:
    """(start, end) str indices of `line` without its line break; None if past the end."""
    start = line_start(text, line)
    if start is None:
        return None
    match = _LINE_BREAK.search(text, start)
    return start, match.start() if match else len(text)


def offset_at(text: str, line: int, character: int, encoding: str | None = None) -> int:
    """str index of an LSP position; clamps (and logs) a line or character out of range."""
    if line < 0 or character < 0:
        logger.warning("negative position %d:%d clamped to 0", line, character)
        line, character = max(line, 0), max(character, 0)
    bounds = line_bounds(text, line)
    if bounds is None:
        logger.warning("line %d is past the end of the document; clamped to its end", line)
        return len(text)
    start, end = bounds
    unit = _codec(encoding).impl.code_units_for_char
    units = 0
    index = start
    while index < end and units < character:
        units += unit(text[index])
        index += 1
    if units < character:
        logger.warning("character %d is past the end of line %d; clamped", character, line)
    elif units > character:
        # Inside a surrogate pair (or a multi-byte UTF-8 char): step back to its start.
        index -= 1
    return index


def position_at(text: str, offset: int, encoding: str | None = None) -> types.Position:
    """LSP position of a str index (clamped to the text; between \\r and \\n means before \\r)."""
    offset = min(max(offset, 0), len(text))
    if 0 < offset < len(text) and text[offset - 1] == "\r" and text[offset] == "\n":
        offset -= 1
    n_cr = text.count("\r", 0, offset)
    line = text.count("\n", 0, offset) + n_cr - (text.count("\r\n", 0, offset) if n_cr else 0)
    start = text.rfind("\n", 0, offset) + 1
    if n_cr:
        start = max(start, text.rfind("\r", 0, offset) + 1)
    character = _codec(encoding).client_num_units(text[start:offset])
    return types.Position(line=line, character=character)


def to_range(text: str, start: int, end: int, encoding: str | None = None) -> types.Range:
    """LSP range of the str slice text[start:end]."""
    return types.Range(
        start=position_at(text, start, encoding), end=position_at(text, end, encoding)
    )


def apply_change(
    text: str, change: types.TextDocumentContentChangeEvent, encoding: str | None = None
) -> str:
    """Apply one didChange content change (incremental, or full when it has no range)."""
    if not isinstance(change, types.TextDocumentContentChangePartial):
        return change.text
    start = offset_at(text, change.range.start.line, change.range.start.character, encoding)
    end = offset_at(text, change.range.end.line, change.range.end.character, encoding)
    if end < start:
        logger.warning("change range ends before it starts; treated as an insertion")
        end = start
    return text[:start] + change.text + text[end:]
