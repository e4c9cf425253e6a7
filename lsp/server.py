"""build_server(settings) -> pygls LanguageServer: registration only.

Handlers fetch state from the Session and call completion.py / daemon_link.py; the logic
lives there, tested without pygls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import uuid
from typing import Any, BinaryIO

from lsprotocol import types
from pygls.io_ import StdinAsyncReader, StdoutWriter
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method

from . import __version__
from .completion import Completer, ResultItem
from .daemon_link import DaemonLink, HttpDaemonLink
from .documents import DocumentStore, uri_to_path
from .framing import serve
from .settings import LspSettings, describe, runtime_home, settings_from_options

logger = logging.getLogger(__name__)

SERVER_NAME = "codelm-lsp"
STATUS_NOTIFICATION = "codelm/status"
ACCEPT_COMMAND = "codelm.accept"
DISMISS_COMMAND = "codelm.dismiss"
STATS_COMMAND = "codelm.stats"
FOCUS_NOTIFICATION = "codelm/didFocus"  # {textDocument: {uri}, position}: where the user looks
PROGRESS_TIMEOUT_S = 2.0
MAX_ACCEPTED_CHARS = 1 << 20  # what one accepted suggestion can plausibly hold


class EditorStatus:
    """StatusSink for the daemon link: `codelm/status`, work-done progress, showMessage."""

    def __init__(self, server: LanguageServer) -> None:
        self.server = server
        self._token: str | None = None

    def status(self, state: str, message: str) -> None:
        self.server.protocol.notify(STATUS_NOTIFICATION, {"state": state, "message": message})

    def show(self, message: str, is_error: bool) -> None:
        kind = types.MessageType.Error if is_error else types.MessageType.Warning
        self.server.window_show_message(types.ShowMessageParams(type=kind, message=message))

    async def progress(self, stage: str, message: str) -> None:
        window = self.server.client_capabilities.window
        if not (window and window.work_done_progress):
            return
        progress = self.server.work_done_progress
        if stage == "begin" and self._token is None:
            token = f"codelm-{uuid.uuid4().hex[:8]}"
            try:
                await asyncio.wait_for(progress.create_async(token), PROGRESS_TIMEOUT_S)
            except Exception as exc:  # the client may refuse or never answer
                logger.debug("no work-done progress: %s", exc)
                return
            self._token = token
            progress.begin(token, types.WorkDoneProgressBegin(title="codelm", message=message))
        elif stage == "report" and self._token is not None:
            progress.report(self._token, types.WorkDoneProgressReport(message=message))
        elif stage == "end" and self._token is not None:
            progress.end(self._token, types.WorkDoneProgressEnd(message=message or None))
            self._token = None


class Session:
    """Everything one server process keeps between requests."""

    def __init__(self, server: LanguageServer, settings: LspSettings, link: DaemonLink | None):
        self.settings = settings
        self.documents = DocumentStore()
        self.link = link or HttpDaemonLink(settings, EditorStatus(server), runtime_home())
        self.completer = Completer(self.link, self.documents, settings)

    def update(self, settings: LspSettings) -> None:
        self.settings = settings
        self.completer.apply_settings(settings)
        self.link.apply_settings(settings)


# Requests answered at the cursor of a document, as it was when they were sent.
_AT_A_POSITION = (types.TEXT_DOCUMENT_INLINE_COMPLETION, types.TEXT_DOCUMENT_COMPLETION)


class CodelmProtocol(LanguageServerProtocol):
    """pygls' protocol minus its own copy of the documents (see DocumentStore, docs/lsp.md D1).

    Its incremental update walks every line in Python (about 20 ms a keystroke on a
    100k-line file) and splits lines where LSP does not; our handlers keep the documents.
    """

    _initialize_seen = False

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams) -> Any:
        yield from self._user_handler(types.TEXT_DOCUMENT_DID_OPEN, params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams) -> Any:
        yield from self._user_handler(types.TEXT_DOCUMENT_DID_CHANGE, params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams) -> Any:
        yield from self._user_handler(types.TEXT_DOCUMENT_DID_CLOSE, params)

    @lsp_method(types.NOTEBOOK_DOCUMENT_DID_OPEN)
    def lsp_notebook_document__did_open(self, params: types.DidOpenNotebookDocumentParams) -> Any:
        yield from self._user_handler(types.NOTEBOOK_DOCUMENT_DID_OPEN, params)

    @lsp_method(types.NOTEBOOK_DOCUMENT_DID_CHANGE)
    def lsp_notebook_document__did_change(
        self, params: types.DidChangeNotebookDocumentParams
    ) -> Any:
        yield from self._user_handler(types.NOTEBOOK_DOCUMENT_DID_CHANGE, params)

    @lsp_method(types.NOTEBOOK_DOCUMENT_DID_CLOSE)
    def lsp_notebook_document__did_close(self, params: types.DidCloseNotebookDocumentParams) -> Any:
        yield from self._user_handler(types.NOTEBOOK_DOCUMENT_DID_CLOSE, params)

    def _user_handler(self, method: str, params: Any) -> Any:
        if (handler := self.fm.features.get(method)) is not None:
            yield handler, (params,), None

    def handle_message(self, message: Any) -> None:
        """Before `initialize` and after `shutdown`, a request gets the error the spec asks
        for (pygls served the first, which could start a daemon before the client's settings
        arrived, and dropped the second, leaving the client waiting); a notification before
        `initialize` is dropped. A second `initialize` is refused: the spec allows one, and
        pygls reset the settings to the new one's."""
        method = getattr(message, "method", None)
        if method == types.INITIALIZE:
            if self._initialize_seen:
                self._refuse(message, types.ErrorCodes.InvalidRequest, "sent once already")
                return
            self._initialize_seen = True
        elif not self._initialize_seen and method not in (None, types.EXIT):
            if hasattr(message, "id"):
                self._refuse(
                    message, types.ErrorCodes.ServerNotInitialized, "send initialize first"
                )
            return
        elif self._shutdown and method not in (None, types.EXIT) and hasattr(message, "id"):
            self._refuse(message, types.ErrorCodes.InvalidRequest, "the server is shutting down")
            return
        if method in _AT_A_POSITION and hasattr(message, "id"):
            # Now, before the changes read after it apply (its handler starts later).
            uri = message.params.text_document.uri
            self._server.session.completer.note_request(uri)
        super().handle_message(message)

    def _handle_notification(self, method_name: str, params: Any) -> None:
        """pygls keeps the future of a notification's generator or async handler (didOpen,
        didChange and didClose here) in `_request_futures` for good: about 2 KB a keystroke.
        Each such future now leaves it when done."""
        before = set(self._request_futures)
        super()._handle_notification(method_name, params)
        for msg_id in self._request_futures.keys() - before:
            self._request_futures[msg_id].add_done_callback(
                lambda _, msg_id=msg_id: self._request_futures.pop(msg_id, None)
            )

    def _refuse(self, message: Any, code: int, why: str) -> None:
        error = types.ResponseError(code=code, message=f"{message.method}: {why}")
        self._send_response(message.id, error=error)


