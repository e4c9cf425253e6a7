"""Open documents as the editor sees them, kept in sync by didOpen/didChange/didClose, and
the notebooks their cells belong to (notebookDocument/didOpen/didChange/didClose).

We keep our own copy rather than pygls' workspace because pygls splits lines with
str.splitlines, which disagrees with LSP line numbering after a form feed or U+2028.

A completion in a notebook cell sees the whole notebook, as a script would read: the code
cells of the cell's language in order, Markdown cells as comments between them (see `view`).
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

from lsprotocol import types

from .positions import apply_change, offset_at
from .postprocess import line_comment

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Document:
    uri: str
    text: str
    version: int = 0
    language: str | None = None
    # monotonic seconds of recent edits, newest last (the typing rhythm for the debounce)
    edit_times: list[float] = field(default_factory=list)
    opened: float = field(default_factory=time.monotonic)
    edit_line: int | None = None  # where the last edit began (None: not edited, or replaced)
    changes: int = 0  # didChange notifications applied (a request from before one is outdated)
    # (version, edit_line, text): this document's snippet for other files' prompts, as last
    # computed (lsp/context.py)
    snippet: tuple[int, int | None, str] | None = None

    def offset_at(self, position: types.Position, encoding: str | None = None) -> int:
        return offset_at(self.text, position.line, position.character, encoding)


CELL_SEPARATOR = "\n\n"


def uri_to_path(uri: str) -> str | None:
    """The file a `file:` URI names; None for other schemes (untitled:, notebook cells)."""
    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.scheme == "file" else None


def prompt_path(uri: str, roots: Iterable[str]) -> str | None:
    """What a prompt calls the file at `uri`: its path in the innermost of the workspace
    folders `roots` (paths, as uri_to_path gives them) that holds it, as a repository's
    files are named where code models learn to read several of them (`src/app/util.py`);
    the file's name alone outside every folder; None for a URI that names no file."""
    path = uri_to_path(uri)
    if path is None:
        return None
    inner = max(
        (root for r in roots if path.startswith(root := r.rstrip("/") + "/")),
        key=len,
        default=None,
    )
    return path[len(inner) :] if inner else posixpath.basename(path)


@dataclass(slots=True)
class Notebook:
    """A notebook's cells in order; their text documents are in the store, by cell URI."""

    uri: str
    cells: list[str]  # cell document URIs
    markup: set[str]  # of those, the Markdown cells


@dataclass(frozen=True, slots=True)
class View:
    """The text a completion in one document sees, and what the daemon knows it by: the
    document itself, or for a notebook cell its notebook, with the cell at `start`."""

    uri: str
    text: str
    start: int


