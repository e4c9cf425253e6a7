"""Stop rules and generation on the default model."""

from __future__ import annotations

import dataclasses
import random
import re
import time
from unittest import mock

import pytest
import torch

from codelm.daemon.engine import engine as engine_module
from codelm.daemon.engine.cancel import CancelToken
from codelm.daemon.engine.engine import _repeats_next_line
from codelm.daemon.engine.generate import StopReason, StopRules, generate
from codelm.daemon.engine.sampling import HealingPicker
from codelm.daemon.errors import Cancelled
from codelm.daemon.protocol import CompleteRequest
from codelm.daemon.stops import ShownText, block_line


def test_stop_rules_hold_back_a_partial_stop_string():
    rules = StopRules(stop_texts=("\ndef ",))
    assert rules.scan("x = 1\nde") == (len("x = 1"), None)
    assert rules.scan("x = 1\ndef f") == (len("x = 1"), StopReason.STOP_TEXT)


def test_stop_rules_single_line_cuts_after_visible_text():
    rules = StopRules(single_line=True)
    assert rules.scan("foo(1)\nbar") == (len("foo(1)"), StopReason.SINGLE_LINE)
    # A leading newline opens the next line; the cut comes after that line's text.
    assert rules.scan("\n    return x\n") == (len("\n    return x"), StopReason.SINGLE_LINE)
    assert rules.scan("\n    ") == (len("\n    "), None)
    # In a CRLF file the line ends before its \r, held back until the \n shows which it is.
    assert rules.scan("y\r\nz") == (1, StopReason.SINGLE_LINE)
    assert rules.scan("y\r") == (1, None)
    assert rules.scan("\r\n    return x\r\n") == (len("\r\n    return x"), StopReason.SINGLE_LINE)


@pytest.mark.parametrize(
    "line_before, text, expected",
    [
        # On a blank line the block is as deep as the cursor; `def` at 0 leaves it, once its
        # first word is whole.
        ("    ", "return x\n\ndef g(", (len("return x\n\n"), StopReason.BLOCK_END)),
        ("    ", "return x\n\nde", (len("return x\n\n"), None)),  # held back
        ("    ", "return x\n\n# Test cases", (len("return x\n\n"), StopReason.BLOCK_END)),
        ("    ", "return x\n  ", (len("return x\n"), None)),  # indentation still short
        ("    ", "return x\n    y = 1\n", (len("return x\n    y = 1\n"), None)),
        # After an opener the block is deeper than its line: `else:` there goes on, the next
        # statement at its indentation leaves.
        (
            "    if a:",
            "\n        b\n    else:\n        c\n",
            (len("\n        b\n    else:\n        c\n"), None),
        ),
        ("    if a:", "\n        b\n    return c", (len("\n        b\n"), StopReason.BLOCK_END)),
        ("    if a:", "\n        b\n    el", (len("\n        b\n"), None)),
        # A blank cursor line whose first line opens a block: statements after that block at
        # its indentation may go on (the server decides).
        (
            "    ",
            "for x in y:\n        b\n    return c\n",
            (len("for x in y:\n        b\n    return c\n"), None),
        ),
        # Closers never stop it (the server keeps the block's own); the line after does.
        (
            "    x = f(",
            "\n        1,\n    )\ny = 2",
            (len("\n        1,\n    )\n"), StopReason.BLOCK_END),
        ),
        ("  if (a) {", "\n    b();\n  }\n}\nint", (len("\n    b();\n  }\n}\n"), None)),
        # A multi-line string's lines sit anywhere.
        ("    ", 's = """\nabc\n"""\nt', (len('s = """\nabc\n"""\n'), None)),
        ("    ", 's = """\nabc\n"""\nt = 1', (len('s = """\nabc\n"""\n'), StopReason.BLOCK_END)),
        ("\t", "return x\n\tpass\nz = 1", (len("return x\n\tpass\n"), StopReason.BLOCK_END)),
    ],
)
def test_stop_rules_block_end(line_before, text, expected):
    assert StopRules(block_line=line_before).scan(text) == expected