_EDITOR_GONE = threading.Event()  # stdout to the editor is closed: nothing can reach it


class EditorWriter(StdoutWriter):
    """stdout to the editor. Once the editor has closed its end nothing more can be said, and
    with stdin still open the server would live on, writing into nothing: it ends."""

    def write(self, data: bytes) -> None:
        try:
            super().write(data)
        except (BrokenPipeError, ConnectionResetError):
            # Said to the log file only: forwarded to the editor, it would be written here
            # again, fail again, and be logged again.
            _EDITOR_GONE.set()
            logger.error("the editor closed its end of stdout: exiting")
            logging.shutdown()
            os._exit(1)


class CodelmServer(LanguageServer):
    """pygls' server plus our Session (what the handlers share)."""

    def __init__(self, settings: LspSettings, link: DaemonLink | None) -> None:
        super().__init__(
            SERVER_NAME,
            __version__,
            text_document_sync_kind=types.TextDocumentSyncKind.Incremental,
            # Every cell of every notebook: a completion in a code cell sees the others.
            notebook_document_sync=types.NotebookDocumentSyncOptions(
                notebook_selector=[types.NotebookDocumentFilterWithNotebook(notebook="*")]
            ),
            protocol_cls=CodelmProtocol,
        )
        self.session = Session(self, settings, link)
        self.shutdown_requested = False

    def start_io(self, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
        """pygls' stdio server, reading with framing.serve: a bad frame costs that message,
        not the session."""
        self._stop_event = threading.Event()
        self.protocol.set_writer(EditorWriter(stdout or sys.stdout.buffer))
        reader = StdinAsyncReader(stdin or sys.stdin.buffer, self.thread_pool)
        try:
            asyncio.run(serve(self._stop_event, reader, self.protocol))
        except BrokenPipeError:
            logger.error("the editor closed the connection")
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            self.shutdown()


class LogMessageHandler(logging.Handler):
    """Forwards warnings to the editor as `window/logMessage` (the CLI installs it)."""

    def __init__(self, server: LanguageServer) -> None:
        super().__init__(logging.WARNING)
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        if _EDITOR_GONE.is_set():
            return
        kind = (
            types.MessageType.Error
            if record.levelno >= logging.ERROR
            else types.MessageType.Warning
        )
        try:
            self.server.window_log_message(
                types.LogMessageParams(type=kind, message=self.format(record))
            )
        except Exception:  # the client may be gone; logging must never raise
            self.handleError(record)


def build_server(
    settings: LspSettings | None = None, link: DaemonLink | None = None
) -> CodelmServer:
    """A configured server; `link` replaces the HTTP daemon link (tests)."""
    server = CodelmServer(settings or LspSettings(), link)
    session = server.session
    _register_lifecycle(server, session)
    _register_sync(server, session)
    _register_completion(server, session)
    _register_commands(server, session)
    return server


def _register_lifecycle(server: CodelmServer, session: Session) -> None:
    @server.feature(types.INITIALIZE)
    def initialize(ls: LanguageServer, params: types.InitializeParams) -> None:
        """Read initializationOptions; register the optional completion fallback."""
        _apply_options(ls, session, params.initialization_options)
        session.documents.encoding = ls.workspace.position_encoding
        _set_roots(ls, session)
        if session.settings.completion_fallback:
            _register_fallback(ls, session)
        if session.settings.warmup and session.settings.warmup_from_highlights:
            _register_highlight_focus(ls, session)

    @server.feature(types.INITIALIZED)
    def initialized(ls: LanguageServer, params: types.InitializedParams) -> None:
        """Find or start the daemon now, so the model loads while the user opens files."""
        session.link.start_in_background()

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(
        ls: LanguageServer, params: types.DidChangeConfigurationParams
    ) -> None:
        """Apply changed settings (the completion fallback takes effect on restart)."""
        _apply_options(ls, session, params.settings, base=session.settings)

    @server.feature(types.WORKSPACE_DID_CHANGE_WORKSPACE_FOLDERS)
    def did_change_folders(ls: LanguageServer, params: types.DidChangeWorkspaceFoldersParams):
        """Name files by their paths in the folders now open (pygls has updated its list)."""
        _set_roots(ls, session)

    @server.feature(types.SHUTDOWN)
    async def shutdown(ls: LanguageServer, params: Any) -> None:
        """Close the daemon connection; the daemon keeps running for other editors."""
        server.shutdown_requested = True
        await session.link.close()


def _set_roots(ls: LanguageServer, session: Session) -> None:
    """The workspace folders (or, from a client without them, the root) the prompts name files
    within (documents.prompt_path)."""
    uris = [folder.uri for folder in ls.workspace.folders.values()] or [ls.workspace.root_uri]
    session.documents.roots = tuple(p for uri in uris if uri and (p := uri_to_path(uri)))
    logger.info("workspace folders: %s", ", ".join(session.documents.roots) or "none")


def _apply_options(
    ls: LanguageServer, session: Session, options: Any, base: LspSettings | None = None
) -> None:
    settings, problems = settings_from_options(options, base)
    session.update(settings)
    logger.info("settings: %s", describe(settings))
    if problems:
        message = "codelm: invalid settings: " + "; ".join(problems)
        logger.warning("%s", message)
        ls.window_show_message(
            types.ShowMessageParams(type=types.MessageType.Warning, message=message)
        )


def _register_sync(server: LanguageServer, session: Session) -> None:
    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: LanguageServer, params: types.DidOpenTextDocumentParams) -> None:
        """Track the document."""
        session.documents.open(params.text_document)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: LanguageServer, params: types.DidChangeTextDocumentParams) -> None:
        """Apply incremental changes; remember when (the typing rhythm)."""
        session.documents.change(params, session.completer.clock())

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    async def did_close(ls: LanguageServer, params: types.DidCloseTextDocumentParams) -> None:
        """Forget the document here and in the daemon's cache."""
        uri = params.text_document.uri
        session.documents.close(uri)
        session.completer.cancel(uri)
        await session.link.close_document(uri)

    @server.feature(FOCUS_NOTIFICATION)
    def did_focus(ls: LanguageServer, params: Any) -> None:
        """The editor shows a document with the cursor resting at `position` (our editor
        extensions send it): warm the daemon's cache for a completion there."""
        try:
            uri, line, character = (
                params.textDocument.uri,
                params.position.line,
                params.position.character,
            )
        except AttributeError:
            uri, line, character = None, None, None
        if not isinstance(uri, str) or not all(
            type(n) is int and n >= 0 for n in (line, character)
        ):
            logger.warning("%s with malformed params, ignored: %r", FOCUS_NOTIFICATION, params)
            return
        session.completer.warm(uri, types.Position(line=line, character=character))

    @server.feature(types.NOTEBOOK_DOCUMENT_DID_OPEN)
    def did_open_notebook(ls: LanguageServer, params: types.DidOpenNotebookDocumentParams) -> None:
        """Track the notebook and its cells' documents."""
        session.documents.open_notebook(params)

    @server.feature(types.NOTEBOOK_DOCUMENT_DID_CHANGE)
    def did_change_notebook(
        ls: LanguageServer, params: types.DidChangeNotebookDocumentParams
    ) -> None:
        """Apply cell additions, moves, removals and edits."""
        for cell in session.documents.change_notebook(params, session.completer.clock()):
            session.completer.cancel(cell)

    @server.feature(types.NOTEBOOK_DOCUMENT_DID_CLOSE)
    async def did_close_notebook(
        ls: LanguageServer, params: types.DidCloseNotebookDocumentParams
    ) -> None:
        """Forget the notebook here and in the daemon's cache (it is one document there)."""
        uri = params.notebook_document.uri
        for cell in session.documents.close_notebook(uri):
            session.completer.cancel(cell)
        await session.link.close_document(uri)


