from __future__ import annotations

import asyncio
import dataclasses

import pytest
from lsprotocol import types

from codelm.daemon.errors import DaemonUnavailable, ModelLoading
from codelm.daemon.protocol import (
    MAX_TEXT_CHARS,
    SEND_STEP_CHARS,
    CompleteRequest,
    CompleteResponse,
    CompletionItem,
    Position,
    Range,
    Timings,
    offset_at,
)
from codelm.lsp import completion
from codelm.lsp.completion import Completer, debounce_ms, is_single_line, skip_reason
from codelm.lsp.documents import DocumentStore
from codelm.lsp.settings import LspSettings

URI = "file:///work/demo.py"


@pytest.mark.parametrize(
    ("before", "after", "reason"),
    [
        ("x = fo", "o", "in the middle of a word"),
        ("x = ", "foo", "before a word"),
        ("f(a, ", "b)", "before a word"),
        ("f(a, ", "+ b)", "text after the cursor on this line"),
        ("print(", ")", None),
        ("s = '", "');", None),
        ("x = ", "   ", None),
        ("", "", None),
        ("  <ul>", "</ul>", None),  # tags the editor closed
        ('  <a href="/">', "</a>", None),
        ("  <ul>", "</ol>", "text after the cursor on this line"),
        ("  <b>", "</b> and more", "text after the cursor on this line"),
    ],
)
def test_skip_reason_for_automatic_trigger(before, after, reason):
    assert skip_reason(before, after, is_invoked=False) == reason


def test_skip_reason_invoked_trigger_always_goes():
    assert skip_reason("x = fo", "o", is_invoked=True) is None


@pytest.mark.parametrize(
    ("before", "after", "mode", "single"),
    [
        ("    ", "", "auto", False),
        ("def f(x):", "", "auto", False),
        ("if (x) {", "", "auto", False),
        ("x = compute(", ")", "auto", True),
        ("int f(int x) {", "}", "auto", False),  # braces the editor closed
        ("  items.map((x) => {", "});", "auto", False),
        ("  f({", "}, x);", "auto", True),  # more than closers after it
        ("x = [", "];", "auto", False),  # and square brackets
        ("x = [", "] + y", "auto", True),
        ("  <ul>", "</ul>", "auto", False),  # and an element's tags
        ("  <li>", "</li>", "auto", False),  # (a first line of text keeps to it: postprocess)
        ("x = 1 +", "", "auto", True),
        ("    ", "", "always", True),
        ("x = 1 +", "", "never", False),
    ],
)
def test_is_single_line_by_context(before, after, mode, single):
    assert is_single_line(before, after, mode) is single


def test_debounce_invoked_goes_at_once():
    assert debounce_ms([0.0, 0.05], 0.05, 75, "x", is_invoked=True) == 0.0


def test_debounce_is_longer_while_typing_fast_than_after_a_pause():
    fast = debounce_ms([0.0, 0.1, 0.2, 0.3], 0.3, 75, "abc", is_invoked=False)
    paused = debounce_ms([0.0, 2.0, 4.0], 4.0, 75, "abc", is_invoked=False)
    assert fast == pytest.approx(150)
    assert paused == pytest.approx(75)


def test_debounce_is_capped_and_shorter_after_a_dot():
    assert debounce_ms([0.0, 0.2, 0.4], 0.4, 75, "abc", is_invoked=False) == pytest.approx(225)
    assert debounce_ms([], 0.0, 80, "obj.", is_invoked=False) == pytest.approx(40)


def test_debounce_counts_time_already_waited():
    assert debounce_ms([1.0], 1.05, 75, "abc", is_invoked=False) == pytest.approx(25)


