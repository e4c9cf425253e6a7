"""codelm-lsp end to end against the REAL daemon and the default model.

The LSP auto-starts `codelm-daemon` in an isolated CODELM_HOME (the default model is linked in
from the user data dir; skipped when it has not been fetched). Readiness is polled through
`codelm/status`, never waited for blindly. The tiny default model is slow on CPU and weak at
code, so these tests check behaviour (sync, supersede, cache, restart), not suggestion quality.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from lsp_editor import Editor, start_editor
from lsprotocol import types

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DATA = Path(__file__).parent / "data"
LINE = '    word = GREETINGS.get(lang, "hello")'  # removed, leaving an empty line
# The small model keeps the suite fast; the LSP passes it to the daemon it starts.
TEST_MODEL = "smollm2-135m"
OPTIONS = {"maxTokens": 8, "timeoutMs": 120_000, "debounceMs": 0, "model": TEST_MODEL}
READY_TIMEOUT_S = 300.0


def _default_model() -> Path | None:
    try:
        from codelm.daemon.catalog import CATALOG
        from codelm.daemon.runtime import RuntimePaths
    except ImportError:
        return None
    path = RuntimePaths.for_home(None).data_dir / "models" / CATALOG[TEST_MODEL].filename
    return path if path.exists() else None


def _daemon(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CODELM_HOME": str(home)}
    command = [sys.executable, "-m", "codelm.daemon.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def _daemon_pid(home: Path) -> int:
    return int((home / "run" / "daemon.pid").read_text().strip())


@pytest.fixture
def home(tmp_path: Path) -> Path:
    model = _default_model()
    if model is None:
        pytest.skip("the default model is not fetched: codelm-daemon models fetch default")
    models = tmp_path / "data" / "models"
    models.mkdir(parents=True)
    (models / model.name).symlink_to(model)
    yield tmp_path
    _daemon(tmp_path, "stop")


@pytest_asyncio.fixture
async def real_editor(home: Path) -> AsyncIterator[Editor]:
    client, editor = await start_editor(home, OPTIONS)
    await editor.wait_status("ready", READY_TIMEOUT_S)
    yield editor
    await client.shutdown_session()
    await client.stop()


async def test_real_daemon_typing_supersede_cache_and_close(real_editor: Editor, home: Path):
    editor = real_editor
    reports = [r for rs in editor.client.progress_reports.values() for r in rs]
    assert reports and reports[0].kind == "begin" and reports[-1].kind == "end"
    truth = (DATA / "greetings.py").read_text(encoding="utf-8")
    start = truth.index(LINE)
    uri = (DATA / "greetings.py").as_uri()
    editor.open(uri, truth[:start] + truth[start + len(LINE) :])
    # Type the line at ~30 ms a key, asking at each key like an editor: older requests are
    # superseded (empty lists) while the daemon works on the newest.
    pending = []
    for offset in range(start, start + len(LINE)):
        editor.insert(uri, offset, truth[offset])
        pending.append(asyncio.create_task(editor.inline(uri, offset + 1)))
        await asyncio.sleep(0.03)
    results = await asyncio.gather(*pending)
    cursor = start + len(LINE)
    stats = await editor.command("codelm.stats")
    # Most requests are superseded (empty lists); one that finished before the next key, or
    # that the typing-through cache answered at once, may carry items.
    assert stats["superseded"] >= len(pending) // 2
    answered_early = sum(bool(r.items) for r in results[:-1])
    assert answered_early <= len(pending) - 1 - stats["superseded"]
    invoked = await editor.inline(uri, cursor, invoked=True)
    for item in invoked.items:
        assert item.range.start == item.range.end  # an insertion at the cursor
    if invoked.items and len(invoked.items[0].insert_text) > 1:
        suggestion = invoked.items[0].insert_text
        calls = (await editor.command("codelm.stats"))["daemon_calls"]
        editor.insert(uri, cursor, suggestion[0])
        typed_through = await editor.inline(uri, cursor + 1)
        assert [i.insert_text for i in typed_through.items] == [suggestion[1:]]
        assert (await editor.command("codelm.stats"))["daemon_calls"] == calls
    stats = await editor.command("codelm.stats")
    assert (stats["errors"], stats["timeouts"], stats["torch_loaded"]) == (0, 0, False)
    editor.client.text_document_did_close(
        types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri=uri))
    )
    assert _daemon(home, "status").returncode == 0


async def test_real_daemon_warm_up_leaves_the_first_key_one_token_to_run(
    real_editor: Editor, home: Path
):
    editor = real_editor
    truth = (DATA / "greetings.py").read_text(encoding="utf-8")
    cursor = truth.index(LINE) + len(LINE)
    uri = (DATA / "greetings.py").as_uri()
    editor.open(uri, truth)
    position = types.Position(line=truth.count("\n", 0, cursor), character=len(LINE))
    focus = {"textDocument": {"uri": uri}, "position": position}
    editor.client.protocol.notify("codelm/didFocus", focus)
    log = home / "log" / "lsp.log"
    for _ in range(600):
        if "warm-up uri#" in log.read_text():
            break
        await asyncio.sleep(0.1)
    warmed = re.search(r"warm-up uri#\w+: cached 0 prefilled (\d+) tokens", log.read_text())
    assert warmed and int(warmed[1]) > 100, log.read_text()[-2000:]
    await editor.inline(uri, cursor)  # as the first key typed there asks (automatic)
    if (await editor.command("codelm.stats"))["cache_hits"]:
        return  # the warm-up's own suggestion, kept: no daemon call at all
    asked = re.findall(r"automatic: \d+ items, cached (\d+) prefilled (\d+)", log.read_text())
    assert asked and int(asked[-1][1]) <= 1 and int(asked[-1][0]) >= int(warmed[1]), asked


async def test_real_daemon_killed_is_restarted_once(real_editor: Editor, home: Path):
    editor = real_editor
    uri = (DATA / "greetings.py").as_uri()
    editor.open(uri, (DATA / "greetings.py").read_text(encoding="utf-8"))
    first_pid = _daemon_pid(home)
    os.kill(first_pid, signal.SIGKILL)
    editor.statuses.clear()
    assert not (await editor.inline(uri, 0, invoked=True)).items
    await editor.wait_status("ready", READY_TIMEOUT_S)
    warnings = [m.message for m in editor.client.messages if "restarting" in m.message]
    assert len(warnings) == 1
    assert _daemon_pid(home) != first_pid
    result = await editor.inline(uri, len('"""Greetings'), invoked=True)
    assert isinstance(result, types.InlineCompletionList)