def _register_completion(server: LanguageServer, session: Session) -> None:
    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(
        ls: LanguageServer, params: types.InlineCompletionParams
    ) -> types.InlineCompletionList:
        """Ghost-text suggestions at the cursor; an empty list rather than an error."""
        invoked = params.context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
        items = await session.completer.inline_completion(
            params.text_document.uri, params.position, invoked
        )
        return types.InlineCompletionList(items=[_inline_item(item) for item in items])


def _inline_item(item: ResultItem) -> types.InlineCompletionItem:
    accept = types.Command(
        title="codelm: accepted",
        command=ACCEPT_COMMAND,
        arguments=[{"requestId": item.request_id, "acceptedChars": len(item.text)}],
    )
    return types.InlineCompletionItem(insert_text=item.text, range=item.range, command=accept)


def _register_fallback(server: LanguageServer, session: Session) -> None:
    @server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions())
    async def completion(
        ls: LanguageServer, params: types.CompletionParams
    ) -> types.CompletionList:
        """The inline suggestion as a completion item, for clients without inline completion."""
        invoked = (
            params.context is None
            or params.context.trigger_kind == types.CompletionTriggerKind.Invoked
        )
        items = await session.completer.inline_completion(
            params.text_document.uri, params.position, invoked
        )
        return types.CompletionList(is_incomplete=True, items=[_completion_item(i) for i in items])