def test_block_line_is_off_inside_a_multi_line_string():
    text = 'def f():\n    """Add.\n    \n'
    assert block_line(text, len(text) - 1) is None
    text = 'def f():\n    """Add."""\n    \n'
    assert block_line(text, len(text) - 1) == "    "


def test_a_line_that_may_leave_the_block_is_held_back_from_the_stream():
    pieces: list[str] = []
    shown = ShownText(StopRules(block_line="    "), pieces.append)
    for piece in ("return x", "\n\n", "de"):
        assert shown.add(piece) is None
    assert "".join(pieces) == "return x\n\n"
    assert shown.add("f g") is StopReason.BLOCK_END
    assert "".join(pieces) == shown.text == "return x\n\n"


def test_past_the_deadline_the_next_token_stops_and_shows_what_was_held_back():
    pieces: list[str] = []
    shown = ShownText(
        StopRules(stop_texts=("\ndef",), deadline=time.monotonic() + 60), pieces.append
    )
    assert shown.add("x = 1\nd") is None
    assert "".join(pieces) == "x = 1"  # "\nd" may begin the stop string
    late = ShownText(StopRules(stop_texts=("\ndef",), deadline=time.monotonic()), pieces.append)
    assert late.add("x = 1\nd") is StopReason.TIME_LIMIT
    assert late.finish(StopReason.TIME_LIMIT, "e") == "x = 1\nde" and late.past_stop == ""


def _stream(rules: StopRules, pieces: list[str], tail: str = "") -> tuple[StopReason, str, str]:
    """Feeds `pieces` as both engines do, then `tail` at the end: (stop reason, final text,
    text streamed to on_text). Nothing fed is lost: the text and what was cut off are it."""
    streamed: list[str] = []
    shown = ShownText(rules, streamed.append)
    fed, reason = "", None
    for piece in pieces:
        fed += piece
        reason = shown.add(piece)
        assert shown.text + shown.past_stop == fed and fed.startswith("".join(streamed))
        if reason is not None:
            break
    text = shown.finish(reason or StopReason.EOS, tail)
    if reason is None:
        assert text + shown.past_stop == fed + tail
    return reason or StopReason.EOS, text, "".join(streamed)


@pytest.mark.parametrize(
    "rules, pieces, tail, expected",
    [
        # A `-` at the opener's indentation may begin a list item (the block goes on) or not.
        (StopRules(block_line="a:"), ["\n-", "x"], "", (StopReason.BLOCK_END, "\n")),
        # A stop string that starts before another rule's cut wins once it is whole.
        (StopRules(stop_texts=("b", "abc")), ["ab", "c"], "", (StopReason.STOP_TEXT, "")),
        (
            StopRules(stop_texts=("a\nb",), single_line=True),
            ["a\n", "b"],
            "",
            (StopReason.STOP_TEXT, ""),
        ),
        (
            StopRules(stop_texts=("x\ny z",), block_line="    "),
            ["x\ny ", "z"],
            "",
            (StopReason.STOP_TEXT, ""),
        ),
        # Text held back when generation ends is shown up to a stop string in it.
        (StopRules(stop_texts=("y",), block_line="    "), ["x\ny"], "", (StopReason.EOS, "x\n")),
        (StopRules(stop_texts=("b", "abc")), ["ab"], "", (StopReason.EOS, "a")),
        # What the detokenizer held goes after the block's end, not onto the text.
        (StopRules(block_line="    "), ["x\ny "], "z", (StopReason.BLOCK_END, "x\n")),
    ],
)
def test_where_a_suggestion_stops_does_not_depend_on_its_pieces(rules, pieces, tail, expected):
    text = "".join(pieces)
    for split in (pieces, [text], list(text)):
        reason, shown, streamed = _stream(rules, split, tail)
        assert (reason, shown) == expected and streamed == shown, split