class FakeLink:
    """A DaemonLink answering from a function, optionally slowly."""

    def __init__(self, answer=lambda req: "", delay_s: float = 0.0, stop_reason="") -> None:
        self.answer = answer
        self.delay_s = delay_s
        self.stop_reason = stop_reason
        self.requests: list[CompleteRequest] = []
        self.cancelled = 0
        self.state = "ready"
        self.slow_notes = 0

    async def complete(self, request: CompleteRequest) -> CompleteResponse:
        self.requests.append(request)
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        text = self.answer(request)
        if isinstance(text, Exception):
            raise text
        here = Position(line=request.line, character=request.character)
        item = CompletionItem(text=text, range=Range(start=here, end=here))
        return CompleteResponse(
            items=[item], timings=Timings(generated_tokens=3), stop_reason=self.stop_reason
        )

    async def close_document(self, uri: str) -> None:
        pass

    def note_slow(self) -> None:
        self.slow_notes += 1


def _completer(link: FakeLink, text: str, **settings) -> Completer:
    docs = DocumentStore()
    docs.open(types.TextDocumentItem(uri=URI, language_id="python", version=1, text=text))
    return Completer(link, docs, LspSettings(**{"debounce_ms": 0, **settings}))


def _at(line: int, character: int) -> types.Position:
    return types.Position(line=line, character=character)


async def test_completer_returns_postprocessed_item_with_range():
    completer = _completer(FakeLink(lambda r: '"hi"))'), "print()\n")
    items = await completer.inline_completion(URI, _at(0, 6), is_invoked=False)
    assert [i.text for i in items] == ['"hi")']
    assert items[0].range == types.Range(start=_at(0, 6), end=_at(0, 7))


@pytest.mark.parametrize(
    ("stop_reason", "shown"),
    [("max_tokens", "y = 2"), ("time_limit", "y = 2"), ("eos", "y = 2\nz = f(")],
)
async def test_a_suggestion_cut_off_by_a_limit_loses_its_unfinished_line(stop_reason, shown):
    completer = _completer(FakeLink(lambda r: "y = 2\nz = f(", stop_reason=stop_reason), "x = 1\n")
    items = await completer.inline_completion(URI, _at(1, 0), is_invoked=True)
    assert [i.text for i in items] == [shown]


async def test_completer_sends_utf16_position_and_single_line_flag():
    link = FakeLink(lambda r: "x")
    completer = _completer(link, "s = '😀' + \n")
    await completer.inline_completion(URI, _at(0, 11), is_invoked=True)
    request = link.requests[0]
    assert (request.line, request.character, request.single_line) == (0, 11, True)
    assert request.max_time_ms == (LspSettings().max_time_ms or None)
    assert (request.path, request.language, request.trigger) == (
        "demo.py",  # (outside every workspace folder: its name)
        "python",
        "invoked",
    )


async def test_completer_newer_request_supersedes_older_one():
    link = FakeLink(lambda r: "value", delay_s=0.2)
    completer = _completer(link, "x = \n")
    first = asyncio.create_task(completer.inline_completion(URI, _at(0, 4), is_invoked=False))
    await asyncio.sleep(0.01)
    second = await completer.inline_completion(URI, _at(0, 4), is_invoked=True)
    assert await first == []
    assert [i.text for i in second] == ["value"]
    assert link.cancelled == 1 and completer.stats.superseded == 1


def _change(completer: Completer, text: str) -> None:
    doc = completer.documents.get(URI)
    whole = types.TextDocumentContentChangeWholeDocument(text=text)
    params = types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=URI, version=doc.version + 1),
        content_changes=[whole],
    )
    completer.documents.change(params, 0.0)


async def test_a_request_the_document_changed_after_is_outdated():
    # The handler starts after the changes read behind the request: its position, read in
    # the newer text, pointed elsewhere (or past the end).
    link = FakeLink(lambda r: "value")
    completer = _completer(link, "x = \n")
    completer.note_request(URI)  # as the request arrives
    _change(completer, "\n")
    assert await completer.inline_completion(URI, _at(0, 4), is_invoked=True) == []
    assert link.requests == [] and completer.stats.superseded == 1
    completer.note_request(URI)  # a request sent after the change goes
    assert [i.text for i in await completer.inline_completion(URI, _at(0, 0), True)] == ["value"]


