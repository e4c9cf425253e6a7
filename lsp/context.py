"""Snippets of the other open files for a completion's prompt (`context` of /v1/complete).

What the next line calls is often defined in a file the user has open beside this one, and
likeliest where they last edited it. So a request takes, of the open files of the same
language family (with a path: not untitled buffers or notebook cells), the `contextFiles`
most recently edited or opened, each as the lines around its last edit or, for a file only
opened, its outline (the lines that open its definitions: the names it offers), the most
recent last: the daemon lays them out before the document in that order and keeps
`context_chars` of them, nearest first.

A snippet changes only when its file does, so while the user types in one file its prompt
keeps the same start and the daemon's KV cache of it holds.
"""

from __future__ import annotations

import re

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
    above `edit_line`; for a file not edited its outline, or its first lines where it has
    fewer than OUTLINE_MIN_LINES lines that open a definition."""
    if edit_line is None:
        outline = outline_text(text)
        if outline.count("\n") >= OUTLINE_MIN_LINES:
            return outline
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
    return _cut(text[start:end])


def outline_text(text: str) -> str:
    """The lines of `text` that open a definition, in order (SNIPPET_CHARS at most): what a
    file the user only opened tells another, the names it defines and how they are called.

    Whatever the language: a line of the file's two outermost indentation levels that a
    deeper one follows (a body), with the lines that close its open brackets, unless it is a
    control statement, a comment, a decorator or inside a triple-quoted string."""
    lines = text.split("\n")
    levels = sorted({_indent(line) for line in lines if line.strip()})[:2]
    # The indentation of the next non-blank line after each line (-1: none). Looked up
    # instead of searched for: a search per line took 3 s on a file of 40,000 definitions.
    below = [-1] * len(lines)
    for j in range(len(lines) - 1, 0, -1):
        below[j - 1] = _indent(lines[j]) if lines[j].strip() else below[j]
    kept: list[str] = []
    size = 0
    in_string = False
    i = 0
    while i < len(lines) and size <= SNIPPET_CHARS:  # (what comes after is cut anyway)
        line, i = lines[i], i + 1
        stripped = line.strip()
        if (line.count('"""') + line.count("'''")) % 2:
            in_string = not in_string
            continue
        if in_string or not stripped or _indent(line) not in levels:
            continue
        if _CONTROL.match(stripped) or stripped.startswith(_NOT_DEFINITIONS):
            continue
        if below[i - 1] <= _indent(line):
            continue
        first = i - 1
        depth = line.count("(") - line.count(")")
        for _ in range(MAX_SIGNATURE_LINES):
            if depth <= 0 or i == len(lines):
                break
            depth += lines[i].count("(") - lines[i].count(")")
            i += 1
        definition = lines[first:i]
        kept += definition
        size += sum(len(kept_line) + 1 for kept_line in definition)
    return _cut("".join(line + "\n" for line in kept))


OUTLINE_MIN_LINES = 3
MAX_SIGNATURE_LINES = 8  # continuation lines of a definition whose brackets are still open
# What opens a block without defining a name, in the languages editors mostly hold.
_CONTROL = re.compile(
    r"(?:if|elif|else|for|foreach|while|do|try|except|catch|finally|with|switch|case|match"
    r"|loop|unless|until|begin|return|select|when|defer|go)\b|[{}()\[\]]"
)
_NOT_DEFINITIONS = ("#", "//", "/*", "*", "--", "@", ";", "<!--")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _cut(chunk: str) -> str:
    """`chunk`, or its lines that fit SNIPPET_CHARS."""
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
