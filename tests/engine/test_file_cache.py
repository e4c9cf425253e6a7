"""Per-file KV prefix cache: the same tokens with and without the cache, for each edit pattern,
and only the changed tail prefilled."""

from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path

import pytest
import torch

from codelm.daemon.cache import FileCache, find_moved_run
from codelm.daemon.engine.cancel import CancelToken
from codelm.daemon.engine.engine import Engine
from codelm.daemon.engine.generate import prefill
from codelm.daemon.engine.kv import KVCache
from codelm.daemon.engine.layers import apply_rotary
from codelm.daemon.protocol import CompleteRequest

SOURCE = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()[:9000]
URI = "file:///work/textwrap.py"


PREFIX_CHARS = 2400  # a small window keeps the test prompts short (~700 tokens)


@pytest.fixture
def engine(default_engine) -> Engine:
    """The shared engine with an empty cache of its own, a small prefix window, and exact
    reuse only (no position-shifted runs), so cached and uncached tokens are the same."""
    saved = default_engine.config
    default_engine.config = dataclasses.replace(
        saved, prefix_chars=PREFIX_CHARS, cache_reuse_min_tokens=0
    )
    default_engine.cache = FileCache(budget_bytes=1 << 30, new_kv=default_engine.new_kv)
    default_engine.anchors.clear()
    default_engine.suggestions.clear()
    yield default_engine
    default_engine.config = saved


def _request(text: str, cursor: int, uri: str = URI, max_tokens: int = 8) -> CompleteRequest:
    line = text.count("\n", 0, cursor)
    character = cursor - (text.rfind("\n", 0, cursor) + 1)
    return CompleteRequest(
        uri=uri,
        text=text,
        line=line,
        character=character,
        max_tokens=max_tokens,
        trigger="invoked",
    )


def _uncached(engine: Engine, request: CompleteRequest) -> list[int]:
    """The tokens a fresh engine makes: no cache, no last suggestion to draft from."""
    saved = engine.cache, engine.suggestions
    engine.cache = FileCache(budget_bytes=1 << 30, new_kv=engine.new_kv)
    engine.suggestions = {}
    try:
        return engine.complete(request).token_ids
    finally:
        engine.cache, engine.suggestions = saved


def _check(engine: Engine, request: CompleteRequest, max_prefilled: int) -> None:
    response = engine.complete(request)
    assert response.token_ids == _uncached(engine, request)
    assert response.timings.prefilled_tokens <= max_prefilled, response.timings
    assert response.timings.cached_tokens > 0


def _line_end(text: str, at: int) -> int:
    """The end of the line that holds offset `at`."""
    return text.index("\n", at)


def test_file_cache_reuses_prefix_when_typing_at_end_of_line(engine):
    cursor = _line_end(SOURCE, 2000)
    engine.complete(_request(SOURCE, cursor))
    typed = SOURCE[:cursor] + "  # wrap" + SOURCE[cursor:]
    _check(engine, _request(typed, cursor + len("  # wrap")), max_prefilled=8)


def test_file_cache_reuses_prefix_when_deleting_characters(engine):
    cursor = _line_end(SOURCE, 1500)
    engine.complete(_request(SOURCE, cursor))
    deleted = SOURCE[: cursor - 3] + SOURCE[cursor:]
    _check(engine, _request(deleted, cursor - 3), max_prefilled=4)


def test_file_cache_prefills_only_the_pasted_block(engine):
    cursor = _line_end(SOURCE, 2200)
    engine.complete(_request(SOURCE, cursor))
    block = "\n    # pasted\n    lines = text.splitlines()\n    lines = [l for l in lines if l]"
    pasted = SOURCE[:cursor] + block + SOURCE[cursor:]
    n_block = len(engine.tokenizer.encode(block))
    _check(engine, _request(pasted, cursor + len(block)), max_prefilled=n_block + 4)


def test_file_cache_recomputes_only_from_an_edit_inside_the_window(engine):
    cursor = _line_end(SOURCE, 1800)
    assert cursor < PREFIX_CHARS  # the window starts at the top of the file
    engine.complete(_request(SOURCE, cursor))
    at = SOURCE.index("class TextWrapper")
    edited = SOURCE[:at] + "# note\n" + SOURCE[at:]
    request = _request(edited, cursor + len("# note\n"))
    n_before_edit = len(engine.tokenizer.encode("# textwrap.py\n" + SOURCE[:at]))
    response = engine.complete(request)
    assert response.token_ids == _uncached(engine, request)
    assert n_before_edit - 4 <= response.timings.cached_tokens <= n_before_edit + 1


