from __future__ import annotations

import random

import pytest
from lsprotocol import types

from codelm.lsp.positions import apply_change, line_bounds, offset_at, position_at, to_range

EMOJI = "x = '😀'  # done\n"  # the emoji is 2 UTF-16 units, 1 Python char


def test_offset_at_counts_utf16_units_after_emoji():
    # "x = '" is 5 units, the emoji 2 more, then the closing quote.
    assert EMOJI[offset_at(EMOJI, 0, 7)] == "'"


def test_offset_at_steps_back_when_inside_surrogate_pair():
    assert offset_at(EMOJI, 0, 6) == 5


def test_offset_at_utf8_and_utf32_encodings():
    assert offset_at(EMOJI, 0, 9, types.PositionEncodingKind.Utf8) == 6
    assert offset_at(EMOJI, 0, 6, types.PositionEncodingKind.Utf32) == 6


def test_position_at_round_trips_every_offset():
    text = "a😀b\r\nxy\rz\n\x0cq\u2028r"
    for offset in range(len(text) + 1):
        if text[offset - 1 : offset + 1] == "\r\n":
            continue  # between \r and \n is not a position
        pos = position_at(text, offset)
        assert offset_at(text, pos.line, pos.character) == offset


def test_lines_break_only_at_lsp_line_endings():
    text = "a\r\nb\rc\nd\x0ce\u2028f"
    assert [text[slice(*line_bounds(text, n))] for n in range(4)] == [
        "a",
        "b",
        "c",
        "d\x0ce\u2028f",
    ]
    assert line_bounds(text, 4) is None


def test_offset_at_clamps_out_of_range_positions(caplog):
    text = "ab\ncd"
    assert offset_at(text, 0, 99) == 2
    assert offset_at(text, 7, 0) == len(text)
    assert offset_at(text, -1, -1) == 0
    assert "clamped" in caplog.text


def test_position_at_treats_crlf_as_one_break():
    text = "ab\r\ncd"
    assert position_at(text, 4) == types.Position(line=1, character=0)
    assert position_at(text, 3) == types.Position(line=0, character=2)


def test_to_range_covers_the_slice():
    rng = to_range("ab\ncd", 1, 4)
    assert (rng.start.line, rng.start.character, rng.end.line, rng.end.character) == (0, 1, 1, 1)


@pytest.mark.parametrize(
    ("text", "start", "end", "new", "expected"),
    [
        ("héllo 😀 wörld", (0, 9), (0, 9), "big ", "héllo 😀 big wörld"),
        ("a\r\nb\r\n", (1, 1), (1, 1), "c", "a\r\nbc\r\n"),
        ("a\r\nb\r\n", (0, 1), (1, 0), "", "ab\r\n"),
        ("ab", (0, 2), (0, 2), "\n", "ab\n"),
        ("ab\n", (1, 0), (1, 0), "c", "ab\nc"),
    ],
)
def test_apply_change_incremental(text, start, end, new, expected):
    change = types.TextDocumentContentChangePartial(
        range=types.Range(
            start=types.Position(line=start[0], character=start[1]),
            end=types.Position(line=end[0], character=end[1]),
        ),
        text=new,
    )
    assert apply_change(text, change) == expected


def _edit(text: str, start: int, end: int, new: str, encoding: str | None = None) -> str:
    change = types.TextDocumentContentChangePartial(
        range=types.Range(
            start=types.Position(line=0, character=start),
            end=types.Position(line=0, character=end),
        ),
        text=new,
    )
    return apply_change(text, change, encoding)


def test_utf16_edits_may_split_a_surrogate_pair():
    # A client diffing in UTF-16 units turns 😀 (d83d de00) into 😁 (d83d de01) by replacing
    # the low half alone: both ends had snapped to the emoji's start, the whole emoji went
    # and the copy held one unit less than the client's from there on.
    assert _edit("a😀b = (", 2, 3, "\ude01") == "a😁b = ("
    assert _edit("a😀b = (", 1, 2, "\ud83d") == "a😀b = ("
    halves = _edit(_edit("ab", 1, 1, "\ud83d"), 2, 2, "\ude00")  # one half at a time
    assert halves == "a😀b"
    assert _edit("a😀b", 1, 3, "") == "ab"
    assert _edit("a😀b", 2, 5, "", "utf-8") == "ab"  # inside a UTF-8 character: its start


