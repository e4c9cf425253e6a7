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