def test_file_cache_reuses_everything_after_an_edit_above_the_window(engine):
    cursor = _line_end(SOURCE, 8000)
    assert cursor > 3 * PREFIX_CHARS  # far below the first line, outside the prefix window
    engine.complete(_request(SOURCE, cursor))
    edited = "# note\n" + SOURCE
    response = engine.complete(_request(edited, cursor + len("# note\n")))
    assert response.timings.prefilled_tokens <= 2


def test_a_warmup_prefills_the_prompt_so_the_first_key_after_it_runs_a_few_tokens(engine):
    cursor = _line_end(SOURCE, 2000)
    warm = engine.complete(_request(SOURCE, cursor, max_tokens=0))
    prompt_len = len(engine.prompt(_request(SOURCE, cursor)).token_ids)
    assert len(warm.items) == 1  # the suggestion it decoded and keeps (below)
    assert (warm.timings.cached_tokens, warm.timings.prefilled_tokens) == (0, prompt_len)
    accepted = engine.cache.stats.accepted_tokens
    again = engine.complete(_request(SOURCE, cursor, max_tokens=0))  # the cursor rests again
    assert again.timings.prefilled_tokens <= 1 and again.token_ids == warm.token_ids
    # Its own suggestion drafted and kept: verified by the kept picks, not decoded again.
    assert engine.cache.stats.accepted_tokens - accepted >= len(warm.token_ids) - 1
    typed = SOURCE[:cursor] + " #" + SOURCE[cursor:]
    _check(engine, _request(typed, cursor + 2), max_prefilled=4)


def test_a_warmup_decodes_what_the_first_key_along_it_then_verifies_at_once(engine):
    # The first key after the cursor rests paid for a new suggestion's decode steps (~14 ms
    # a token for the default model on 2 cores): the warm-up's own suggestion is its draft.
    text = "def clamp(value, low, high):\n    "
    cursor = len(text)
    warm = engine.complete(_request(text, cursor, max_tokens=0))
    [item] = warm.items  # answered too: a client may keep it for the first key (docs/lsp.md)
    suggested = item.text
    assert len(warm.token_ids) > 2 and suggested.strip()
    key = suggested[0]
    typed = text + key
    request = _request(typed, cursor + 1)
    response = engine.complete(request)
    assert response.token_ids == _uncached(engine, request)  # as if nothing was drafted
    assert response.timings.prefilled_tokens <= 2
    assert engine.cache.stats.accepted_tokens > 0


def test_file_cache_keeps_each_open_file(engine):
    other = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_text()[:3000]
    first = _request(SOURCE, _line_end(SOURCE, 1000))
    second = _request(other, _line_end(other, 2000), uri="file:///work/decoder.py")
    engine.complete(first)
    engine.complete(second)
    for request in (first, second):
        response = engine.complete(request)
        assert response.timings.prefilled_tokens == 0  # the last suggestion's tokens ran
        assert response.token_ids == _uncached(engine, request)


def test_file_cache_evicts_least_recently_used_under_a_small_budget(engine):
    engine.cache = FileCache(budget_bytes=1, new_kv=engine.new_kv)
    short = "def f(x):\n    return x\n"
    for i in range(3):
        engine.complete(_request(short, len(short), uri=f"file:///f{i}.py", max_tokens=2))
    assert list(engine.cache.entries) == ["file:///f2.py"]
    assert engine.cache.stats.evictions == 2


def test_file_cache_frees_a_closed_document(engine):
    engine.complete(_request(SOURCE, 200))
    assert engine.close_document(URI)
    assert engine.cache_stats()["entries"] == 0


def test_request_without_a_document_reuses_the_best_entry(engine):
    from codelm.daemon.protocol import OpenAICompletionRequest

    cursor = _line_end(SOURCE, 2000)
    engine.complete(_request(SOURCE, cursor))
    prompt = "# textwrap.py\n" + SOURCE[:cursor]
    response = engine.complete_openai(OpenAICompletionRequest(prompt=prompt, max_tokens=8))
    assert response.timings.cached_tokens >= len(engine.tokenizer.encode(prompt)) - 4


