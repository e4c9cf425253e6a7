"""Snippets of the other open files for a completion's prompt (`context` of /v1/complete).

What the next line calls is often defined in a file the user has open beside this one, and
likeliest where they last edited it. So a request takes, of the open files of the same
language family (with a path: not untitled buffers or notebook cells), the `contextFiles`
most recently edited or opened, each as the lines around its last edit (or its first lines:
the imports and first definitions), the most recent last: the daemon lays them out before
the document in that order and keeps `context_chars` of them, nearest first.

A snippet changes only when its file does, so while the user types in one file its prompt
keeps the same start and the daemon's KV cache of it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from codelm.daemon.protocol import Snippet

from .documents import Document, DocumentStore, uri_to_path

SNIPPET_LINES = 40
LINES_ABOVE_EDIT = 8
SNIPPET_CHARS = 1500

# Languages whose files call into each other; any other language is a family of its own.
_FAMILIES = {
    "javascript": "js",
    "javascriptreact": "js",
    "typescript": "js",
    "typescriptreact": "js",
    "vue": "js",
    "svelte": "js",
    "c": "c",
    "cpp": "c",
    "cuda-cpp": "c",
    "objective-c": "c",
    "objective-cpp": "c",
}


def family(language: str | None) -> str:
    lang = (language or "").lower()
    return _FAMILIES.get(lang, lang)


def snippet_text(text: str, edit_line: int | None) -> str:
    """SNIPPET_LINES lines (SNIPPET_CHARS at most, cut at a line end) from LINES_ABOVE_EDIT
    above `edit_line`, or from the top of a file not edited."""
    start = 0
    for _ in range(max(0, (edit_line or 0) - LINES_ABOVE_EDIT)):
        start = text.find("\n", start) + 1
        if start == 0:  # (the edit was past the end: from the top)
            break
    end = start
    for _ in range(SNIPPET_LINES):
        newline = text.find("\n", end)
        if newline < 0:
            end = len(text)
            break
        end = newline + 1
    chunk = text[start:end]
    if len(chunk) > SNIPPET_CHARS:
        chunk = chunk[: chunk.rfind("\n", 0, SNIPPET_CHARS) + 1]
    return chunk


@dataclass
class ContextPicker:
    """Chooses the snippets; each file's is computed once per version of it."""

    _texts: dict[str, tuple[int, int | None, str]] = field(default_factory=dict)

    def snippets(self, store: DocumentStore, doc: Document, max_files: int) -> tuple[Snippet, ...]:
        if max_files <= 0:
            return ()
        lang = family(doc.language)
        others = [
            d
            for d in store.documents()
            if d is not doc and family(d.language) == lang and uri_to_path(d.uri) is not None
        ]
        others.sort(key=_last_touched, reverse=True)
        chosen = list(reversed(others[:max_files]))
        open_uris = {d.uri for d in others}
        for uri in self._texts.keys() - open_uris:
            del self._texts[uri]
        return tuple(
            Snippet(path=uri_to_path(other.uri) or "", text=text)
            for other in chosen
            if (text := self._text(other))
        )

    def _text(self, doc: Document) -> str:
        kept = self._texts.get(doc.uri)
        if kept is not None and kept[:2] == (doc.version, doc.edit_line):
            return kept[2]
        text = snippet_text(doc.text, doc.edit_line)
        self._texts[doc.uri] = (doc.version, doc.edit_line, text)
        return text


def _last_touched(doc: Document) -> float:
    return max(doc.opened, doc.edit_times[-1] if doc.edit_times else 0.0)
