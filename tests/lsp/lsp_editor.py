"""A test editor: a real `codelm-lsp` subprocess driven over stdio by pytest-lsp's client."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from lsprotocol import types
from pytest_lsp import LanguageClient, make_test_lsp_client

from codelm.lsp.positions import position_at, to_range

STATUS = "codelm/status"


def lsp_command() -> list[str]:
    script = Path(sys.executable).with_name("codelm-lsp")
    found = str(script) if script.exists() else shutil.which("codelm-lsp")
    if found is None:
        pytest.skip("codelm-lsp is not installed (pip install -e .)")
    return [found, "-v"]


def capabilities(*, progress: bool = True) -> types.ClientCapabilities:
    return types.ClientCapabilities(
        general=types.GeneralClientCapabilities(
            position_encodings=[types.PositionEncodingKind.Utf16]
        ),
        window=types.WindowClientCapabilities(work_done_progress=progress),
        text_document=types.TextDocumentClientCapabilities(
            synchronization=types.TextDocumentSyncClientCapabilities(),
            inline_completion=types.InlineCompletionClientCapabilities(),
        ),
        notebook_document=types.NotebookDocumentClientCapabilities(
            synchronization=types.NotebookDocumentSyncClientCapabilities()
        ),
    )


def inline_params(
    uri: str, position: types.Position, invoked: bool = True
) -> types.InlineCompletionParams:
    """An inline completion request at `position`, invoked by the user or automatic."""
    kind = types.InlineCompletionTriggerKind
    return types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=position,
        context=types.InlineCompletionContext(
            trigger_kind=kind.Invoked if invoked else kind.Automatic
        ),
    )


@dataclass
class Editor:
    """A test editor: the pytest-lsp client plus the documents as the editor sees them."""

    client: LanguageClient
    initialize_ms: float
    result: types.InitializeResult
    statuses: list[dict[str, Any]] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)

    def open(self, uri: str, text: str, language: str = "python") -> None:
        self.texts[uri], self.versions[uri] = text, 1
        item = types.TextDocumentItem(uri=uri, language_id=language, version=1, text=text)
        self.client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=item))

    def open_notebook(self, uri: str, cells: list[tuple[str, str]]) -> list[str]:
        """Open a notebook of (language, text) cells, "markdown" ones Markdown cells, as
        VS Code does; the cells' URIs."""
        uris = [f"vscode-notebook-cell:{uri.removeprefix('file:')}#C{i}" for i in range(len(cells))]
        for cell, (_, text) in zip(uris, cells, strict=True):
            self.texts[cell], self.versions[cell] = text, 1
        kind = types.NotebookCellKind
        notebook = types.NotebookDocument(
            uri=uri,
            notebook_type="jupyter-notebook",
            version=1,
            cells=[
                types.NotebookCell(
                    kind=kind.Markup if language == "markdown" else kind.Code, document=cell
                )
                for cell, (language, _) in zip(uris, cells, strict=True)
            ],
        )
        items = [
            types.TextDocumentItem(uri=cell, language_id=language, version=1, text=text)
            for cell, (language, text) in zip(uris, cells, strict=True)
        ]
        self.client.notebook_document_did_open(
            types.DidOpenNotebookDocumentParams(
                notebook_document=notebook, cell_text_documents=items
            )
        )
        return uris

    def insert(self, uri: str, offset: int, new: str) -> None:
        """Send one incremental change inserting `new` at str index `offset`."""
        self.edit(uri, offset, offset, new)

    def edit(self, uri: str, start: int, end: int, new: str) -> None:
        """Send one incremental change replacing str indices [start, end) with `new`."""
        text = self.texts[uri]
        self.texts[uri] = text[:start] + new + text[end:]
        self.versions[uri] += 1
        change = types.TextDocumentContentChangePartial(range=to_range(text, start, end), text=new)
        doc = types.VersionedTextDocumentIdentifier(uri=uri, version=self.versions[uri])
        self.client.text_document_did_change(
            types.DidChangeTextDocumentParams(text_document=doc, content_changes=[change])
        )

    async def inline(
        self, uri: str, offset: int, invoked: bool = False
    ) -> types.InlineCompletionList:
        params = inline_params(uri, position_at(self.texts[uri], offset), invoked)
        result = await self.client.text_document_inline_completion_async(params)
        assert isinstance(result, types.InlineCompletionList)
        return result

    async def command(self, name: str, *args: Any) -> Any:
        params = types.ExecuteCommandParams(command=name, arguments=list(args))
        return await self.client.workspace_execute_command_async(params)

    async def wait_status(self, state: str, timeout_s: float = 20.0) -> dict[str, Any]:
        """Wait (by polling what arrived, never a blind sleep) for a `codelm/status`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for status in self.statuses:
                if status["state"] == state:
                    return status
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {state!r} status; got {self.statuses}")


async def start_editor(
    home: Path, options: dict[str, Any], *, progress: bool = True
) -> tuple[LanguageClient, Editor]:
    client = make_test_lsp_client()
    statuses: list[dict[str, Any]] = []

    @client.feature(STATUS)
    def on_status(params: Any) -> None:
        statuses.append({"state": params.state, "message": params.message})

    env = {**os.environ, "CODELM_HOME": str(home)}
    started = time.perf_counter()
    await client.start_io(*lsp_command(), env=env)
    result = await client.initialize_session(
        types.InitializeParams(
            capabilities=capabilities(progress=progress),
            initialization_options=options,
            root_uri=home.as_uri(),
        )
    )
    initialize_ms = 1000 * (time.perf_counter() - started)
    return client, Editor(client, initialize_ms, result, statuses)
