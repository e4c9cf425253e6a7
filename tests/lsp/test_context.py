"""Snippets of the other open files: which files, which lines, in what order."""

from __future__ import annotations

from lsprotocol import types
from test_completion import FakeLink

from codelm.daemon.protocol import Snippet
from codelm.lsp.completion import Completer
from codelm.lsp.context import (
    LINES_ABOVE_EDIT,
    SNIPPET_CHARS,
    SNIPPET_LINES,
    outline_text,
    snippet_text,
    snippets,
)
from codelm.lsp.documents import DocumentStore, prompt_path
from codelm.lsp.settings import LspSettings, settings_from_options

LINES = "".join(f"line {i}\n" for i in range(200))


def test_a_snippet_is_the_lines_around_the_last_edit_or_the_first_lines():
    top = snippet_text(LINES, None)
    assert top == "".join(f"line {i}\n" for i in range(SNIPPET_LINES))
    around = snippet_text(LINES, 100)
    first = 100 - LINES_ABOVE_EDIT
    assert around == "".join(f"line {i}\n" for i in range(first, first + SNIPPET_LINES))
    assert snippet_text(LINES, 3) == top
    assert snippet_text("a\nb", 0) == "a\nb"  # a last line without its newline
    long = "x" * 1000 + "\n" + "y" * 1000 + "\n"
    assert snippet_text(long, None) == "x" * 1000 + "\n"
    assert snippet_text("z" * (SNIPPET_CHARS + 1), None) == ""  # no line fits: no snippet


PYTHON = '''"""Orders and what they cost."""

import dataclasses

TAX = 0.2


@dataclasses.dataclass
class Order:
    """One order.

    Example:
        Order(items=[]).total()
    """

    items: list

    def total(self, *, with_tax=True):
        if with_tax:
            return sum(self.items) * (1 + TAX)
        return sum(self.items)


def refund(order: Order,
           reason: str) -> float:
    for item in order.items:
        print(item)
    return order.total()


if __name__ == "__main__":
    refund(Order([1]), "test")
'''

TYPESCRIPT = """export interface User {
  name: string;
}

export class Store {
  add(user: User): void {
    if (user.name) {
      this.users.push(user);
    }
  }
}

// a comment {
export function makeStore(): Store {
  return new Store();
}
"""


def test_a_file_only_opened_gives_its_outline_the_lines_that_open_its_definitions():
    assert outline_text(PYTHON) == (
        "class Order:\n"
        "    def total(self, *, with_tax=True):\n"
        "def refund(order: Order,\n"
        "           reason: str) -> float:\n"
    )
    assert outline_text(TYPESCRIPT) == (
        "export interface User {\n"
        "export class Store {\n"
        "  add(user: User): void {\n"
        "export function makeStore(): Store {\n"
    )
    assert snippet_text(PYTHON, None) == outline_text(PYTHON)
    edited = PYTHON.splitlines(keepends=True)[20 - LINES_ABOVE_EDIT :]
    assert snippet_text(PYTHON, 20) == "".join(edited)  # edited: the lines around the edit
    # Too few definitions to tell much: the first lines.
    assert snippet_text("x = 1\ndef f():\n    pass\n", None) == "x = 1\ndef f():\n    pass\n"


def test_the_outline_of_a_large_file_is_its_first_definitions_that_fit():
    """The outline holds SNIPPET_CHARS at most: what follows the definitions that fit changes
    nothing (the scan stops there), and a file of 40,000 lines gets the same lines."""
    head = "".join(f"def handler_{i}(request, *, retries=3):\n    return {i}\n" for i in range(60))
    outline = outline_text(head)
    assert outline.startswith("def handler_0(request, *, retries=3):\ndef handler_1(")
    assert SNIPPET_CHARS - 45 < len(outline) <= SNIPPET_CHARS
    tail = "".join(f"x_{i} = {i}\n\nclass C{i}:\n    pass\n" for i in range(20_000))
    assert outline_text(head + tail) == outline


def _open(store: DocumentStore, uri: str, text: str, language: str = "python", at: float = 0.0):
    doc = store.open(types.TextDocumentItem(uri=uri, language_id=language, version=1, text=text))
    doc.opened = at
    return doc


def _edit(store: DocumentStore, uri: str, line: int, text: str, now: float) -> None:
    here = types.Position(line=line, character=0)
    store.change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[
                types.TextDocumentContentChangePartial(
                    range=types.Range(start=here, end=here), text=text
                )
            ],
        ),
        now,
    )


def test_the_most_recently_touched_files_of_the_family_come_nearest_the_document():
    store = DocumentStore()
    store.roots = ("/p",)
    current = _open(store, "file:///p/main.py", "import util\n", at=5.0)
    _open(store, "file:///p/util.py", "def half(x):\n    return x / 2\n", at=1.0)
    _open(store, "file:///p/models.py", "class User:\n    name: str\n", at=2.0)
    _open(store, "file:///p/old.py", "OLD = 1\n", at=0.5)
    _open(store, "file:///p/app.ts", "export const x = 1;\n", "typescript", at=3.0)
    _open(store, "untitled:Untitled-1", "scratch = 1\n", at=4.0)
    _edit(store, "file:///p/util.py", 1, "    # halves\n", now=6.0)
    picked = snippets(store, current, max_files=2)
    assert picked == (
        Snippet("models.py", "class User:\n    name: str\n"),
        Snippet("util.py", "def half(x):\n    # halves\n    return x / 2\n"),
    )
    assert snippets(store, current, max_files=0) == ()
    ts = _open(store, "file:///p/view.tsx", "<App />\n", "typescriptreact", at=7.0)
    assert snippets(store, ts, max_files=3) == (Snippet("app.ts", "export const x = 1;\n"),)


async def test_a_request_brings_the_snippets_and_the_setting_turns_them_off():
    store = DocumentStore()
    _open(store, "file:///p/util.py", "def half(x):\n    return x / 2\n", at=1.0)
    _open(store, "file:///p/main.py", "y = \n", at=2.0)
    link = FakeLink(lambda r: "half(4)")
    completer = Completer(link, store, LspSettings(debounce_ms=0))
    where = types.Position(line=0, character=4)
    await completer.inline_completion("file:///p/main.py", where, is_invoked=True)
    assert link.requests[-1].context == (Snippet("util.py", "def half(x):\n    return x / 2\n"),)
    settings, problems = settings_from_options({"contextFiles": 0, "debounceMs": 0})
    assert problems == [] and settings.context_files == 0
    completer.apply_settings(settings)
    await completer.inline_completion("file:///p/main.py", where, is_invoked=True)
    assert link.requests[-1].context == ()
    _, problems = settings_from_options({"contextFiles": 99})
    assert "contextFiles must be an integer between 0 and 16" in problems[0]


def test_a_file_is_named_by_its_path_in_the_innermost_workspace_folder_that_holds_it():
    roots = ("/home/ada/shop", "/home/ada/shop/web/", "/srv/lib")
    assert prompt_path("file:///home/ada/shop/api/orders.py", roots) == "api/orders.py"
    assert prompt_path("file:///home/ada/shop/web/src/app.ts", roots) == "src/app.ts"
    assert prompt_path("file:///home/ada/shop%20v2/notes.py", roots) == "notes.py"
    assert prompt_path("file:///home/ada/shopping/list.py", roots) == "list.py"  # not a folder's
    assert prompt_path("file:///c%3A/Users/ada/shop/main.go", ["/c:/Users/ada"]) == "shop/main.go"
    assert prompt_path("file:///tmp/scratch.rs", ()) == "scratch.rs"
    assert prompt_path("untitled:Untitled-1", roots) is None