def test_rotary_shift_moves_keys_to_new_positions(default_engine):
    rotary = default_engine.model.rotary
    keys = torch.randn(3, 5, 64)
    positions = torch.arange(100, 105)
    cos, sin = rotary(positions, torch.float32)
    moved = rotary.shift(apply_rotary(keys, cos, sin), 37)
    cos2, sin2 = rotary(positions + 37, torch.float32)
    torch.testing.assert_close(moved, apply_rotary(keys, cos2, sin2), atol=1e-4, rtol=1e-4)


def test_find_moved_run_after_an_insertion():
    old = list(range(100)) + list(range(1000, 1300))
    new = list(range(100)) + [7, 7, 7] + list(range(1000, 1300))
    assert find_moved_run(old, new, 100, 64) == (103, 100, 300)
    assert find_moved_run(old, new, 100, 301) is None


def test_stale_kv_stays_marked_until_a_checkout_keeps_none_and_is_never_lent():
    cache = FileCache(
        budget_bytes=1 << 20, new_kv=lambda: KVCache(1, 1, 4, dtype=torch.float32, max_len=64)
    )
    kv = cache.new_kv()
    kv.reserve(10)
    kv.length = 10
    cache.checkin("a", list(range(10)), kv, stale_from=6, refresh=True)
    assert cache.stale_tokens() == 4 and cache.to_refresh()[0] == "a"
    lent = cache.checkout(None, [*range(10), 99])  # a prompt without a document
    assert lent.reused == 6 and lent.stale_from is None
    typed = [*range(8), 50, 51]
    kept = cache.checkout("a", typed)
    assert (kept.reused, kept.stale_from) == (8, 6)
    kept.kv.length = 10
    cache.checkin("a", typed, kept.kv, stale_from=kept.stale_from)  # a warm-up's
    assert cache.stale_tokens() == 4 and cache.to_refresh() is None
    earlier = cache.checkout("a", [*range(5), 7, 7])
    assert (earlier.reused, earlier.stale_from) == (5, None)
    cache.checkin("a", [*range(5), 7, 7], earlier.kv, stale_from=earlier.stale_from, refresh=True)
    assert cache.stale_tokens() == 0 and cache.to_refresh() is None


def test_shifted_reuse_recomputes_only_the_edit_when_enabled(engine):
    engine.config = dataclasses.replace(engine.config, cache_reuse_min_tokens=64)
    cursor = _line_end(SOURCE, 1800)
    engine.complete(_request(SOURCE, cursor))
    at = SOURCE.index("class TextWrapper")
    edited = SOURCE[:at] + "# note\n" + SOURCE[at:]
    response = engine.complete(_request(edited, cursor + len("# note\n")))
    prompt_len = len(engine.prompt(_request(edited, cursor + len("# note\n"))).token_ids)
    assert response.timings.prefilled_tokens <= 16
    assert response.timings.cached_tokens + response.timings.prefilled_tokens == prompt_len
    assert engine.cache.stats.shifted_tokens > prompt_len // 2
    assert response.items[0].text.strip()


class _CancelAfter(CancelToken):
    """Cancelled once asked `checks` times (a forward asks before each block)."""

    def __init__(self, checks: int) -> None:
        super().__init__()
        self.checks = checks

    @property
    def is_cancelled(self) -> bool:
        self.checks -= 1
        if self.checks < 0:
            self.cancel("a request came")
        return super().is_cancelled


