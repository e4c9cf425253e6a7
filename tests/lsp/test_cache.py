from __future__ import annotations

from codelm.lsp.cache import DocState, TypingCache
from codelm.lsp.postprocess import Suggestion

URI = "file:///t.py"


def _store(cache: TypingCache, prefix: str, suffix: str, text: str, replace_after: int = 0):
    cache.store(
        DocState.of(URI, prefix, suffix), [Suggestion(text=text, replace_after=replace_after)], "r1"
    )


def test_cache_answers_remainder_when_user_types_suggestion_prefix():
    cache = TypingCache()
    _store(cache, "print(", ")\n", '"héllo 😀")', replace_after=1)
    hit = cache.lookup(DocState.of(URI, 'print("hé', ")\n"))
    assert hit is not None
    assert hit.suggestions == [Suggestion(text='llo 😀")', replace_after=1)]
    assert (hit.typed_chars, hit.request_id) == (3, "r1")


def test_cache_misses_when_typed_text_diverges():
    cache = TypingCache()
    _store(cache, "x = ", "", "compute()")
    assert cache.lookup(DocState.of(URI, "x = cx", "")) is None
    assert cache.misses == 1


def test_cache_misses_when_suffix_changed():
    cache = TypingCache()
    _store(cache, "x = ", "\ny", "compute()")
    assert cache.lookup(DocState.of(URI, "x = c", "\nz")) is None


def test_cache_misses_once_suggestion_fully_typed():
    cache = TypingCache()
    _store(cache, "x = ", "", "ab")
    assert cache.lookup(DocState.of(URI, "x = ab", "")) is None


def test_cache_keys_include_uri():
    cache = TypingCache()
    _store(cache, "x = ", "", "abc")
    assert cache.lookup(DocState.of("file:///other.py", "x = a", "")) is None


def test_cache_evicts_least_recently_used():
    cache = TypingCache(max_entries=6)
    _store(cache, "a", "", "1234")  # 4 entries
    _store(cache, "b", "", "5678")  # 4 more: the oldest two of "a" go
    assert len(cache) == 6
    assert cache.lookup(DocState.of(URI, "a", "")) is None
    assert cache.lookup(DocState.of(URI, "b56", "")) is not None


def test_cache_forget_drops_a_document():
    cache = TypingCache()
    _store(cache, "a", "", "1234")
    cache.forget(URI)
    assert len(cache) == 0


def _typed(cache: TypingCache, prefix: str, suffix: str) -> Suggestion | None:
    hit = cache.lookup(DocState.of(URI, prefix, suffix))
    return None if hit is None else hit.suggestions[0]


def test_typing_through_goes_on_in_an_editor_that_closes_brackets_and_quotes():
    # VS Code closes each ( [ { and opening quote typed: the text after the cursor gained a
    # `)` the entries did not know, so typing `compute(` asked the daemon again.
    cache = TypingCache()
    _store(cache, "x = ", "\n", "compute(a, 'b') + 1")
    assert _typed(cache, "x = compute(", ")\n") == Suggestion(text="a, 'b') + 1", replace_after=1)
    assert _typed(cache, "x = compute(a, '", "')\n") == Suggestion(text="b') + 1", replace_after=2)
    assert _typed(cache, "x = compute(a, 'b", "')\n") == Suggestion(text="') + 1", replace_after=2)
    assert _typed(cache, "x = compute(a, 'b'", ")\n") == Suggestion(text=") + 1", replace_after=1)
    assert _typed(cache, "x = compute(a, 'b')", "\n") == Suggestion(text=" + 1")
    # An editor that inserts nothing is served as before.
    assert _typed(cache, "x = compute(a, 'b", "\n") == Suggestion(text="') + 1")
    # A quote after a word character is an apostrophe: editors insert no second one.
    _store(cache, "# ", "\n", "don't ask")
    assert _typed(cache, "# don'", "'\n") is None
    assert _typed(cache, "# don'", "\n") == Suggestion(text="t ask")


def test_a_remainder_that_would_change_nothing_is_not_kept():
    # `sum + |, 0);` suggested `item.price, 0);` over `, 0);`: once `item.price` was typed the
    # cache served `, 0);` over `, 0);`, an item that changes nothing.
    cache = TypingCache()
    _store(cache, "t = reduce(sum + ", ", 0);\n", "item.price, 0);", replace_after=5)
    assert _typed(cache, "t = reduce(sum + item.pric", ", 0);\n") == Suggestion(
        text="e, 0);", replace_after=5
    )
    assert _typed(cache, "t = reduce(sum + item.price", ", 0);\n") is None