async def test_real_daemon_restarted_while_the_editor_asks_is_waited_for(
    real_editor: Editor, home: Path
):
    # Asked between `restart`'s stop and start, the editor called the stop unexpected and
    # started a daemon itself; `restart` then failed, as one was running.
    editor = real_editor
    uri = (DATA / "greetings.py").as_uri()
    editor.open(uri, (DATA / "greetings.py").read_text(encoding="utf-8"))
    first_pid = _daemon_pid(home)
    env = {**os.environ, "CODELM_HOME": str(home)}
    restart = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "codelm.daemon.cli", "restart", "--wait", "0", env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    editor.statuses.clear()
    asked = 0
    while restart.returncode is None:  # asking all along, each time somewhere new
        asked += 1
        await editor.inline(uri, 1 + asked % 40, invoked=True)
        await asyncio.sleep(0.02)
    out, err = await restart.communicate()
    assert restart.returncode == 0, err.decode()
    assert f"stopped (pid {first_pid})" in out.decode()
    await editor.inline(uri, 50, invoked=True)
    await editor.wait_status("ready", READY_TIMEOUT_S)
    assert any(
        s["message"].endswith("is restarting (`codelm-daemon restart`)") for s in editor.statuses
    )
    second_pid = _daemon_pid(home)
    assert second_pid != first_pid
    # Restarted while the editor asked nothing: its next request finds the new daemon.
    assert _daemon(home, "restart", "--wait", "0").returncode == 0
    editor.statuses.clear()
    await editor.inline(uri, 60, invoked=True)
    await editor.wait_status("ready", READY_TIMEOUT_S)
    assert _daemon_pid(home) != second_pid
    assert editor.client.messages == []  # neither "stopped unexpectedly" nor "stopped with"
    result = await editor.inline(uri, len('"""Greetings'), invoked=True)
    assert isinstance(result, types.InlineCompletionList)


async def test_real_daemon_stopped_by_the_user_stays_stopped_until_started(
    real_editor: Editor, home: Path
):
    # `codelm-daemon stop` with an editor open: the editor says so and starts nothing (it had
    # restarted the daemon on the next keystroke, calling the stop "unexpected").
    editor = real_editor
    uri = (DATA / "greetings.py").as_uri()
    editor.open(uri, (DATA / "greetings.py").read_text(encoding="utf-8"))
    assert _daemon(home, "stop").returncode == 0
    editor.statuses.clear()
    for _ in range(2):
        assert not (await editor.inline(uri, 0, invoked=True)).items
    status = await editor.wait_status("disabled")
    assert "codelm-daemon start" in status["message"]
    assert _daemon(home, "status").returncode == 3  # still stopped
    assert not any("restarting" in m.message for m in editor.client.messages)
    started = _daemon(home, "start", "--model", TEST_MODEL, "--wait", "0")
    assert started.returncode == 0, started.stderr
    editor.statuses.clear()
    await editor.inline(uri, 0, invoked=True)  # the editor notices the start at once
    await editor.wait_status("ready", READY_TIMEOUT_S)
    result = await editor.inline(uri, len('"""Greetings'), invoked=True)
    assert isinstance(result, types.InlineCompletionList)