_CODE = (
    *("x", "return x", "pass", "def f(a, b):", "class A:", "@dec", "if a:", "for x in y:"),
    *("else:", "elif b:", "except KeyError:", "finally:", "case 2:", "default:", "public:"),
    *("{", "}", "} else {", "foo(", ")", "],", "=> {", "-> int:", "<div>", "</div>", "<", "</"),
    *("- item", "-", "key:", "el", "de", "e:", 'x = """', '"""Doc."""', '"""', "'''", "`x`"),
    *("```", "print('é')", "# 🙂 note", "y = {'a': [1, 2]}", "a\u0301", "\u2028", "\x0c"),
    *("\u00a0x", "\x85", "\ufeff", "\x00", "\r", "\t"),
)
_INDENTS = ("", " ", "  ", "    ", "        ", "\t", "\t\t", "  \t", "\t ")
_STOPS = ("\n\n", "\ndef", "\ndef ", "def", "```", "<|endoftext|>", "\n", "}", "\r", ":\n", "e")


def _random_code(rng: random.Random) -> str:
    """Up to 8 lines of code-like text after the cursor's: indentation of spaces and tabs,
    blank lines, brackets, strings and docstrings, LF, CRLF or both, odd Unicode."""
    eol = rng.choice(["\n", "\r\n", None])
    lines = [rng.choice(_CODE) if rng.random() < 0.5 else ""]
    for _ in range(rng.randint(0, 8)):
        line = rng.choice(_INDENTS)
        if rng.random() < 0.8:
            line += " ".join(rng.choice(_CODE) for _ in range(rng.randint(1, 2)))
        lines.append((eol or rng.choice(["\n", "\r\n"])) + line)
    return "".join(lines) + rng.choice(["", "", "\n", "\r\n", "\r", " "])


def _random_rules(rng: random.Random, text: str) -> StopRules:
    """Stop strings (many cut from `text`, to be met), and single-line, or the block of a
    random cursor in random code, or neither."""
    stops = []
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        at = rng.randrange(len(text)) if text else 0
        cut = text[at : at + rng.randint(1, 6)]
        stops.append(cut if cut and rng.random() < 0.6 else rng.choice(_STOPS))
    mode = rng.random()
    if mode < 0.3:
        return StopRules(stop_texts=tuple(stops), single_line=True)
    if mode < 0.4:
        return StopRules(stop_texts=tuple(stops))
    document = _random_code(rng)
    line = block_line(document, rng.randint(0, len(document)))
    return StopRules(stop_texts=tuple(stops), block_line=line)


def _random_pieces(rng: random.Random, text: str) -> list[str]:
    ends = sorted(rng.sample(range(1, len(text)), min(len(text[1:]), rng.randint(0, 8))))
    pieces = [text[i:j] for i, j in zip([0, *ends], [*ends, len(text)], strict=True)]
    if rng.random() < 0.2:
        pieces.insert(rng.randint(0, len(pieces)), "")  # a token of an unfinished character
    return pieces


def test_shown_text_does_not_depend_on_how_the_text_was_split():
    """A suggestion comes in token pieces of any size: its text and stop reason must be the
    same fed whole, a character at a time or in random pieces; what was streamed is never
    taken back; it holds no stop string and, single-line, no line break after its text."""
    for seed in range(3000):
        rng = random.Random(seed)
        text = _random_code(rng)
        rules = _random_rules(rng, text)
        tail = rng.choice(["", "", "x", "\n", "def"])
        whole = _stream(rules, [text], tail)
        assert _stream(rules, list(text), tail) == whole, (seed, text, rules)
        assert _stream(rules, _random_pieces(rng, text), tail) == whole, (seed, text, rules)
        reason, shown, streamed = whole
        assert streamed == shown and (text + tail).startswith(shown), seed
        assert not any(stop in shown for stop in rules.stop_texts), seed
        if rules.single_line:
            assert not re.search(r"\S.*\n", shown), seed
        if reason is StopReason.BLOCK_END:
            assert shown.endswith("\n"), seed


def test_a_request_past_its_time_limit_stops_with_what_it_decoded(default_engine):
    text = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    "
    request = CompleteRequest(
        uri="file:///late.py", text=text, line=5, character=4, max_tokens=48, max_time_ms=1
    )
    unlimited = default_engine.complete(dataclasses.replace(request, max_time_ms=None))
    response = default_engine.complete(request)
    assert response.stop_reason == "time_limit"
    # The first token retypes the healed indentation: it stops once there is text to show.
    shown = response.items[0].text
    assert shown.strip() and unlimited.items[0].text.startswith(shown)
    assert response.timings.generated_tokens < unlimited.timings.generated_tokens