class DocumentStore:
    """uri -> Document, notebooks and their cells; positions in the negotiated encoding."""

    def __init__(self) -> None:
        self._docs: dict[str, Document] = {}
        self._notebooks: dict[str, Notebook] = {}
        self._notebook_of: dict[str, Notebook] = {}  # cell URI -> its notebook
        self.encoding: str | None = None
        self.roots: tuple[str, ...] = ()  # the workspace folders' paths (prompt_path)

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
        self._apply(doc, params.content_changes, params.text_document.version, now)
        return doc

    def _apply(
        self,
        doc: Document,
        changes: Sequence[types.TextDocumentContentChangeEvent],
        version: int,
        now: float,
    ) -> None:
        for change in changes:
            doc.text = apply_change(doc.text, change, self.encoding)
            edit_range = getattr(change, "range", None)
            doc.edit_line = edit_range.start.line if edit_range is not None else None
        doc.version = version
        doc.changes += 1
        doc.edit_times.append(now)
        del doc.edit_times[:-8]

    def close(self, uri: str) -> None:
        self._docs.pop(uri, None)

    def path_of(self, uri: str) -> str | None:
        return prompt_path(uri, self.roots)

    def get(self, uri: str) -> Document | None:
        return self._docs.get(uri)

    def documents(self) -> list[Document]:
        return list(self._docs.values())

    def open_notebook(self, params: types.DidOpenNotebookDocumentParams) -> None:
        notebook = params.notebook_document
        if notebook.uri in self._notebooks:
            self.close_notebook(notebook.uri)
        book = Notebook(notebook.uri, [], set())
        self._notebooks[book.uri] = book
        self._add_cells(book, 0, notebook.cells, params.cell_text_documents)

    def change_notebook(
        self, params: types.DidChangeNotebookDocumentParams, now: float
    ) -> list[str]:
        """Apply cell moves, additions, removals and edits; the URIs of removed cells."""
        uri = params.notebook_document.uri
        book = self._notebooks.get(uri)
        cells = params.change.cells
        if book is None:
            logger.warning("a change to a notebook that is not open: %s", uri)
            return []
        gone: set[str] = set()
        if cells is not None and cells.structure is not None:
            array = cells.structure.array
            removed = book.cells[array.start : array.start + array.delete_count]
            del book.cells[array.start : array.start + array.delete_count]
            for cell_uri in removed:
                book.markup.discard(cell_uri)
                self._notebook_of.pop(cell_uri, None)
            # A moved cell is removed and added again: its document stays open.
            added = self._add_cells(
                book, array.start, array.cells or (), cells.structure.did_open or ()
            )
            gone = set(removed) - added | {item.uri for item in cells.structure.did_close or ()}
            for cell_uri in gone:
                self._docs.pop(cell_uri, None)
        if cells is not None:
            for cell in cells.data or ():
                self._set_kind(book, cell)
            for content in cells.text_content or ():
                doc = self._docs.get(content.document.uri)
                if doc is not None:
                    self._apply(doc, content.changes, content.document.version, now)
        return sorted(gone)

    def close_notebook(self, uri: str) -> list[str]:
        """Forget the notebook and its cells; the cells' URIs."""
        book = self._notebooks.pop(uri, None)
        if book is None:
            return []
        for cell in book.cells:
            self._docs.pop(cell, None)
            self._notebook_of.pop(cell, None)
        return book.cells

    def _add_cells(
        self,
        book: Notebook,
        at: int,
        cells: Sequence[types.NotebookCell],
        documents: Iterable[types.TextDocumentItem],
    ) -> set[str]:
        added = [cell.document for cell in cells]
        book.cells[at:at] = added
        for cell in cells:
            self._notebook_of[cell.document] = book
            self._set_kind(book, cell)
        for item in documents:
            self.open(item)
        return set(added)

    @staticmethod
    def _set_kind(book: Notebook, cell: types.NotebookCell) -> None:
        if cell.kind == types.NotebookCellKind.Markup:
            book.markup.add(cell.document)
        else:
            book.markup.discard(cell.document)

    def view(self, doc: Document) -> View:
        """What a completion in `doc` sees. In a notebook's code cell: the notebook's code
        cells in its language, in order, each Markdown cell as comment lines (left out in a
        language without line comments), one blank line between cells."""
        book = self._notebook_of.get(doc.uri)
        if book is None or doc.uri in book.markup:
            return View(doc.uri, doc.text, 0)
        comment = line_comment(doc.language)
        parts: list[str] = []
        start = 0
        for uri in book.cells:
            cell = self._docs.get(uri)
            if cell is None:
                continue
            if cell is doc:
                start = sum(map(len, parts)) + len(CELL_SEPARATOR) * len(parts)
                parts.append(cell.text)
            elif uri in book.markup:
                if comment is not None and cell.text.strip():
                    parts.append(_as_comment(cell.text, comment))
            elif cell.language == doc.language:
                parts.append(cell.text)
        return View(book.uri, CELL_SEPARATOR.join(parts), start)

    def __len__(self) -> int:
        return len(self._docs)


def _as_comment(text: str, comment: str) -> str:
    return "\n".join(f"{comment} {line}".rstrip() for line in text.strip("\n").splitlines())
