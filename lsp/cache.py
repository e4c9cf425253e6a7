"""Typing-through cache: when the user types what the last suggestion predicted, answer with
the rest of it at once, without asking the daemon.

A small LRU keyed by document state: (uri, hash of the text before the cursor, hash of the
text after it). Storing a suggestion also stores "forwarding" entries for every state reached
by typing its first k characters (tabby's cache does the same), so a lookup is one dict get:
in an editor that inserts nothing as the user types, and in one that closes each bracket and
quote typed (VS Code, IntelliJ, Neovim with an autopairs plugin), where the text after the
cursor holds the closers it inserted until the user types over them.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

from .postprocess import CLOSER_OF, QUOTES, Suggestion

logger = logging.getLogger(__name__)

_Key = tuple[str, bytes, bytes]


def _hasher(text: str) -> hashlib.blake2b:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16)


@dataclass(frozen=True, slots=True)
class DocState:
    """The document around the cursor, hashed once per request."""

    uri: str
    prefix_hash: hashlib.blake2b  # continued by `store` for the forwarding entries
    suffix_digest: bytes
    suffix: str  # for the forwarding entries: what a suggestion replaces, and after closers
    line_before: str  # the cursor's line up to it: whether a quote typed opens a string

    @classmethod
    def of(cls, uri: str, prefix: str, suffix: str) -> DocState:
        line_before = prefix[prefix.rfind("\n") + 1 :]
        return cls(uri, _hasher(prefix), _hasher(suffix).digest(), suffix, line_before)

    @property
    def key(self) -> _Key:
        return (self.uri, self.prefix_hash.digest(), self.suffix_digest)


@dataclass(frozen=True, slots=True)
class CacheHit:
    suggestions: list[Suggestion]
    request_id: str
    typed_chars: int  # how far the user typed into the original suggestion


class TypingCache:
    def __init__(self, max_entries: int = 2048) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[_Key, CacheHit] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, state: DocState) -> CacheHit | None:
        hit = self._entries.get(state.key)
        if hit is None:
            self.misses += 1
            return None
        self._entries.move_to_end(state.key)
        self.hits += 1
        return hit

    def store(self, state: DocState, suggestions: list[Suggestion], request_id: str) -> None:
        """Remember `suggestions` shown at `state`, and their remainders once typed into."""
        if not suggestions:
            return
        self._put(state.key, CacheHit(suggestions, request_id, 0))
        for s in suggestions:
            hasher = state.prefix_hash.copy()
            closers = ""  # what an auto-closing editor has inserted after the cursor so far
            suffix_digests = {"": state.suffix_digest}  # by the closers before the suffix
            # Typing the last character completes the suggestion: nothing left to show.
            for k, ch in enumerate(s.text[:-1], start=1):
                hasher.update(ch.encode("utf-8", "surrogatepass"))
                closers = _auto_closed(closers, ch, state.line_before, s.text[: k - 1])
                rest = s.text[k:]
                for before in {"", closers}:  # the editor inserts nothing, or those closers
                    replaced = len(before) + s.replace_after
                    if rest == (before + state.suffix)[:replaced]:
                        continue  # the item would change nothing
                    if before not in suffix_digests:
                        suffix_digests[before] = _hasher(before + state.suffix).digest()
                    rest_item = Suggestion(text=rest, replace_after=replaced)
                    key = (state.uri, hasher.digest(), suffix_digests[before])
                    self._put(key, CacheHit([rest_item], request_id, k))

    def clear(self) -> None:
        self._entries.clear()

    def forget(self, uri: str) -> None:
        for key in [k for k in self._entries if k[0] == uri]:
            del self._entries[key]

    def _put(self, key: _Key, hit: CacheHit) -> None:
        self._entries[key] = hit
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def _auto_closed(closers: str, typed: str, line_before: str, typed_before: str) -> str:
    """The closers an auto-closing editor holds after the cursor once `typed` is typed after
    `line_before` and `typed_before` (the suggestion's text typed so far): one typed over goes,
    an opener's closer comes, and so does a quote that opens a string after no word character
    (where VS Code closes one). The two parts are not joined: the line may be long, and this
    runs for each character of each suggestion."""
    if closers[:1] == typed:
        return closers[1:]
    if typed in CLOSER_OF:
        return CLOSER_OF[typed] + closers
    if typed not in QUOTES or (line_before.count(typed) + typed_before.count(typed)) % 2:
        return closers
    before = typed_before[-1:] or line_before[-1:]
    return closers if before.isalnum() or before == "_" else typed + closers