def test_a_multi_line_completion_stops_before_the_next_definition(default_engine):
    """SmolLM2 goes on past the function it was asked for; the engine stops where the
    language server would cut, with the same text up to there, in fewer tokens."""
    text = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    "
    request = CompleteRequest(
        uri="file:///math.py", text=text, line=5, character=4, max_tokens=48, single_line=False
    )
    with mock.patch.object(engine_module, "block_line", lambda text, cursor: None):
        full = default_engine.complete(request)
    stopped = default_engine.complete(request)  # (the same prompt: the file's name is in it)
    assert stopped.stop_reason == "block_end"
    assert stopped.timings.generated_tokens < full.timings.generated_tokens
    shown, rest = stopped.items[0].text, full.items[0].text
    assert rest.startswith(shown) and rest[len(shown) :].strip()
    # What it left out starts with a line at the top level; what it kept has none.
    assert not rest[len(shown) :][:1].isspace()
    assert all(line[:1] in ("", " ") for line in shown.split("\n")[1:])


def test_a_key_typed_along_verifies_what_made_the_suggestion_stop_in_one_forward(
    default_engine, forwards
):
    """The draft of a key typed along a suggestion that stopped at its block's end goes on
    past the stop, so the one forward that checks it also sees the block end again."""
    text = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    "
    request = CompleteRequest(
        uri="file:///along.py", text=text, line=5, character=4, max_tokens=48, single_line=False
    )
    first = default_engine.complete(request)
    assert first.stop_reason == "block_end"
    shown = first.items[0].text
    typed = shown[:2]
    forwards[0] = 0
    along = default_engine.complete(
        CompleteRequest(
            uri=request.uri,
            text=text + typed,
            line=5,
            character=4 + len(typed),
            max_tokens=48,
            single_line=False,
        )
    )
    assert along.stop_reason == "block_end" and along.items[0].text == shown[len(typed) :]
    assert forwards[0] == 1