async def test_an_answer_for_a_document_changed_meanwhile_is_not_shown():
    completer = None

    def answer(request):
        _change(completer, "y = 1\nx = \n")  # the user typed while the daemon answered
        return "value"

    link = FakeLink(answer)
    completer = _completer(link, "x = \n")
    assert await completer.inline_completion(URI, _at(0, 4), is_invoked=True) == []
    assert len(link.requests) == 1 and completer.stats.superseded == 1


async def test_completer_cancelled_request_cancels_daemon_call():
    link = FakeLink(lambda r: "value", delay_s=5)
    completer = _completer(link, "x = \n")
    task = asyncio.create_task(completer.inline_completion(URI, _at(0, 4), is_invoked=False))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert link.cancelled == 1


async def test_completer_debounce_is_cancelled_with_the_request():
    link = FakeLink(lambda r: "value")
    completer = _completer(link, "x = \n", debounce_ms=2000)
    first = asyncio.create_task(completer.inline_completion(URI, _at(0, 4), is_invoked=False))
    await asyncio.sleep(0.01)
    await completer.inline_completion(URI, _at(0, 4), is_invoked=True)
    assert await first == []
    assert len(link.requests) == 1  # the debounced one never reached the daemon


async def test_completer_typing_through_answers_from_cache():
    link = FakeLink(lambda r: "compute(a, b)")
    completer = _completer(link, "x = \n")
    await completer.inline_completion(URI, _at(0, 4), is_invoked=False)
    completer.documents.get(URI).text = "x = com\n"
    items = await completer.inline_completion(URI, _at(0, 7), is_invoked=False)
    assert [i.text for i in items] == ["pute(a, b)"]
    assert len(link.requests) == 1 and completer.stats.cache_hits == 1


async def test_completer_asks_again_once_the_settings_change():
    # A three-line suggestion kept for typing through was still shown after singleLine
    # became "always".
    link = FakeLink(lambda r: "compute(a, b)")
    completer = _completer(link, "x = \n")
    await completer.inline_completion(URI, _at(0, 4), is_invoked=False)
    completer.apply_settings(dataclasses.replace(completer.settings, single_line="always"))
    await completer.inline_completion(URI, _at(0, 4), is_invoked=False)
    assert len(link.requests) == 2 and completer.stats.cache_hits == 0
    completer.apply_settings(completer.settings)  # unchanged: what is kept stays
    await completer.inline_completion(URI, _at(0, 4), is_invoked=False)
    assert len(link.requests) == 2 and completer.stats.cache_hits == 1


async def test_completer_answers_empty_list_when_daemon_is_slow():
    link = FakeLink(lambda r: "late", delay_s=1)
    completer = _completer(link, "x = \n", timeout_ms=50)
    assert await completer.inline_completion(URI, _at(0, 4), is_invoked=False) == []
    assert completer.stats.timeouts == 1 and link.slow_notes == 1


async def test_completer_waits_for_a_slow_answer_and_says_it_is_slow(monkeypatch):
    # The first request on a large file prefills all of it (3-8 s on a laptop's CPU): it had
    # been dropped at 3 s, and the editor asked again only once the user typed.
    monkeypatch.setattr(completion, "SLOW_S", 0.05)
    link = FakeLink(lambda r: "late", delay_s=0.3)
    completer = _completer(link, "x = \n", timeout_ms=2000)
    items = await completer.inline_completion(URI, _at(0, 4), is_invoked=False)
    assert [i.text for i in items] == ["late"] and link.slow_notes == 1
    assert completer.stats.timeouts == 0


async def test_completer_answers_empty_list_when_daemon_is_down():
    completer = _completer(FakeLink(lambda r: DaemonUnavailable("down")), "x = \n")
    assert await completer.inline_completion(URI, _at(0, 4), is_invoked=False) == []
    assert completer.stats.errors == 1


