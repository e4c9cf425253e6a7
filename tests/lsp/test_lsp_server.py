"""codelm-lsp as a subprocess, driven over stdio by pytest-lsp, against the fake daemon."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from lsp_editor import Editor, inline_params, start_editor
from lsp_fake_daemon import FakeDaemon
from lsprotocol import types

from codelm.daemon.protocol import text_window
from codelm.lsp.positions import offset_at, position_at

pytestmark = pytest.mark.e2e
URI = "file:///work/demo.py"


async def test_initialize_advertises_inline_completion_and_incremental_sync(editor: Editor):
    caps = editor.result.capabilities
    assert caps.inline_completion_provider is not None
    sync = caps.text_document_sync
    assert isinstance(sync, types.TextDocumentSyncOptions)
    assert sync.change == types.TextDocumentSyncKind.Incremental
    assert caps.completion_provider is None  # the fallback is off by default
    assert editor.result.server_info.name == "codelm-lsp"


async def test_inline_completion_returns_postprocessed_item_with_range(
    editor: Editor, fake_daemon: FakeDaemon
):
    fake_daemon.truth = 'print("hello")\n'
    fake_daemon.repeat_closers = True
    editor.open(URI, 'print("hello\n')
    result = await editor.inline(URI, 12)
    assert [i.insert_text for i in result.items] == ['")']
    assert result.items[0].range == types.Range(
        start=types.Position(line=0, character=12), end=types.Position(line=0, character=12)
    )


async def test_a_notebook_cell_is_completed_with_the_cells_before_it(
    editor: Editor, fake_daemon: FakeDaemon
):
    # VS Code syncs a notebook's cells with notebookDocument/* once the server asks for it;
    # each cell alone would be a few lines the model knows nothing around.
    sync = editor.result.capabilities.notebook_document_sync
    assert isinstance(sync, types.NotebookDocumentSyncOptions)
    notebook = "file:///work/analysis.ipynb"
    cells = editor.open_notebook(
        notebook,
        [
            ("python", "import os\n"),
            ("markdown", "List the files"),
            ("python", "files = os.list"),
        ],
    )
    fake_daemon.truth = "import os\n\n\n# List the files\n\nfiles = os.listdir('.')\n"
    result = await editor.inline(cells[2], len("files = os.list"))
    assert [i.insert_text for i in result.items] == ["dir('.')"]
    assert result.items[0].range.start == types.Position(line=0, character=15)
    assert fake_daemon.requests[-1].uri == notebook
    editor.client.notebook_document_did_close(
        types.DidCloseNotebookDocumentParams(
            notebook_document=types.NotebookDocumentIdentifier(uri=notebook),
            cell_text_documents=[types.TextDocumentIdentifier(uri=cell) for cell in cells],
        )
    )
    assert await _eventually(lambda: fake_daemon.closed_uris == [notebook])


async def test_files_are_named_by_their_paths_in_the_workspace_folders(
    editor: Editor, fake_daemon: FakeDaemon, tmp_path: Path
):
    # The editor opened the folder tmp_path (its rootUri): prompts name the files as a
    # repository does, not by where the user keeps it.
    util, main = (tmp_path / "src" / name for name in ("util.py", "main.py"))
    editor.open(util.as_uri(), "def half(x):\n    return x / 2\n")
    editor.open(main.as_uri(), "y = ")
    fake_daemon.truth = "y = half(4)"
    await editor.inline(main.as_uri(), 4)
    request = fake_daemon.requests[-1]
    assert request.path == "src/main.py"
    assert [s.path for s in request.context] == ["src/util.py"]
    added = types.WorkspaceFolder(uri=(tmp_path / "src").as_uri(), name="src")
    editor.client.workspace_did_change_workspace_folders(
        types.DidChangeWorkspaceFoldersParams(
            event=types.WorkspaceFoldersChangeEvent(added=[added], removed=[])
        )
    )
    editor.insert(main.as_uri(), 4, "2 * ")  # (not what was suggested: a new request)
    await editor.inline(main.as_uri(), 8)
    request = fake_daemon.requests[-1]
    assert request.path == "main.py"  # the innermost folder that holds it
    assert [s.path for s in request.context] == ["util.py"]


async def test_where_the_editor_shows_the_cursor_the_daemon_warms_the_prompt(
    editor: Editor, fake_daemon: FakeDaemon
):
    editor.open(URI, "import os\n\nfiles = \n")
    fake_daemon.truth = "import os\n\nfiles = os.listdir()\n"
    for params in ({"textDocument": {"uri": URI}}, {"position": {"line": -1}}, [1], None):
        editor.client.protocol.notify("codelm/didFocus", params)  # malformed: ignored
    focus = {"textDocument": {"uri": URI}, "position": {"line": 2, "character": 8}}
    editor.client.protocol.notify("codelm/didFocus", focus)
    assert await _eventually(lambda: fake_daemon.completed)
    [request] = fake_daemon.requests
    assert (request.max_tokens, request.line, request.character) == (0, 2, 8)
    for _ in range(500):  # the server has read the answer
        if (await editor.command("codelm.stats"))["warmups"] == 1:
            break
        await asyncio.sleep(0.01)
    # The suggestion the warm-up decoded there is kept: asked for there, it comes at once.
    result = await editor.inline(URI, len("import os\n\nfiles = "))
    assert [i.insert_text for i in result.items] == ["os.listdir()"]
    assert len(fake_daemon.requests) == 1


async def test_an_editor_without_focus_notifications_warms_where_it_asks_for_highlights(
    editor: Editor, fake_daemon: FakeDaemon
):
    # LSP4IJ (JetBrains) sends no codelm/didFocus, but asks for the highlights at the caret
    # whenever it comes to rest: the first key in a file had paid for its whole prompt.
    assert editor.result.capabilities.document_highlight_provider
    editor.open(URI, "import os\n\nfiles = \n")
    highlights = await editor.client.text_document_document_highlight_async(
        types.DocumentHighlightParams(
            text_document=types.TextDocumentIdentifier(uri=URI),
            position=types.Position(line=2, character=8),
        )
    )
    assert not highlights
    assert await _eventually(lambda: fake_daemon.requests)
    [request] = fake_daemon.requests
    assert (request.max_tokens, request.line, request.character) == (0, 2, 8)


@pytest.mark.parametrize("options", [{"warmupFromHighlights": False}, {"warmup": False}])
async def test_no_highlights_asked_of_a_server_that_would_not_warm_with_them(
    tmp_path: Path, fake_daemon: FakeDaemon, options
):
    # VS Code's extension turns it off: it sends codelm/didFocus, and a highlight provider
    # that finds nothing would replace VS Code's own highlighting of the word at the cursor.
    client, editor = await start_editor(tmp_path, {"daemon": {"url": fake_daemon.url}, **options})
    assert editor.result.capabilities.document_highlight_provider is None
    assert await _stop(client) == 0


async def test_initialize_answers_quickly(editor: Editor):
    # Not a timing assertion (see benchmarks/lsp_replay.py): a generous bound that catches
    # an accidental torch import (several seconds).
    assert editor.initialize_ms < 5000
    stats = await editor.command("codelm.stats")
    assert stats["torch_loaded"] is False


DATA = Path(__file__).parent / "data"
REGION_START = "    word = GREETINGS"
REGION_END = "return message.strip()"


@pytest.mark.parametrize("eol", ["\n", "\r\n"], ids=["lf", "crlf"])
async def test_typing_a_region_keystroke_by_keystroke(
    editor: Editor, fake_daemon: FakeDaemon, eol: str
):
    truth = (DATA / "greetings.py").read_text(encoding="utf-8").replace("\n", eol)
    start = truth.index(REGION_START)
    end = truth.index(REGION_END) + len(REGION_END)
    fake_daemon.truth = truth
    uri = (DATA / "greetings.py").as_uri()
    editor.open(uri, truth[:start] + truth[end:])
    answered = 0
    for offset in range(start, end):
        editor.insert(uri, offset, truth[offset])
        n_requests = len(fake_daemon.requests)
        result = await editor.inline(uri, offset + 1)
        if len(fake_daemon.requests) > n_requests:  # the daemon saw the editor's exact text
            assert fake_daemon.requests[-1].text == editor.texts[uri]
        for item in result.items:
            assert truth[offset + 1 :].startswith(item.insert_text), (offset, item.insert_text)
        answered += bool(result.items)
    assert editor.texts[uri] == truth
    keystrokes = end - start
    stats = await editor.command("codelm.stats")
    assert answered >= 0.9 * keystrokes
    assert stats["cache_hits"] >= 0.8 * keystrokes
    assert stats["daemon_calls"] <= 6
    editor.client.text_document_did_close(
        types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri=uri))
    )
    await editor.command("codelm.stats")  # a round trip: didClose has been handled
    assert await _eventually(lambda: fake_daemon.closed_uris == [uri])


async def _eventually(check, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_cancel_request_aborts_the_daemon_call(editor: Editor, fake_daemon: FakeDaemon):
    fake_daemon.delay_s = 30
    editor.open(URI, "x = \n")
    params = inline_params(URI, types.Position(line=0, character=4))
    pending = asyncio.ensure_future(
        editor.client.protocol.send_request_async(
            types.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id="slow-1"
        )
    )
    assert await _eventually(lambda: len(fake_daemon.requests) == 1)
    editor.client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="slow-1"))
    with pytest.raises(Exception, match="cancel"):
        await pending
    assert await _eventually(lambda: fake_daemon.cancelled == 1)


async def test_newer_request_supersedes_older_one(editor: Editor, fake_daemon: FakeDaemon):
    fake_daemon.truth = "x = compute(1)\n"
    fake_daemon.delay_s = 0.5
    editor.open(URI, "x = \n")
    first = asyncio.create_task(editor.inline(URI, 4, invoked=True))
    assert await _eventually(lambda: len(fake_daemon.requests) == 1)
    fake_daemon.delay_s = 0
    second = await editor.inline(URI, 4, invoked=True)
    assert not (await first).items
    assert [i.insert_text for i in second.items] == ["compute(1)"]
    assert await _eventually(lambda: fake_daemon.cancelled == 1)


async def test_slow_daemon_answers_empty_list_and_reports_busy(
    editor: Editor, fake_daemon: FakeDaemon
):
    editor.client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"codelm": {"timeoutMs": 100}})
    )
    fake_daemon.delay_s = 5
    editor.open(URI, "x = \n")
    started = time.monotonic()
    result = await editor.inline(URI, 4, invoked=True)
    assert not result.items and time.monotonic() - started < 4
    await editor.wait_status("busy")


async def test_disabled_by_configuration_answers_nothing(editor: Editor, fake_daemon: FakeDaemon):
    editor.client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"codelm": {"enabled": False}})
    )
    editor.open(URI, "x = \n")
    assert not (await editor.inline(URI, 4, invoked=True)).items
    await editor.wait_status("disabled")
    assert fake_daemon.requests == []


async def test_accept_and_dismiss_commands_count_telemetry(editor: Editor, fake_daemon: FakeDaemon):
    fake_daemon.truth = "x = compute(1)\n"
    editor.open(URI, "x = \n")
    item = (await editor.inline(URI, 4, invoked=True)).items[0]
    assert item.command is not None and item.command.command == "codelm.accept"
    await editor.command(item.command.command, *(item.command.arguments or []))
    await editor.command("codelm.dismiss", {"requestId": "x"})
    stats = await editor.command("codelm.stats")
    assert (stats["accepted"], stats["accepted_chars"], stats["dismissed"]) == (1, 10, 1)


async def _stop(client) -> int | None:
    await client.shutdown_session()
    server = client._server  # the subprocess (pygls keeps it private)
    await client.stop()
    return server.returncode if server is not None else None


async def test_progress_and_status_while_the_model_loads(tmp_path: Path, fake_daemon: FakeDaemon):
    fake_daemon.health_states = ["loading", "loading", "ready"]
    client, editor = await start_editor(tmp_path, {"daemon": {"url": fake_daemon.url}})
    await editor.wait_status("ready")
    states = [s["state"] for s in editor.statuses]
    assert states[: states.index("ready") + 1] == ["loading", "ready"]
    reports = [r for values in client.progress_reports.values() for r in values]
    kinds = [r.kind for r in reports]
    assert kinds[0] == "begin" and kinds[-1] == "end" and "report" in kinds
    assert any("Loading fake" in (r.message or "") for r in reports)
    assert await _stop(client) == 0


async def test_daemon_down_answers_empty_list_and_tells_the_user(tmp_path: Path):
    options = {"daemon": {"url": "http://127.0.0.1:9"}, "debounceMs": 0}
    client, editor = await start_editor(tmp_path, options)
    status = await editor.wait_status("error")
    assert "not" in status["message"] or "cannot" in status["message"]
    editor.open(URI, "x = \n")
    assert not (await editor.inline(URI, 4, invoked=True)).items
    assert not (await editor.inline(URI, 4, invoked=False)).items
    errors = [m for m in client.messages if m.type == types.MessageType.Error]
    assert len(errors) == 1  # one message, not one per keystroke
    assert await _stop(client) == 0


async def test_invalid_settings_fall_back_with_one_warning(tmp_path: Path, fake_daemon: FakeDaemon):
    options = {"daemon": {"url": fake_daemon.url}, "maxTokens": "lots", "singleLine": 3}
    client, editor = await start_editor(tmp_path, options)
    warnings = [m for m in client.messages if m.type == types.MessageType.Warning]
    assert len(warnings) == 1
    assert "maxTokens" in warnings[0].message and "singleLine" in warnings[0].message
    await editor.wait_status("ready")
    assert await _stop(client) == 0


async def test_unknown_settings_are_one_warning_and_the_known_ones_apply(
    tmp_path: Path, fake_daemon: FakeDaemon
):
    # `max_tokens` was ignored in silence (the daemon's config.toml warns of unknown keys).
    options = {"daemon": {"url": fake_daemon.url}, "max_tokens": 8, "maxTokens": 16}
    client, editor = await start_editor(tmp_path, {**options, "debounceMs": 0})
    warnings = [m for m in client.messages if m.type == types.MessageType.Warning]
    assert len(warnings) == 1 and "max_tokens (did you mean maxTokens?)" in warnings[0].message
    await editor.wait_status("ready")
    editor.open(URI, "total = \n")
    await editor.inline(URI, 8, invoked=True)
    assert fake_daemon.requests[-1].max_tokens == 16
    assert await _stop(client) == 0


async def test_completion_fallback_when_enabled(tmp_path: Path, fake_daemon: FakeDaemon):
    fake_daemon.truth = "total = compute(1)\n"
    options = {"daemon": {"url": fake_daemon.url}, "completionFallback": True, "debounceMs": 0}
    client, editor = await start_editor(tmp_path, options)
    assert editor.result.capabilities.completion_provider is not None
    await editor.wait_status("ready")
    editor.open(URI, "total = \n")
    result = await client.text_document_completion_async(
        types.CompletionParams(
            text_document=types.TextDocumentIdentifier(uri=URI),
            position=types.Position(line=0, character=8),
        )
    )
    assert isinstance(result, types.CompletionList)
    edit = result.items[0].text_edit
    assert isinstance(edit, types.TextEdit) and edit.new_text == "compute(1)"
    assert await _stop(client) == 0


async def test_exit_without_shutdown_returns_1(tmp_path: Path, fake_daemon: FakeDaemon):
    client, editor = await start_editor(tmp_path, {"daemon": {"url": fake_daemon.url}})
    server = client._server
    client.exit(None)
    assert await asyncio.wait_for(server.wait(), 10) == 1
    await client.stop()


async def test_huge_crlf_file_stays_in_sync(editor: Editor, fake_daemon: FakeDaemon):
    lines = [f"value_{i} = compute({i}, 'héllo 😀')  # comment\r\n" for i in range(40_000)]
    truth = "".join(lines) + "total = sum(values)\r\n"
    start = len(truth) - len("total = sum(values)\r\n")
    fake_daemon.truth = truth
    uri = "file:///work/huge.py"
    editor.open(uri, truth[:start] + "\r\n")
    for offset in range(start, start + 8):
        editor.insert(uri, offset, truth[offset])
        n_requests = len(fake_daemon.requests)
        result = await editor.inline(uri, offset + 1)
        if len(fake_daemon.requests) > n_requests:  # the text around the cursor, in sync
            text = editor.texts[uri]
            sent = text[slice(*text_window(text, offset + 1))]
            assert fake_daemon.requests[-1].text == sent and len(sent) < len(text) // 10
        for item in result.items:
            assert item.range.start.line == 40_000
            assert truth[offset + 1 :].startswith(item.insert_text)
    assert len(fake_daemon.requests) == 1  # then typed through
    assert [i.insert_text for i in result.items] == ["sum(values)"]


async def test_form_feed_and_line_separator_do_not_shift_lines(
    editor: Editor, fake_daemon: FakeDaemon
):
    # str.splitlines breaks at \x0c and U+2028; LSP does not (docs/lsp.md, D1).
    text = "a = 1\x0c\ns = 'x\u2028y'\n\x0c\nb = \n"
    fake_daemon.truth = text.replace("b = \n", "b = a + 1\n")
    editor.open(URI, text)
    cursor = text.index("b = ") + 4
    editor.insert(URI, cursor, "a")
    result = await editor.inline(URI, cursor + 1, invoked=True)
    assert fake_daemon.requests[-1].text == editor.texts[URI]
    assert [i.insert_text for i in result.items] == [" + 1"]
    assert result.items[0].range.start == types.Position(line=3, character=5)


# What a user types and a model answers that stresses sync and ranges.
_PIECES = ("x", "(", ")", '"', "'", ":", " ", "\t", "\n", "\r\n", "\r", "é", "😀", "{}", "]")


async def test_a_random_session_stays_in_sync_and_never_replaces_text_it_does_not_retype(
    editor: Editor, fake_daemon: FakeDaemon
):
    """Hundreds of random edits (wide characters, every line ending) and requests at random
    places, answered with text cut from anywhere in the document with brackets and quotes
    added: every request gets a list, the daemon always gets the editor's text, and each item's
    range starts at the cursor, stays on its line and replaces nothing the item does not
    retype."""
    rng = random.Random(3)

    def answer(request) -> str:
        text = request.text
        start = rng.randrange(len(text) + 1)
        answer = text[start : start + rng.randint(1, 60)]
        for _ in range(rng.randrange(3)):
            at = rng.randrange(len(answer) + 1)
            answer = answer[:at] + rng.choice(_PIECES) + answer[at:]
        return answer

    fake_daemon.predict = answer
    editor.open(URI, 'def greet(name):\r\n    """Say hi."""\n    print(f"hi {name} 😀", end="")\n')
    requests, items = 0, 0
    for _ in range(400):
        text = editor.texts[URI]
        # (between \r and \n is no position an editor can name)
        a, b = (
            n - (text[n - 1 : n + 1] == "\r\n")
            for n in sorted(rng.choices(range(len(text) + 1), k=2))
        )
        if rng.random() < 0.6 or len(text) > 300:
            end = b if rng.random() < 0.3 or len(text) > 300 else a
            editor.edit(URI, a, end, "".join(rng.choices(_PIECES, k=rng.randint(0, 2))))
            continue
        if rng.random() < 0.05:  # a client out of step: past the end, a document not open
            uri = rng.choice([URI, "file:///work/never_opened.py"])
            here = types.Position(line=rng.choice([0, 40, 10**6]), character=rng.choice([3, 10**6]))
            params = inline_params(uri, here)
            result = await editor.client.text_document_inline_completion_async(params)
            assert result is None or isinstance(result, types.InlineCompletionList)
            continue
        n_requests = len(fake_daemon.requests)
        result = await editor.inline(URI, a, invoked=rng.random() < 0.5)
        requests += 1
        if len(fake_daemon.requests) > n_requests:
            assert fake_daemon.requests[-1].text == text
        for item in result.items:
            items += 1
            start = offset_at(text, item.range.start.line, item.range.start.character)
            end = offset_at(text, item.range.end.line, item.range.end.character)
            replaced = text[start:end]
            assert start == a and "\n" not in replaced and "\r" not in replaced
            lost = Counter(ch for ch in replaced if not ch.isspace()) - Counter(item.insert_text)
            assert not lost, (text[:a], item, replaced)
    assert requests > 100 and items > 50, (requests, items)
    result = await editor.inline(URI, 0, invoked=True)  # the server is still there
    assert isinstance(result, types.InlineCompletionList)


async def test_random_bursts_of_requests_edits_and_cancels_each_get_an_answer(
    editor: Editor, fake_daemon: FakeDaemon
):
    """Requests on two documents sent without waiting, some cancelled, edits in between, a
    daemon that answers after random delays: every request is answered (a list, or the
    cancellation error for a cancelled one), and the server ends in step with the editor."""
    rng = random.Random(4)
    uris = [URI, "file:///work/other.py"]
    for uri in uris:
        editor.open(uri, "def f(x):\n    return x\n")
    pending: dict[str, asyncio.Future] = {}
    for n in range(200):
        uri, op = rng.choice(uris), rng.random()
        text = editor.texts[uri]
        at = rng.randint(0, len(text))
        at -= text[at - 1 : at + 1] == "\r\n"  # (no position an editor can name)
        if op < 0.4:
            end = at + (text[at : at + 2] != "\r\n" and rng.random() < 0.5 and at < len(text))
            editor.edit(uri, at, end, rng.choice(_PIECES))
        elif op < 0.8:
            fake_daemon.delay_s = rng.choice([0, 0.02, 0.1])
            params = inline_params(uri, position_at(text, at), invoked=rng.choice([True, False]))
            pending[f"burst-{n}"] = asyncio.ensure_future(
                editor.client.protocol.send_request_async(
                    types.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id=f"burst-{n}"
                )
            )
            if rng.random() < 0.2:  # the editor moved on at once
                await asyncio.sleep(0)
                editor.client.protocol.notify(
                    types.CANCEL_REQUEST, types.CancelParams(id=f"burst-{n}")
                )
        elif op < 0.9 and pending:
            msg_id = rng.choice(list(pending)[-3:])  # (one sent lately: most likely unanswered)
            editor.client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=msg_id))
        else:
            await asyncio.sleep(rng.choice([0, 0.01, 0.06]))
    fake_daemon.delay_s = 0
    done, late = await asyncio.wait(pending.values(), timeout=20)
    assert not late
    outcomes = Counter()
    for future in done:
        if future.exception() is None:
            assert isinstance(future.result(), types.InlineCompletionList)
            outcomes["answered"] += 1
        else:
            assert "cancel" in str(future.exception()).lower(), future.exception()
            outcomes["cancelled"] += 1
    assert outcomes["answered"] > 20 and outcomes["cancelled"] >= 3, outcomes
    for uri in uris:  # in step: a last request sees the editor's text
        editor.insert(uri, len(editor.texts[uri]), "\nlast = ")
        n_requests = len(fake_daemon.requests)
        await editor.inline(uri, len(editor.texts[uri]), invoked=True)
        assert len(fake_daemon.requests) == n_requests + 1
        assert fake_daemon.requests[-1].text == editor.texts[uri]


def test_the_server_ends_when_the_editor_closes_its_stdout(tmp_path):
    # It lived on while stdin stayed open, logging a BrokenPipeError for every answer.
    import json
    import os
    import subprocess

    from lsp_editor import lsp_command

    def frame(message: dict) -> bytes:
        body = json.dumps(message).encode()
        return b"Content-Length: %d\r\n\r\n" % len(body) + body

    read_end, write_end = os.pipe()
    env = {**os.environ, "CODELM_HOME": str(tmp_path)}
    server = subprocess.Popen(
        lsp_command(), stdin=subprocess.PIPE, stdout=write_end, stderr=subprocess.PIPE, env=env
    )
    os.close(write_end)
    try:
        options = {"daemon": {"url": "http://127.0.0.1:9"}}  # nothing to start
        params = {"processId": None, "capabilities": {}, "initializationOptions": options}
        server.stdin.write(
            frame({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params})
        )
        server.stdin.flush()
        assert b"capabilities" in os.read(read_end, 65536)
        os.close(read_end)
        stats = {"command": "codelm.stats", "arguments": []}
        request = {"jsonrpc": "2.0", "id": 2, "method": "workspace/executeCommand", "params": stats}
        server.stdin.write(frame(request))
        server.stdin.flush()
        # (stderr is a pipe read only after the exit: the error it logged was forwarded to the
        # closed stdout, logged again, ... until a RecursionError, which filled it and hung.)
        assert server.wait(timeout=20) == 1  # stdin still open
        assert b"Logging error" not in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
        server.stdin.close()