def test_apply_change_full_replaces_text():
    assert apply_change("old", types.TextDocumentContentChangeWholeDocument(text="new")) == "new"


def _units_one_by_one(text: str, encoding: str) -> list[int]:
    """Code units of each character, as the LSP spec defines them per encoding."""
    if encoding == types.PositionEncodingKind.Utf8:
        return [len(c.encode("utf-8", "surrogatepass")) for c in text]
    if encoding == types.PositionEncodingKind.Utf16:
        return [2 if ord(c) > 0xFFFF else 1 for c in text]
    return [1] * len(text)


@pytest.mark.parametrize(
    "encoding",
    [
        types.PositionEncodingKind.Utf8,
        types.PositionEncodingKind.Utf16,
        types.PositionEncodingKind.Utf32,
    ],
)
def test_positions_equal_counting_units_one_character_at_a_time(encoding):
    # The positions skip from one wide character to the next; a character at a time is the
    # definition. Every position of a line, with ASCII, 2-, 3- and 4-byte characters and a
    # lone surrogate, and past the line's end.
    line = "a\u00e9\u4e2d😀b\ud800😀😀c"
    text = f"x\n{line}\ny"
    widths = _units_one_by_one(line, encoding)
    for character in range(sum(widths) + 3):
        index, counted = 0, 0
        while index < len(line) and counted + widths[index] <= character:
            counted += widths[index]
            index += 1
        assert offset_at(text, 1, character, encoding) == 2 + index, character
        if counted == character:  # on a character boundary: the way back
            assert position_at(text, 2 + index, encoding) == types.Position(1, character)


def test_the_daemon_resolves_the_positions_the_server_sends_to_the_same_offsets():
    # A lone \r breaks a line for the editor; the daemon must count it too, or a request
    # below it points at the wrong place (or past the end).
    from codelm.daemon.errors import BadRequest
    from codelm.daemon.protocol import offset_at as daemon_offset_at

    text = "def f():\r    return '😀'\r\nx = 1\ny"
    for offset in range(len(text) + 1):
        pos = position_at(text, offset)  # between \r and \n: before the \r
        assert daemon_offset_at(text, pos.line, pos.character) == offset_at(
            text, pos.line, pos.character
        )
    with pytest.raises(BadRequest, match="past the end of the document"):
        daemon_offset_at(text, 4, 0)
    with pytest.raises(BadRequest, match="past the end of line 0"):
        daemon_offset_at(text, 0, 9)
    with pytest.raises(BadRequest, match="inside a surrogate pair"):
        daemon_offset_at(text, 1, 13)  # "    return '" is 12 units, the emoji 2


def _lines(n: int, ending: str) -> str:
    return "".join(f"line {i} of text{ending}" for i in range(n))


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_text_window_covers_the_cursor_in_steps_and_keeps_crlf_whole(ending):
    from codelm.daemon.protocol import (
        SEND_MARGIN_CHARS,
        SEND_STEP_CHARS,
        offset_at,
        position_of,
        text_window,
    )

    text = _lines(40_000, ending)
    windows = set()
    for offset in range(0, len(text) + 1, 997):
        if text[offset - 1 : offset + 1] == "\r\n":
            continue  # not a position
        start, end = text_window(text, offset)
        windows.add((start, end))
        assert start <= max(0, offset - SEND_MARGIN_CHARS)
        assert end >= min(len(text), offset + SEND_MARGIN_CHARS)
        for cut in (start, end):
            assert text[cut - 1 : cut + 1] != "\r\n"
        sent = text[start:end]
        assert offset_at(sent, *position_of(sent, offset - start)) == offset - start
    # A few windows for the whole walk: the ends move in steps.
    assert len(windows) <= len(text) // SEND_STEP_CHARS + 2


