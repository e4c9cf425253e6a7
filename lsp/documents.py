"""Open documents as the editor sees them, kept in sync by didOpen/didChange/didClose.

We keep our own copy rather than pygls' workspace because pygls splits lines with
str.splitlines, which disagrees with LSP line numbering after a form feed or U+2028.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from lsprotocol import types

from .positions import apply_change, offset_at

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Document:
    uri: str
    text: str
    version: int = 0
    language: str | None = None
    # monotonic seconds of recent edits, newest last (the typing rhythm for the debounce)
    edit_times: list[float] = field(default_factory=list)

    def offset_at(self, position: types.Position, encoding: str | None = None) -> int:
        return offset_at(self.text, position.line, position.character, encoding)


class DocumentStore:
    """uri -> Document; positions in the negotiated encoding."""

    def __init__(self) -> None:
        self._docs: dict[str, Document] = {}
        self.encoding: str | None = None

    def open(self, item: types.TextDocumentItem) -> Document:
        doc = Document(item.uri, item.text, item.version, item.language_id)
        self._docs[item.uri] = doc
        return doc

    def change(self, params: types.DidChangeTextDocumentParams, now: float) -> Document | None:
        uri = params.text_document.uri
        doc = self._docs.get(uri)
        if doc is None:
            logger.warning("didChange for a document that is not open: %s", uri)
            return None
        for change in params.content_changes:
            doc.text = apply_change(doc.text, change, self.encoding)
        doc.version = params.text_document.version
        doc.edit_times.append(now)
        del doc.edit_times[:-8]
        return doc

    def close(self, uri: str) -> None:
        self._docs.pop(uri, None)

    def get(self, uri: str) -> Document | None:
        return self._docs.get(uri)

    def __len__(self) -> int:
        return len(self._docs)
