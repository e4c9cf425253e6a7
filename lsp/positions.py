"""LSP positions (line, character in the negotiated encoding, UTF-16 by default) <-> str index.

Lines end at \\n, \\r\\n or \\r, as the LSP spec says (str.splitlines also splits on form
feed and U+2028, which would shift every line below them); the daemon counts lines and UTF-16
units with the same code (daemon/protocol.py), which visits only the characters wider than a
unit, so a long line costs a regex scan. Out-of-range positions are clamped and logged, never
fatal.
"""

from __future__ import annotations

import logging
import re

from lsprotocol import types

from codelm.daemon.protocol import UTF16_WIDE, Width, index_of_units, line_bounds, position_of

logger = logging.getLogger(__name__)

_UTF16 = types.PositionEncodingKind.Utf16
# Per encoding: the characters of more than one code unit, and their units (none in UTF-32).
_WIDE: dict[str, tuple[re.Pattern[str] | None, Width]] = {
    types.PositionEncodingKind.Utf8: (
        re.compile(r"[^\x00-\x7f]"),
        lambda c: len(c.encode("utf-8", "surrogatepass")),
    ),
    _UTF16: (UTF16_WIDE, lambda c: 2),
    types.PositionEncodingKind.Utf32: (None, lambda c: 1),
}


def _units(encoding: str | None) -> tuple[re.Pattern[str] | None, Width]:
    return _WIDE.get(encoding or _UTF16, _WIDE[_UTF16])


def offset_at(text: str, line: int, character: int, encoding: str | None = None) -> int:
    """str index of an LSP position; clamps (and logs) a line or character out of range."""
    return _locate(text, line, character, encoding)[0]


def _locate(text: str, line: int, character: int, encoding: str | None) -> tuple[int, bool]:
    """(offset_at, whether the position fell inside a character: then the index is its
    start)."""
    if line < 0 or character < 0:
        logger.warning("negative position %d:%d clamped to 0", line, character)
        line, character = max(line, 0), max(character, 0)
    bounds = line_bounds(text, line)
    if bounds is None:
        logger.warning("line %d is past the end of the document; clamped to its end", line)
        return len(text), False
    start, end = bounds
    index, short = index_of_units(text, start, end, character, *_units(encoding))
    if short and index == end:
        logger.warning("character %d is past the end of line %d; clamped", character, line)
    return index, bool(short) and index < end


def position_at(text: str, offset: int, encoding: str | None = None) -> types.Position:
    """LSP position of a str index (clamped to the text; between \\r and \\n means before \\r)."""
    line, character = position_of(text, offset, *_units(encoding))
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
    text, start = _edit_end(text, change.range.start, encoding)
    text, end = _edit_end(text, change.range.end, encoding)
    if end < start:
        logger.warning("change range ends before it starts; treated as an insertion")
        end = start
    text = text[:start] + change.text + text[end:]
    # Halves of a pair that this edit brought together (a client that sent them apart)
    # become one character again.
    low, high = max(start - 1, 0), start + len(change.text) + 1
    if _SURROGATE.search(text, low, high):
        text = text[:low] + _PAIR.sub(_join, text[low:high]) + text[high:]
    return text


_SURROGATE = re.compile("[\ud800-\udfff]")
_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")


def _join(pair: re.Match[str]) -> str:
    return pair.group().encode("utf-16-le", "surrogatepass").decode("utf-16-le")


def _edit_end(text: str, at: types.Position, encoding: str | None) -> tuple[str, int]:
    """The str index of one end of an edit. A UTF-16 position between the two halves of a
    surrogate pair (a client that diffs in code units, replacing one half) splits the pair
    into its halves first, so the edit keeps the half it leaves alone."""
    index, inside = _locate(text, at.line, at.character, encoding)
    if not inside or (encoding or _UTF16) != _UTF16:
        return text, index
    halves = "".join(chr(unit) for unit in memoryview(text[index].encode("utf-16-le")).cast("H"))
    return text[:index] + halves + text[index + 1 :], index + 1