def test_text_window_keeps_small_texts_whole():
    from codelm.daemon.protocol import text_window

    assert text_window("x = 1\n" * 1000, 3000) == (0, 6000)


# What users type that stresses positions: wide characters, every line ending, lone halves.
_HIGH, _LOW = range(0xD800, 0xDC00), range(0xDC00, 0xE000)
_PIECES = ("a", "bc", " ", "\t", "\n", "\r\n", "\r", "é", "中", "😀", "👍🏽", "\u200b", "\x0c")


class _ClientText:
    """A document as an editor holds it: code units of `encoding` (UTF-16 ones, as VS Code
    does, may come apart into halves), edited by (line, character) positions in those units."""

    def __init__(self, text: str, encoding: str) -> None:
        self.encoding = encoding
        self.units = self._encode(text)

    def _encode(self, text: str) -> list[int]:
        if self.encoding == "utf-8":
            return list(text.encode("utf-8"))
        if self.encoding == "utf-32":
            return [ord(ch) for ch in text]
        return list(memoryview(text.encode("utf-16-le", "surrogatepass")).cast("H"))

    def positions(self) -> list[tuple[int, int, int]]:
        """(unit index, line, character) of every place a client may name: not between \\r
        and \\n, nor inside a UTF-8 or UTF-32 character (a UTF-16 pair may be split)."""
        places, line, character = [], 0, 0
        for i, unit in enumerate([*self.units, None]):
            after_cr = i > 0 and self.units[i - 1] == 0x0D
            if not (after_cr and unit == 0x0A) and not (
                self.encoding == "utf-8" and unit is not None and 0x80 <= unit < 0xC0
            ):
                places.append((i, line, character))
            if unit == 0x0A or (unit == 0x0D and self.units[i + 1 : i + 2] != [0x0A]):
                line, character = line + 1, 0
            elif unit != 0x0D:
                character += 1
        return places

    def edit(self, start: int, end: int, new: str) -> None:
        self.units[start:end] = self._encode(new)

    def text(self) -> str:
        """The units as a str, a UTF-16 pair as its one character (halves apart stay apart)."""
        if self.encoding == "utf-8":
            return bytes(self.units).decode("utf-8")
        if self.encoding == "utf-32":
            return "".join(map(chr, self.units))
        data = b"".join(unit.to_bytes(2, "little") for unit in self.units)
        return data.decode("utf-16-le", "surrogatepass")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8", "utf-32"])
def test_random_edits_leave_the_same_text_as_the_client(encoding):
    """Thousands of random incremental edits, in the client's own units, between wide
    characters, at line ends of every kind, a UTF-16 pair's halves replaced one at a time:
    after each, the server's copy is the client's, and every position maps to its place."""
    rng = random.Random(encoding)
    lsp_encoding = None if encoding == "utf-16" else encoding
    text = "def f():\r\n    return '😀'\n"
    client = _ClientText(text, encoding)
    for step in range(3000):
        places = client.positions()
        (start, *a), (end, *b) = sorted(rng.sample(places, 2) if len(places) > 1 else places * 2)
        if encoding == "utf-16" and rng.random() < 0.1 and start < len(client.units):
            # One half of a pair replaced by another, as a client diffing in units sends it.
            new = "".join(rng.choice("\ud83d\ude00\ude01") for _ in range(rng.randint(1, 2)))
        else:
            new = "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 3)))
        if len(client.units) > 400:
            new = ""
        change = types.TextDocumentContentChangePartial(
            range=types.Range(
                start=types.Position(line=a[0], character=a[1]),
                end=types.Position(line=b[0], character=b[1]),
            ),
            text=new,
        )
        client.edit(start, end, new)
        text = apply_change(text, change, lsp_encoding)
        assert text == client.text(), f"step {step}: {change}"
    units = client.units
    for index, line, character in client.positions():
        if 0 < index < len(units) and units[index - 1] in _HIGH and units[index] in _LOW:
            continue  # inside a pair: offset_at gives the character's start
        offset = offset_at(text, line, character, lsp_encoding)
        assert len(client._encode(text[:offset])) == index
