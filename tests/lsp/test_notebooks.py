"""Notebooks: the cells' order and kinds kept from notebookDocument/*, and what a completion
in a cell sees (the notebook as one script) and answers (a range in the cell)."""

from __future__ import annotations

from lsprotocol import types
from test_completion import FakeLink

from codelm.lsp.completion import Completer
from codelm.lsp.documents import DocumentStore
from codelm.lsp.settings import LspSettings

NOTEBOOK = "file:///work/analysis.ipynb"
CODE, MARKUP = types.NotebookCellKind.Code, types.NotebookCellKind.Markup


def cell_uri(name: str) -> str:
    return f"vscode-notebook-cell:/work/analysis.ipynb#{name}"


def cell(name: str, kind: types.NotebookCellKind = CODE) -> types.NotebookCell:
    return types.NotebookCell(kind=kind, document=cell_uri(name))


def item(name: str, text: str, language: str = "python") -> types.TextDocumentItem:
    return types.TextDocumentItem(uri=cell_uri(name), language_id=language, version=1, text=text)


def open_notebook(store: DocumentStore, cells: list[tuple[str, str, str]]) -> None:
    """`cells`: (name, kind "code" or "markdown", text); Markdown cells get that language."""
    store.open_notebook(
        types.DidOpenNotebookDocumentParams(
            notebook_document=types.NotebookDocument(
                uri=NOTEBOOK,
                notebook_type="jupyter-notebook",
                version=1,
                cells=[cell(n, MARKUP if k == "markdown" else CODE) for n, k, _ in cells],
            ),
            cell_text_documents=[
                item(n, t, "markdown" if k == "markdown" else "python") for n, k, t in cells
            ],
        )
    )


def change(
    store: DocumentStore,
    *,
    structure: types.NotebookDocumentCellChangeStructure | None = None,
    data: list[types.NotebookCell] | None = None,
    text: dict[str, str] | None = None,
) -> list[str]:
    """Send a notebook change; `text` replaces whole cells' texts."""
    contents = [
        types.NotebookDocumentCellContentChanges(
            document=types.VersionedTextDocumentIdentifier(uri=cell_uri(name), version=2),
            changes=[types.TextDocumentContentChangeWholeDocument(text=new)],
        )
        for name, new in (text or {}).items()
    ]
    return store.change_notebook(
        types.DidChangeNotebookDocumentParams(
            notebook_document=types.VersionedNotebookDocumentIdentifier(uri=NOTEBOOK, version=2),
            change=types.NotebookDocumentChangeEvent(
                cells=types.NotebookDocumentCellChanges(
                    structure=structure, data=data, text_content=contents or None
                )
            ),
        ),
        now=1.0,
    )


def view_of(store: DocumentStore, name: str) -> tuple[str, str, int]:
    doc = store.get(cell_uri(name))
    assert doc is not None
    view = store.view(doc)
    return view.uri, view.text, view.start


def test_a_code_cell_sees_the_notebook_as_one_script():
    store = DocumentStore()
    open_notebook(
        store,
        [
            ("a", "code", "import pandas as pd\n"),
            ("m", "markdown", "## Load the data\n\nFrom *sales.csv*.\n"),
            ("b", "code", "df = pd.read_csv('sales.csv')"),
            ("c", "code", "df.head()"),
        ],
    )
    uri, text, start = view_of(store, "b")
    assert uri == NOTEBOOK
    assert text == (
        "import pandas as pd\n\n\n"
        "# ## Load the data\n#\n# From *sales.csv*.\n\n"
        "df = pd.read_csv('sales.csv')\n\n"
        "df.head()"
    )
    assert text[start:].startswith("df = pd.read_csv")
    # A Markdown cell is a document of its own.
    assert view_of(store, "m") == (cell_uri("m"), "## Load the data\n\nFrom *sales.csv*.\n", 0)


def test_cells_of_another_language_are_left_out():
    store = DocumentStore()
    open_notebook(store, [("a", "code", "x = 1"), ("b", "code", "y = x")])
    store.open(item("a", "SELECT 1", "sql"))  # the first cell's language changed
    assert view_of(store, "b") == (NOTEBOOK, "y = x", 0)


def test_cells_added_moved_edited_and_removed():
    store = DocumentStore()
    open_notebook(store, [("a", "code", "a = 1"), ("b", "code", "b = 2")])
    # A new cell between them.
    removed = change(
        store,
        structure=types.NotebookDocumentCellChangeStructure(
            array=types.NotebookCellArrayChange(start=1, delete_count=0, cells=[cell("n")]),
            did_open=[item("n", "n = 3")],
        ),
    )
    assert removed == []
    assert view_of(store, "b")[1:] == ("a = 1\n\nn = 3\n\nb = 2", 14)
    # "b" moves to the top: removed and added again, its document stays open.
    change(
        store,
        structure=types.NotebookDocumentCellChangeStructure(
            array=types.NotebookCellArrayChange(
                start=0, delete_count=3, cells=[cell("b"), cell("a"), cell("n")]
            )
        ),
    )
    assert view_of(store, "n")[1:] == ("b = 2\n\na = 1\n\nn = 3", 14)
    # An edit, and "a" turned into Markdown.
    change(store, data=[cell("a", MARKUP)], text={"a": "Sums"})
    assert view_of(store, "n")[1:] == ("b = 2\n\n# Sums\n\nn = 3", 15)
    # "b" deleted.
    removed = change(
        store,
        structure=types.NotebookDocumentCellChangeStructure(
            array=types.NotebookCellArrayChange(start=0, delete_count=1),
            did_close=[types.TextDocumentIdentifier(uri=cell_uri("b"))],
        ),
    )
    assert removed == [cell_uri("b")] and store.get(cell_uri("b")) is None
    assert view_of(store, "n")[1:] == ("# Sums\n\nn = 3", 8)
    assert store.close_notebook(NOTEBOOK) == [cell_uri("a"), cell_uri("n")]
    assert len(store) == 0 and store.close_notebook(NOTEBOOK) == []


def test_a_change_to_a_notebook_never_opened_is_logged_and_ignored(caplog):
    store = DocumentStore()
    assert change(store, text={"a": "x"}) == []
    assert "not open" in caplog.text


async def test_a_completion_in_a_cell_asks_about_the_notebook_and_answers_in_the_cell():
    store = DocumentStore()
    open_notebook(
        store,
        [("a", "code", "import numpy as np\nvalues = [1, 2, 3]\n"), ("b", "code", "total = ")],
    )
    link = FakeLink(lambda r: "np.sum(values)")
    completer = Completer(link, store, LspSettings(debounce_ms=0))
    position = types.Position(line=0, character=8)
    items = await completer.inline_completion(cell_uri("b"), position, is_invoked=False)
    assert [(i.text, i.range.start, i.range.end) for i in items] == [
        ("np.sum(values)", position, position)
    ]
    request = link.requests[0]
    assert request.uri == NOTEBOOK and request.path == "analysis.ipynb"
    assert request.text == "import numpy as np\nvalues = [1, 2, 3]\n\n\ntotal = "
    assert (request.line, request.character) == (4, 8)
    # Typing through the suggestion is answered in the cell too.
    change(store, text={"b": "total = np.s"})
    position = types.Position(line=0, character=12)
    items = await completer.inline_completion(cell_uri("b"), position, is_invoked=False)
    assert [(i.text, i.range.start) for i in items] == [("um(values)", position)]
    assert len(link.requests) == 1
