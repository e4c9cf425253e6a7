"""Per-document KV prefix cache: token ids + KV of each file's last prompt and generation.

Keyed by document URI, LRU-evicted under a byte budget. Used from the engine worker thread only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from .engine.kv import KVCache

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class CacheStats:
    lookups: int = 0
    hits: int = 0  # lookups that reused at least one token
    reused_tokens: int = 0
    shifted_tokens: int = 0  # reused from after an edit, moved to new positions
    prefilled_tokens: int = 0
    evictions: int = 0
    drafted_tokens: int = 0  # the last suggestion's tokens run as a guess (Engine._draft)
    accepted_tokens: int = 0  # of those, the ones the model generated: no decode step ran
    refreshed_tokens: int = 0  # approximate K/V computed again while idle (Engine.refresh)

    def to_json(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class Entry:
    tokens: list[int]  # the ids whose K/V are in kv[0:len(tokens)]
    kv: KVCache
    # position p -> the greedy pick after tokens[: p + 1], from a forward that ran there
    known: dict[int, int] = field(default_factory=dict)
    # K/V from this position on were computed next to text that no longer precedes them (a
    # run moved after an edit, and what was computed after it): approximate until computed
    # again (Engine.refresh). None: all are what a fresh prefill of `tokens` computes.
    stale_from: int | None = None
    # The last request here was a completion: where the user types, stale K/V are worth
    # computing again while idle; after a warm-up (where the user only looks) they are not.
    refresh: bool = False


class Checkout(NamedTuple):
    kv: KVCache
    reused: int  # tokens kv holds
    old: list[int]  # the tokens the entry held (their K/V stay in kv past `reused`)
    known: dict[int, int]  # Entry.known for positions still valid
    stale_from: int | None  # Entry.stale_from where it is within the reused prefix


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


PROBE_TOKENS = 16  # run starts are found by looking up 16-token windows


def find_moved_run(
    old: list[int], new: list[int], start: int, min_run: int
) -> tuple[int, int, int] | None:
    """After an edit at `start`, the first run of at least `min_run` tokens of new[start:] that
    also stands in old[start:], as (position in new, position in old, length)."""
    firsts: dict[tuple[int, ...], int] = {}
    for j in range(start, len(old) - PROBE_TOKENS + 1):
        firsts.setdefault(tuple(old[j : j + PROBE_TOKENS]), j)
    for q in range(start, len(new) - min_run + 1):
        j = firsts.get(tuple(new[q : q + PROBE_TOKENS]))
        if j is None:
            continue
        n = PROBE_TOKENS
        while q + n < len(new) and j + n < len(old) and new[q + n] == old[j + n]:
            n += 1
        if n >= min_run:
            return q, j, n
    return None


@dataclass
class FileCache:
    """`checkout` hands a document's KV (trimmed to the reusable prefix) to the caller, who
    runs the model and gives it back with `checkin`."""

    budget_bytes: int
    new_kv: Callable[[], KVCache]
    entries: OrderedDict[str, Entry] = field(default_factory=OrderedDict)
    stats: CacheStats = field(default_factory=CacheStats)

    def checkout(self, uri: str | None, tokens: list[int], n_prompt: int | None = None) -> Checkout:
        """KV holding the longest cached prefix of `tokens` (at most len-1): `tokens` is a prompt
        whose first `n_prompt` tokens count in the stats (all by default), then a draft.

        uri None (no document): the best entry of any document lends a copy of its prefix.
        """
        n_prompt = len(tokens) if n_prompt is None else n_prompt
        self.stats.lookups += 1
        entry = self.entries.pop(uri, None) if uri is not None else None
        old: list[int] = []
        known: dict[int, int] = {}
        stale = None
        if entry is not None:
            kv, same, old = entry.kv, common_prefix(entry.tokens, tokens), entry.tokens
            known = {p: t for p, t in entry.known.items() if p < same}
            stale = entry.stale_from
        else:
            kv, same = self._borrow(tokens)
        # Leave one token to run: a generation starts from a forward.
        reused = min(same, len(tokens) - 1)
        kv.trim_to(reused)
        if stale is not None and stale >= reused:
            stale = None
        in_prompt = min(reused, n_prompt)
        self.stats.hits += reused > 0
        self.stats.reused_tokens += in_prompt
        self.stats.prefilled_tokens += n_prompt - in_prompt
        return Checkout(kv, reused, old, known, stale)

    def _borrow(self, tokens: list[int]) -> tuple[KVCache, int]:
        """A new KV holding the longest exact prefix of `tokens` any entry has."""
        best, best_len = None, 0
        for entry in self.entries.values():
            n = common_prefix(entry.tokens, tokens)
            if entry.stale_from is not None:
                n = min(n, entry.stale_from)
            if n > best_len:
                best, best_len = entry, n
        kv = self.new_kv()
        if best is not None:
            kv.reserve(best_len)
            kv.k[:, :, :best_len] = best.kv.k[:, :, :best_len]
            kv.v[:, :, :best_len] = best.kv.v[:, :, :best_len]
            kv.length = best_len
        return kv, best_len

    def checkin(
        self,
        uri: str,
        tokens: list[int],
        kv: KVCache,
        known: dict[int, int] | None = None,
        stale_from: int | None = None,
        refresh: bool = False,
    ) -> None:
        assert kv.length <= len(tokens)
        known = {p: t for p, t in (known or {}).items() if p < kv.length}
        if stale_from is not None and stale_from >= kv.length:
            stale_from = None
        self.entries[uri] = Entry(tokens[: kv.length], kv, known, stale_from, refresh)
        self.entries.move_to_end(uri)
        self._evict(keep=uri)

    def to_refresh(self) -> tuple[str, Entry] | None:
        """The most recently used entry with approximate K/V (Entry.stale_from) that a
        completion ran on (Entry.refresh), if any."""
        items = reversed(self.entries.items())
        return next(((u, e) for u, e in items if e.stale_from is not None and e.refresh), None)

    def stale_tokens(self) -> int:
        """Tokens whose K/V are approximate, in all entries."""
        entries = self.entries.values()
        return sum(len(e.tokens) - e.stale_from for e in entries if e.stale_from is not None)

    def close(self, uri: str) -> bool:
        return self.entries.pop(uri, None) is not None

    @property
    def nbytes(self) -> int:
        return sum(e.kv.nbytes for e in self.entries.values())

    def _evict(self, keep: str) -> None:
        while self.nbytes > self.budget_bytes and len(self.entries) > 1:
            uri = next(iter(self.entries))
            if uri == keep:
                break
            del self.entries[uri]
            self.stats.evictions += 1
            logger.debug("evicted the KV cache of %s", uri)
        entry = self.entries.get(keep)
        if entry is not None and entry.kv.nbytes > self.budget_bytes:
            entry.kv.shrink()

    def to_json(self) -> dict:
        return {
            "entries": len(self.entries),
            "bytes": self.nbytes,
            "budget_bytes": self.budget_bytes,
            "stale_tokens": self.stale_tokens(),
            **self.stats.to_json(),
        }