async def test_completer_skips_disabled_language_and_mid_word():
    link = FakeLink(lambda r: "x")
    completer = _completer(link, "value\n", disabled_languages=("python",))
    assert await completer.inline_completion(URI, _at(0, 2), is_invoked=False) == []
    completer.settings = LspSettings(debounce_ms=0)
    assert await completer.inline_completion(URI, _at(0, 2), is_invoked=False) == []
    assert link.requests == [] and completer.stats.skipped == 2


async def test_completer_speaks_the_negotiated_utf8_encoding():
    link = FakeLink(lambda r: "1")
    completer = _completer(link, "é😀 = \n")
    completer.documents.encoding = types.PositionEncodingKind.Utf8
    items = await completer.inline_completion(URI, _at(0, 9), is_invoked=True)  # 2+4+3 bytes
    request = link.requests[0]
    assert request.character == 6  # the daemon always gets UTF-16 units (1 + 2 + 3)
    assert items[0].range.start == _at(0, 9)


async def test_completer_sends_a_lone_surrogate_as_a_replacement_character():
    # The editor may hold one (a half-typed pair, a broken file); the daemon refuses JSON
    # strings with one, so it goes as U+FFFD, which keeps the UTF-16 position.
    link = FakeLink(lambda r: "1")
    completer = _completer(link, "s = '\ud800' + \n")
    await completer.inline_completion(URI, _at(0, 10), is_invoked=True)
    request = link.requests[0]
    assert request.text == "s = '\ufffd' + \n" and request.character == 10


async def test_completer_sends_the_lines_around_the_cursor_of_a_large_file():
    # A 9M-character file (sqlite3.c is one) had every request refused by the daemon (8M at
    # most), and any large file cost a multi-MB JSON body a keystroke.
    text = "".join(f"int value_{i:07d} = compute({i});\n" for i in range(300_000))
    assert len(text) > MAX_TEXT_CHARS
    link = FakeLink(lambda r: " + 1")
    completer = _completer(link, text)
    line, column = 200_000, len("int value_0200000 = compute(200000)")
    items = await completer.inline_completion(URI, _at(line, column), is_invoked=True)
    request = link.requests[0]
    assert len(request.text) < 4 * SEND_STEP_CHARS
    start = text.index(request.text)
    cursor = start + offset_at(request.text, request.line, request.character)
    assert text[:cursor].endswith("int value_0200000 = compute(200000)")
    assert [(i.text, i.range.start) for i in items] == [(" + 1", _at(line, column))]


async def test_completer_types_through_a_suggestion_in_a_large_file():
    # The cache key hashes the text sent, not the whole file; typing along still hits, and
    # an edit inside the window is a new state.
    text = "".join(f"int value_{i:07d} = compute({i});\n" for i in range(300_000))
    link = FakeLink(lambda r: " + offset")
    completer = _completer(link, text)
    line, column = 200_000, len("int value_0200000 = compute(200000)")
    await completer.inline_completion(URI, _at(line, column), is_invoked=True)
    offset = text.index("int value_0200000 = compute(200000)") + column
    doc = completer.documents.get(URI)
    doc.text = text[:offset] + " + of" + text[offset:]
    items = await completer.inline_completion(URI, _at(line, column + 5), is_invoked=False)
    assert [i.text for i in items] == ["fset"] and len(link.requests) == 1
    doc.text = doc.text.replace("value_0199990", "value_x", 1)  # 10 lines above the cursor
    await completer.inline_completion(URI, _at(line, column + 5), is_invoked=False)
    assert len(link.requests) == 2


async def test_a_suggestion_asked_under_old_settings_is_not_kept_for_the_new_ones():
    # Settings that changed while a request was in flight: the cache was cleared, then the
    # answer shaped by the old settings was stored, and typing through served it.
    link = FakeLink(lambda r: "compute(a, b)", delay_s=0.2)
    completer = _completer(link, "x = \n")
    asked = asyncio.create_task(completer.inline_completion(URI, _at(0, 4), is_invoked=False))
    await asyncio.sleep(0.05)
    completer.apply_settings(dataclasses.replace(completer.settings, max_tokens=7))
    assert [i.text for i in await asked] == ["compute(a, b)"]  # shown: it was asked for
    completer.documents.get(URI).text = "x = com\n"
    await completer.inline_completion(URI, _at(0, 7), is_invoked=False)
    assert len(link.requests) == 2 and completer.stats.cache_hits == 0


