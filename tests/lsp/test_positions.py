from __future__ import annotations

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


def test_apply_change_full_replaces_text():
    assert apply_change("old", types.TextDocumentContentChangeWholeDocument(text="new")) == "new"