def _register_highlight_focus(server: LanguageServer, session: Session) -> None:
    @server.feature(types.TEXT_DOCUMENT_DOCUMENT_HIGHLIGHT)
    def document_highlight(
        ls: LanguageServer, params: types.DocumentHighlightParams
    ) -> list[types.DocumentHighlight]:
        """None to show; the position is where the cursor rests, as `codelm/didFocus` says
        it for our extensions: editors without that (LSP4IJ, Zed, Sublime, Emacs) ask for
        highlights there when the cursor stops moving (D17)."""
        session.completer.warm(params.text_document.uri, params.position)
        return []


def _completion_item(item: ResultItem) -> types.CompletionItem:
    label = item.text.strip().splitlines()[0] if item.text.strip() else item.text
    return types.CompletionItem(
        label=label[:60],
        kind=types.CompletionItemKind.Text,
        detail="codelm",
        insert_text_format=types.InsertTextFormat.PlainText,
        text_edit=types.TextEdit(range=item.range, new_text=item.text),
        filter_text=item.text,
        command=_inline_item(item).command,
    )


def _register_commands(server: LanguageServer, session: Session) -> None:
    @server.command(ACCEPT_COMMAND)
    def accept(ls: LanguageServer, *args: Any) -> None:
        """Telemetry: a suggestion was accepted (counts and characters, kept locally)."""
        info = args[0] if args and isinstance(args[0], dict) else {}
        chars = info.get("acceptedChars", 0)
        session.completer.stats.accepted += 1
        if type(chars) is int and 0 <= chars <= MAX_ACCEPTED_CHARS:  # not bool, not absurd
            session.completer.stats.accepted_chars += chars
        logger.info("accepted %s (%s chars)", info.get("requestId", "?"), chars)

    @server.command(DISMISS_COMMAND)
    def dismiss(ls: LanguageServer, *args: Any) -> None:
        """Telemetry: a suggestion was dismissed."""
        session.completer.stats.dismissed += 1

    @server.command(STATS_COMMAND)
    def stats(ls: LanguageServer, *args: Any) -> dict[str, Any]:
        """Counters of this session (requests, cache hits, accepted...) and the daemon state."""
        body: dict[str, Any] = session.completer.stats.to_json()
        body["cache_entries"] = len(session.completer.cache)
        body["daemon_state"] = session.link.state
        body["torch_loaded"] = "torch" in sys.modules  # must stay False (import boundary)
        return body