async def test_a_warmup_asks_the_daemon_to_prefill_where_the_cursor_rests(monkeypatch):
    monkeypatch.setattr(completion, "WARMUP_DELAY_S", 0.01)
    link = FakeLink(lambda r: "os.listdir()", stop_reason="max_tokens")
    completer = _completer(link, "import os\n\nfiles = \n")
    completer.warm(URI, _at(0, 3))
    completer.warm(URI, _at(2, 8))  # the cursor moved on before the first one went
    await asyncio.wait_for(completer._warming, 5)
    [request] = link.requests
    assert (request.max_tokens, request.line, request.character) == (0, 2, 8)
    assert (request.trigger, request.path) == ("automatic", "demo.py")  # as typing will ask
    assert completer.stats.warmups == 1
    # Its suggestion was cut at the warm-up's few tokens: a completion there afterwards is
    # an ordinary one.
    await completer.inline_completion(URI, _at(2, 8), is_invoked=False)
    assert link.requests[-1].max_tokens == LspSettings().max_tokens


@pytest.mark.parametrize(
    ("text", "kept"),
    [("import os\n\nfiles = \n", True), ("import os\n\nfiles = sorted\n", False)],
    ids=["line-end", "before-a-word"],
)
async def test_a_warmup_suggestion_answers_the_first_key_along_it_at_once(monkeypatch, text, kept):
    # The first key after the cursor rested waited for the debounce and a daemon call, which
    # decoded what the warm-up had decoded there already.
    monkeypatch.setattr(completion, "WARMUP_DELAY_S", 0.01)
    link = FakeLink(lambda r: "os.listdir()", stop_reason="single_line")
    completer = _completer(link, text, debounce_ms=75)
    completer.warm(URI, _at(2, 8))
    await asyncio.wait_for(completer._warming, 5)
    doc = completer.documents.get(URI)
    doc.text = text[: len("import os\n\nfiles = ")] + "o" + text[len("import os\n\nfiles = ") :]
    doc.edit_times.append(completer.clock())
    items = await completer.inline_completion(URI, _at(2, 9), is_invoked=False)
    if kept:  # answered from the typing-through cache, no daemon call
        assert [i.text for i in items] == ["s.listdir()"] and len(link.requests) == 1
    else:  # where an automatic request would not ask, nothing is kept
        assert completer.stats.cache_hits == 0


async def test_no_warmup_while_the_user_types_or_with_the_setting_off(monkeypatch):
    monkeypatch.setattr(completion, "WARMUP_DELAY_S", 0.01)
    link = FakeLink()
    completer = _completer(link, "x = 1\n", warmup=False)
    completer.warm(URI, _at(0, 5))
    assert completer._warming is None
    completer = _completer(link, "x = 1\n")
    completer.documents.get(URI).edit_times.append(completer.clock())
    completer.warm(URI, _at(0, 5))
    await asyncio.wait_for(completer._warming, 5)
    completer.warm("file:///work/not-open.py", _at(0, 0))
    await asyncio.wait_for(completer._warming, 5)
    assert link.requests == [] and completer.stats.warmups == 0


async def test_a_warmup_sent_as_the_model_loads_goes_again_once_it_is_up(monkeypatch):
    monkeypatch.setattr(completion, "WARMUP_DELAY_S", 0.0)
    monkeypatch.setattr(completion, "WARMUP_RETRY_S", 0.01)
    answers = iter([ModelLoading("the codelm daemon is starting")] * 2)
    link = FakeLink(lambda r: next(answers, ""))
    completer = _completer(link, "x = 1\n")
    completer.warm(URI, _at(0, 5))
    await asyncio.wait_for(completer._warming, 5)
    assert [r.max_tokens for r in link.requests] == [0, 0, 0]
    assert completer.stats.warmups == 1