def _prompt(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


def test_generate_stops_at_max_tokens(default_engine):
    rules = StopRules(max_tokens=5)
    ids = _prompt(default_engine, "def add(a, b):\n    return")
    result = generate(
        default_engine.model, default_engine.tokenizer, default_engine.new_kv(), ids, rules
    )
    assert len(result.token_ids) == 5
    assert result.stop_reason is StopReason.MAX_TOKENS
    assert result.text == default_engine.tokenizer.decode(result.token_ids)
    assert result.prefilled_tokens == len(ids) and result.prefill_ms > 0


def test_generate_stops_at_a_stop_string_and_streams_the_same_text(default_engine):
    ids = _prompt(default_engine, "import os\nimport sys\nimport re\nimport json\nimport")
    pieces: list[str] = []
    rules = StopRules(max_tokens=40, stop_texts=("\n",))
    result = generate(
        default_engine.model,
        default_engine.tokenizer,
        default_engine.new_kv(),
        ids,
        rules,
        on_text=pieces.append,
    )
    assert result.stop_reason is StopReason.STOP_TEXT
    assert "\n" not in result.text and result.text.strip()
    assert "".join(pieces) == result.text


def test_generate_raises_cancelled_before_any_block_when_cancelled_first(default_engine):
    cancel = CancelToken()
    cancel.cancel("superseded")
    kv = default_engine.new_kv()
    ids = _prompt(default_engine, "x = 1\n" * 200)
    with pytest.raises(Cancelled):
        generate(
            default_engine.model,
            default_engine.tokenizer,
            kv,
            ids,
            StopRules(),
            chunk=32,
            cancel=cancel,
        )
    assert kv.length == 0


def test_generate_stops_between_blocks_when_cancelled_mid_forward(default_engine):
    """A cancel set while a chunk runs stops it at the next block; the rows the earlier blocks
    wrote lie past kv.length, and the next run overwrites them: its logits are a fresh run's."""
    model, tok = default_engine.model, default_engine.tokenizer
    ids = _prompt(default_engine, "x = 1\n" * 60)
    cancel = CancelToken()
    blocks = model.parts()[1]
    calls = []

    def hook(*_):
        calls.append(1)
        cancel.cancel("superseded")

    handle = blocks[1].register_forward_hook(hook)
    kv = default_engine.new_kv()
    try:
        with pytest.raises(Cancelled, match="superseded"):
            generate(model, tok, kv, ids, StopRules(max_tokens=1), cancel=cancel)
    finally:
        handle.remove()
    assert calls == [1] and kv.length == 0  # block 2 never ran
    again = generate(model, tok, kv, ids, StopRules(max_tokens=4))
    fresh = generate(model, tok, default_engine.new_kv(), ids, StopRules(max_tokens=4))
    assert again.token_ids == fresh.token_ids


@pytest.mark.parametrize(
    ("kind", "accepted", "n_forwards"),
    [("right", 11, 1), ("half", 5, 7), ("wrong", 0, 12), ("stop_inside", 4, 1)],
)
def test_a_draft_changes_nothing_but_the_forwards_it_saves(
    default_engine, forwards, kind, accepted, n_forwards
):
    model, tokenizer = default_engine.model, default_engine.tokenizer
    ids = _prompt(default_engine, "def fib(n):\n    if n < 2:\n        return n\n    return")
    rules = StopRules(max_tokens=12)
    plain = generate(model, tokenizer, default_engine.new_kv(), ids, rules)
    assert len(plain.token_ids) == 12
    other = [(t + 1) % tokenizer.vocab_size for t in plain.token_ids]
    if kind == "stop_inside":  # a stop token the draft runs past
        rules = StopRules(max_tokens=12, stop_ids=frozenset({plain.token_ids[4]}))
        plain = generate(model, tokenizer, default_engine.new_kv(), ids, rules)
    draft = {"wrong": other, "half": plain.token_ids[:5] + other[5:]}.get(kind, plain.token_ids)

    kv = default_engine.new_kv()
    forwards[0] = 0
    drafted = generate(model, tokenizer, kv, ids, rules, draft=draft)
    assert drafted.token_ids == plain.token_ids and drafted.text == plain.text
    assert drafted.stop_reason is plain.stop_reason
    assert drafted.accepted_tokens == accepted and forwards[0] == n_forwards
    # The cache holds the prompt and every generated token but the last (a stop is not kept).
    fed = len(plain.token_ids) - (plain.stop_reason is StopReason.MAX_TOKENS)
    assert kv.length == len(ids) + fed
    # ...and what it holds is what a plain run computes: continuing from it gives plain's tokens.
    kv.trim_to(len(ids) - 1)
    again = generate(model, tokenizer, kv, ids, rules, draft=draft)
    assert again.token_ids == plain.token_ids


def test_known_picks_replace_forwards_over_tokens_already_in_the_cache(default_engine, forwards):
    model, tokenizer = default_engine.model, default_engine.tokenizer
    ids = _prompt(default_engine, "class Stack:\n    def push(self, item):\n        self")
    rules = StopRules(max_tokens=12)
    kv, known = default_engine.new_kv(), {}
    first = generate(model, tokenizer, kv, ids, rules, known=known)
    assert kv.length == len(ids) + 11 and set(range(len(ids) - 1, kv.length)) <= set(known)
    # The same request again, its last suggestion as the draft: the cache holds all of it but
    # the last token, whose forward is the only one to run.
    kv.trim_to(len(ids) + 10)
    forwards[0] = 0
    again = generate(model, tokenizer, kv, ids, rules, draft=first.token_ids, known=known)
    assert again.token_ids == first.token_ids and forwards[0] == 1
    # A wrong pick kept for a position is never used once the tokens before it change.
    kv.trim_to(len(ids))
    known[len(ids) + 3] = (first.token_ids[4] + 1) % tokenizer.vocab_size
    wrong_draft = first.token_ids[:3] + [(first.token_ids[3] + 1) % tokenizer.vocab_size]
    third = generate(model, tokenizer, kv, ids, rules, draft=wrong_draft, known=known)
    assert third.token_ids == first.token_ids


def test_a_banned_token_is_not_picked_at_its_step_even_when_a_pick_is_known(default_engine):
    model, tokenizer = default_engine.model, default_engine.tokenizer
    ids = _prompt(default_engine, "def area(width, height):\n    return")
    rules = StopRules(max_tokens=8)
    kv, known = default_engine.new_kv(), {}
    first = generate(model, tokenizer, kv, ids, rules, known=known)
    kv.trim_to(len(ids) - 1)  # the prompt's last token runs again; `known` holds the picks
    again = generate(model, tokenizer, kv, ids, rules, known=known, ban=(3, first.token_ids[3]))
    assert again.token_ids[:3] == first.token_ids[:3]
    assert again.token_ids[3] != first.token_ids[3]


@pytest.mark.parametrize(
    ("text", "suggestion", "repeats"),
    [
        ("def f(x):\n    \u2038\n    return x\n", "return x", True),
        ("def f(x):\n    \u2038\n\n    return x\n", "\n    return x\n", True),
        ("def f(x):\n    \u2038\n    return x\n", "y = x", False),
        ("def f(x):\n    y = \u2038\n    return x\n", "return x", False),  # not a blank line
        ("def f(x):\n    \u2038\n    )\n", ")", False),  # one character: may well repeat
        ("def f(x):\n    \u2038", "return x", False),  # nothing below
    ],
)
def test_repeats_next_line(text, suggestion, repeats):
    cursor = text.index("\u2038")
    assert _repeats_next_line(text.replace("\u2038", ""), cursor, suggestion) is repeats


def test_a_suggestion_that_repeats_the_next_line_is_asked_again_without_it(default_engine):
    """SmolLM2's prompt is the prefix alone, so with the suggestion's own line put below the
    cursor it would suggest that line again; the engine asks once more instead."""

    def complete(text: str, cursor: int) -> str:
        line = text.count("\n", 0, cursor)
        character = cursor - (text.rfind("\n", 0, cursor) + 1)
        request = CompleteRequest(
            uri="file:///repeat.py", text=text, line=line, character=character, max_tokens=12
        )
        return default_engine.complete(request).items[0].text

    before = "def area(width, height):\n    "
    first = next(line.strip() for line in complete(before, len(before)).split("\n") if line)
    assert len(first) > 1
    document = before + "\n    " + first + "\n"
    again = complete(document, len(before))
    assert (
        again.strip() and next(line.strip() for line in again.split("\n") if line.strip()) != first
    )


class _SpacesTokenizer:
    """Pieces: runs of 1..12 spaces, then ` if` and `if`; Tokenizer's `fits` rule."""

    pieces = [b" " * n for n in range(1, 13)] + [b" if", b"if"]

    def consistent_tokens(self, required: bytes) -> torch.Tensor:
        return torch.tensor([i for i in range(len(self.pieces)) if self.fits(i, required)])

    def fits(self, token: int, required: bytes) -> bool:
        piece = self.pieces[token]
        return piece.startswith(required) or required.startswith(piece)


def test_healed_indentation_is_spelt_as_a_tokenizer_would_not_a_space_at_a_time():
    # HumanEval/1: 12 spaces healed after a blank line, where the model expected 8 and gave
    # 7 spaces 0.975: the 5 left came one space at a time, and then spaces to max_tokens.
    tokenizer = _SpacesTokenizer()
    seven, eleven, space_if = 6, 10, 12
    logits = torch.full((1, len(tokenizer.pieces)), -10.0)
    logits[0, seven], logits[0, eleven], logits[0, space_if] = 5.0, 1.0, 3.0
    pick = HealingPicker(tokenizer, b" " * 12)  # type: ignore[arg-type]
    assert pick.known(seven, 0) is None  # the argmax is not allowed: the logits decide
    assert pick(logits, 0) == eleven and pick.remaining == b" "
    assert pick.known(space_if, 1) == space_if and pick.remaining == b""
    # Text that is not whitespace may still be spelt in any pieces that fit.
    pick = HealingPicker(tokenizer, b"if")  # type: ignore[arg-type]
    assert pick.known(tokenizer.pieces.index(b"if"), 0) is not None