def test_a_refresh_computes_moved_kv_again_as_a_fresh_prefill_does(engine):
    engine.config = dataclasses.replace(engine.config, cache_reuse_min_tokens=64)
    cursor = _line_end(SOURCE, 1800)
    engine.complete(_request(SOURCE, cursor))
    assert not engine.refresh_due()
    at = SOURCE.index("class TextWrapper")
    edited = SOURCE[:at] + "# note\n" + SOURCE[at:]
    # Warmed there (the user looks), the moved K/V wait; completed there, they are due.
    engine.complete(dataclasses.replace(_request(edited, cursor), max_tokens=0))
    assert engine.cache.stale_tokens() > 256 and not engine.refresh_due()
    assert engine.refresh() == 0
    engine.complete(_request(edited, cursor + len("# note\n")))
    entry = engine.cache.entries[URI]
    start, n = entry.stale_from, len(entry.tokens)
    assert engine.cache.stale_tokens() == n - start > 256  # the moved run and all after it
    assert engine.refresh_due()
    picked = sorted(p for p in entry.known if p >= start)  # the suggestion's positions
    assert len(picked) >= 4
    fresh = engine.new_kv()
    with torch.inference_mode():
        tail = n - picked[0]
        logits = prefill(engine.model, fresh, entry.tokens, engine.config.prefill_chunk, None, tail)
    fresh_picks = dict(zip(range(picked[0], n), logits.argmax(dim=-1).tolist(), strict=True))

    def gap(lo: int, hi: int) -> float:
        return max((kv[:, :, lo:hi].float() - ref[:, :, lo:hi].float()).abs().max().item()
                   for kv, ref in ((entry.kv.k, fresh.k), (entry.kv.v, fresh.v)))  # fmt: skip

    assert gap(0, start) <= 0.02 and gap(start, n) > 1.0
    # A request stops it in its second forward: the first forward's positions are done.
    blocks = engine.args.n_layers
    done = engine.refresh(_CancelAfter(blocks + blocks // 2))
    assert done == 128 and entry.stale_from == start + done and entry.kv.length == n
    assert gap(0, start + done) <= 0.02 and gap(start + done, n) > 0.1
    assert engine.refresh() == n - start - done
    assert entry.stale_from is None and engine.cache.stale_tokens() == 0
    assert not engine.refresh_due()
    assert gap(0, n) <= 0.02
    # The picks kept for typing along the suggestion are made again, as fresh logits pick.
    assert {p: entry.known[p] for p in picked} == {p: fresh_picks[p] for p in picked}
    assert engine.cache.stats.refreshed_tokens == n - start
    assert engine.refresh() == 0


def test_typing_along_the_suggestion_verifies_it_instead_of_decoding(engine, forwards):
    cursor = SOURCE.index("        if self.expand_tabs:") + len("        if self.")
    first = engine.complete(_request(SOURCE, cursor, max_tokens=12)).items[0].text
    assert len(first) > 6, first
    typed = first[:3]
    document = SOURCE[:cursor] + typed + SOURCE[cursor:]
    request = _request(document, cursor + len(typed), max_tokens=12)
    accepted = engine.cache.stats.accepted_tokens
    forwards[0] = 0
    response = engine.complete(request)
    n_forwards = forwards[0]
    assert response.token_ids == _uncached(engine, request)
    assert response.items[0].text.startswith(first[3:])
    # Nearly all of the old suggestion was confirmed, from the picks kept with the cache: one
    # forward ran the new key, one more at most decoded past the old suggestion's end.
    assert engine.cache.stats.accepted_tokens - accepted >= 6
    assert n_forwards <= 2
    # Typing something else than the suggestion drafts nothing.
    drafted = engine.cache.stats.drafted_tokens
    other = SOURCE[:cursor] + "zq" + SOURCE[cursor:]
    engine.complete(_request(other, cursor + 2, max_tokens=12))
    assert engine.cache.stats.drafted_tokens == drafted


def test_suggestions_and_window_anchors_leave_with_the_evicted_kv(engine):
    # A client that never closes its documents: what the engine keeps per document beside its
    # KV (the window's anchor, the last suggestion) goes when the cache evicts that KV.
    engine.cache.budget_bytes = 1  # room for the latest entry only
    for i in range(4):
        engine.complete(_request(SOURCE[:600], 600, uri=f"file:///f{i}.py", max_tokens=2))
    assert set(engine.cache.entries) == {"file:///f3.py"}
    assert set(engine.anchors) == set(engine.suggestions) == {"file:///f3.py"}


def test_showing_a_prompt_leaves_the_window_where_completions_put_it(engine):
    # `codelm-daemon prompt` asks the running daemon: a look must not move the window a
    # later completion of the file starts from.
    engine.complete(_request(SOURCE, _line_end(SOURCE, 5000)))
    anchors = dict(engine.anchors)
    engine.prompt(_request(SOURCE, _line_end(SOURCE, 8500)))
    assert engine.anchors == anchors


def test_windows_of_many_tokens_a_character_narrow_to_leave_room(engine, monkeypatch):
    # The windows are counted in characters; emoji take several tokens each, so with a short
    # context the prompt is cut to fit instead of being refused.
    monkeypatch.setattr(engine, "args", dataclasses.replace(engine.args, max_len=512))
    text = "# " + "\N{GRINNING FACE}" * 400 + "\nx = "
    request = _request(text, len(text), max_tokens=8)
    assert len(engine.tokenizer.encode(text)) > 512
    response = engine.complete(request)
    assert len(response.token_ids) > 0
    assert 0 < response.timings.prefilled_tokens <= 512 - 8


def _prompt_ids(engine: Engine, request: CompleteRequest, cursor: int) -> list[int]:
    return engine._build(request, cursor, remember=False).token_ids


def test_windows_narrow_to_fit_inside_the_prefix_setting_and_past_an_anchor(engine, monkeypatch):
    # Narrowing scaled the prefix_chars setting, not what the window held: with the cursor
    # inside the setting the window started at 0 pass after pass, and the request was refused
    # ("the prompt and max_tokens do not fit"). A document whose window had started at 0
    # before kept it there (the anchor's leeway), refused where a new URI was served.
    code = SOURCE[:1500]
    emoji = "\N{GRINNING FACE}" * 40
    text = code + "".join(f"s{i} = '{emoji}'\n" for i in range(12)) + "x = "
    cursor = len(text)
    assert cursor < PREFIX_CHARS
    wide = _prompt_ids(engine, _request(text, cursor, uri="file:///wide/textwrap.py"), cursor)
    monkeypatch.setattr(engine, "args", dataclasses.replace(engine.args, max_len=len(wide) - 40))
    engine.complete(_request(code, len(code)))  # the document's window starts at 0
    assert engine.anchors[URI] == code[: len(engine.anchors[URI])]
    warm = _request(text, cursor, max_tokens=8)
    new = _request(text, cursor, uri="file:///elsewhere/textwrap.py", max_tokens=8)
    assert len(_prompt_ids(engine, warm, cursor)) <= len(wide) - 40 - 8
    assert _prompt_ids(engine, warm, cursor) == _prompt_ids(engine, new, cursor)
    response = engine.complete(warm)
    assert response.token_ids == _uncached(engine, warm) and len(response.token_ids) > 0


def test_a_pasted_copy_of_the_windows_first_lines_does_not_move_the_window(engine):
    # The anchor was looked up from the cursor back: a function duplicated near the cursor
    # (its first lines the window's) moved the window to the copy, a few lines long.
    from codelm.daemon.engine.prompt import window_start

    cursor = _line_end(SOURCE, 6000)
    engine.complete(_request(SOURCE, cursor))
    start = engine._build(_request(SOURCE, cursor), cursor, remember=False).prefix_start
    assert start > 0
    copy = SOURCE[start : start + 600]
    pasted = SOURCE[:cursor] + "\n" + copy + SOURCE[cursor:]
    at = cursor + 1 + len(copy)
    assert window_start(pasted, at, PREFIX_CHARS, engine.anchors[URI]) == start
    warm = engine._build(_request(pasted, at), at, remember=False)
    cold = engine._build(_request(pasted, at, uri="file:///else/textwrap.py"), at, remember=False)
    assert warm.prefix_start <= cold.prefix_start  # the anchor may keep a longer window only


def test_the_lines_a_client_sends_of_a_large_file_prompt_as_the_whole_file(default_engine):
    # Clients send text_window's slice of a large file (daemon/protocol.py): wherever the
    # cursor walks, the engine's windows (its default sizes) lie inside it, anchors included.
    from codelm.daemon.engine.prompt import WINDOW_STEP_CHARS
    from codelm.daemon.protocol import SEND_MARGIN_CHARS, SEND_STEP_CHARS, text_window

    config = default_engine.config
    assert config.prefix_chars + WINDOW_STEP_CHARS + config.suffix_chars <= SEND_MARGIN_CHARS
    assert SEND_STEP_CHARS % WINDOW_STEP_CHARS == 0  # the windows' steps fall where they would

    text = "".join(f"def f{i}(x):\n    return x * {i}  # {'.' * (i % 97)}\n\n" for i in range(9000))
    assert len(text) > 8 * SEND_STEP_CHARS
    for cursor in range(1000, len(text), 7919):  # forward, across many of the slice's steps
        cursor = _line_end(text, cursor)
        start, end = text_window(text, cursor)
        whole = _request(text, cursor, uri="file:///work/whole.py")
        part = _request(text[start:end], cursor - start, uri="file:///work/part.py")
        prompts = [
            default_engine.prompt(dataclasses.replace(r, path="big.py")) for r in (whole, part)
        ]
        assert prompts[0].token_ids == prompts[1].token_ids
