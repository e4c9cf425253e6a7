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

from codelm.daemon.protocol import Snippet

from .documents import Document, DocumentStore

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


def snippets(store: DocumentStore, doc: Document, max_files: int) -> tuple[Snippet, ...]:
    """The snippets a request in `doc` brings, the most recently touched file last."""
    if max_files <= 0:
        return ()
    lang = family(doc.language)
    others = [
        (other, path)
        for other in store.documents()
        if other is not doc
        and family(other.language) == lang
        and (path := store.path_of(other.uri)) is not None
    ]
    others.sort(key=lambda pair: _last_touched(pair[0]), reverse=True)
    return tuple(
        Snippet(path=path, text=text)
        for other, path in reversed(others[:max_files])
        if (text := _snippet_of(other))
    )


def _snippet_of(doc: Document) -> str:
    """snippet_text of the document, computed once per version of it."""
    if doc.snippet is None or doc.snippet[:2] != (doc.version, doc.edit_line):
        doc.snippet = (doc.version, doc.edit_line, snippet_text(doc.text, doc.edit_line))
    return doc.snippet[2]


def _last_touched(doc: Document) -> float:
    return max(doc.opened, doc.edit_times[-1] if doc.edit_times else 0.0)
