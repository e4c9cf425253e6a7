"""The VS Code extension in a real VS Code: code-server (VS Code 1.100.3) driven by Chromium.

`make test-editors` installs code-server, Chromium, Playwright and builds the .vsix, then runs
this with CODELM_VSCODE_E2E=1. The extension starts the real `codelm-lsp`, which auto-starts the
daemon with the default model in an isolated CODELM_HOME. Every wait polls the page; the
timeouts are generous because one cycle takes over a minute on a loaded 2-core machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
VSCODE = ROOT / "editors" / "vscode"
CODE_SERVER = VSCODE / ".e2e" / "node_modules" / ".bin" / "code-server"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOT = ROOT / "docs" / "images" / "vscode-suggestion.png"
SOURCE = "def add(a, b):\n    return a + b\n\n\ndef multiply(a, b):\n"
TYPED = "    return"
# A notebook as Jupyter writes it: code, Markdown, and an empty code cell to type in.
NOTEBOOK_CELLS = [
    ("code", "import math\n\ndef area(radius):\n    return math.pi * radius ** 2\n"),
    ("markdown", "The area of a circle of radius 3:"),
    ("code", ""),
]
NOTEBOOK_TYPED = "circle = "
CELL_EDITOR = ".cell-editor-container .monaco-editor"
START_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 400.0
SUGGESTION_TIMEOUT_S = 240.0
SETTINGS = {
    "codelm.serverPath": str(Path(sys.executable).with_name("codelm-lsp")),
    "codelm.timeoutMs": 240_000,  # a loaded CI machine answers slowly; never drop the answer
    "codelm.maxTokens": 16,
    "editor.quickSuggestions": {"other": "off", "comments": "off", "strings": "off"},
    "editor.suggestOnTriggerCharacters": False,
    "editor.wordBasedSuggestions": "off",
    "workbench.startupEditor": "none",
    "workbench.tips.enabled": False,
    "extensions.autoCheckUpdates": False,
    "extensions.autoUpdate": False,
    "telemetry.telemetryLevel": "off",
}

if os.environ.get("CODELM_VSCODE_E2E") != "1":
    pytest.skip(
        "runs under `make test-editors` (installs code-server, Chromium, Playwright, the .vsix)",
        allow_module_level=True,
    )


def _vsix() -> Path:
    version = json.loads((VSCODE / "package.json").read_text())["version"]
    vsix = VSCODE / f"codelm-{version}.vsix"
    if not (vsix.exists() and CODE_SERVER.exists()):
        pytest.fail(f"{vsix.name} or code-server is missing: run `make test-editors`")
    return vsix


def _default_model() -> Path:
    from codelm.daemon.catalog import resolve_model_path
    from codelm.daemon.errors import ModelLoadError

    try:
        return resolve_model_path("smollm2-135m")
    except ModelLoadError as exc:
        pytest.skip(str(exc))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, "code-server exited; see its output above"
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/healthz", timeout=5) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"code-server did not answer {url}/healthz within {START_TIMEOUT_S:.0f} s")


def _stop_group(server: subprocess.Popen[bytes]) -> None:
    """Ends code-server, its extension host and codelm-lsp: they share its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture
def code_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A fresh code-server with the .vsix installed; yields (workspace URL, workspace)."""
    vsix, model = _vsix(), _default_model()
    home, user, extensions, workspace = (tmp_path / d for d in ("home", "user", "ext", "ws"))
    for folder in (home, user / "User", workspace):
        folder.mkdir(parents=True)
    (user / "User" / "settings.json").write_text(json.dumps(SETTINGS, indent=2))
    (workspace / "calc.py").write_text(SOURCE)
    (workspace / "analysis.ipynb").write_text(json.dumps(_notebook(NOTEBOOK_CELLS), indent=1))
    env = {**os.environ, "CODELM_HOME": str(home), "CODELM_MODEL": str(model)}
    dirs = ["--user-data-dir", str(user), "--extensions-dir", str(extensions)]
    config = ["--config", str(tmp_path / "code-server.yaml")]
    install = [str(CODE_SERVER), *config, *dirs, "--install-extension", str(vsix)]
    subprocess.run(install, env=env, check=True, timeout=120)
    port = _free_port()
    flags = ["--auth", "none", "--bind-addr", f"127.0.0.1:{port}", "--disable-telemetry"]
    flags += ["--disable-update-check", "--disable-workspace-trust"]
    command = [str(CODE_SERVER), *config, *dirs, *flags, str(workspace)]
    server = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", server)
        yield f"http://127.0.0.1:{port}/?folder={workspace}", workspace
    finally:
        _stop_group(server)
        daemon = [str(Path(sys.executable).with_name("codelm-daemon")), "stop"]
        subprocess.run(daemon, env=env, capture_output=True, timeout=60)


def test_vscode_shows_and_accepts_codelm_ghost_text(code_server, tmp_path: Path):
    from playwright.sync_api import expect

    url, workspace = code_server
    with _workbench(url) as page:
        _open_file(page, "calc.py")
        status = _status(page, "ready")
        expect(status).to_be_visible(timeout=READY_TIMEOUT_S * 1000)
        page.keyboard.press("Control+End")
        # Where the cursor rests, the extension tells the server, which has the daemon
        # prefill the prompt before the first key.
        log = tmp_path / "home" / "log" / "lsp.log"
        tag = hashlib.blake2b((workspace / "calc.py").as_uri().encode(), digest_size=3)
        warmed = f"warm-up uri#{tag.hexdigest()}: cached "
        _wait_for(lambda: warmed in log.read_text(), "the warm-up in lsp.log")
        page.keyboard.type(TYPED, delay=60)
        suggestion = _suggestion(page.locator(".monaco-editor"))
        page.screenshot(path=tmp_path / "vscode-suggestion.png")
        page.keyboard.press("Tab")
        page.keyboard.press("Control+S")
        # A multi-line suggestion would add lines after the first one: compare the start.
        source = workspace / "calc.py"
        _wait_for(lambda: source.read_text().startswith(SOURCE + TYPED + suggestion), "the save")
        _toggle_and_restart(page, log)
    restarted = log.read_text().split(" starting\n")[-1]  # initializationOptions again
    assert re.search(r"settings: enabled=True.*max_tokens=16", restarted)
    # The item's command (codelm.accept) reached the server through workspace/executeCommand.
    _wait_for(lambda: " accepted " in log.read_text(), "codelm.accept in lsp.log")
    if os.environ.get("CODELM_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(tmp_path / "vscode-suggestion.png", SCREENSHOT)


def test_vscode_completes_in_a_notebook_cell_with_the_cells_above(code_server, tmp_path: Path):
    from playwright.sync_api import expect

    url, workspace = code_server
    with _workbench(url) as page:
        _open_file(page, "analysis.ipynb", editor=CELL_EDITOR)
        expect(_status(page, "ready")).to_be_visible(timeout=READY_TIMEOUT_S * 1000)
        cells = page.locator(CELL_EDITOR)
        expect(cells).to_have_count(2, timeout=START_TIMEOUT_S * 1000)  # the code cells
        cells.last.locator(".view-lines").click()
        page.keyboard.type(NOTEBOOK_TYPED, delay=60)
        suggestion = _suggestion(cells.last)
        page.keyboard.press("Tab")
        page.keyboard.press("Control+S")
        notebook = workspace / "analysis.ipynb"

        def typed_cell() -> str:
            return "".join(json.loads(notebook.read_text())["cells"][2]["source"])

        _wait_for(lambda: typed_cell().startswith(NOTEBOOK_TYPED + suggestion), "the save")
    # The daemon was asked about the notebook (its URI, logged as a hash), not the cell alone.
    log = (tmp_path / "home" / "log" / "lsp.log").read_text()
    tag = hashlib.blake2b(notebook.as_uri().encode(), digest_size=3).hexdigest()
    assert f"uri#{tag} automatic" in log


@contextlib.contextmanager
def _workbench(url: str) -> Iterator[Any]:
    """A Chromium page on code-server's workbench, loaded."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(url)
            page.locator(".monaco-workbench").wait_for(timeout=START_TIMEOUT_S * 1000)
            yield page
        finally:
            browser.close()


def _suggestion(editor: Any) -> str:
    """The ghost text shown in `editor` (a locator), once it shows."""
    from playwright.sync_api import expect

    ghost = editor.locator(".ghost-text-decoration")
    expect(ghost.first).to_be_visible(timeout=SUGGESTION_TIMEOUT_S * 1000)
    suggestion = "".join(ghost.all_inner_texts()).replace("\u00a0", " ")
    assert suggestion.strip()
    return suggestion


def _notebook(cells: list[tuple[str, str]]) -> dict[str, object]:
    def cell(kind: str, text: str) -> dict[str, object]:
        source = text.splitlines(keepends=True)
        if kind == "markdown":
            return {"cell_type": kind, "metadata": {}, "source": source}
        return {
            "cell_type": kind,
            "execution_count": None,
            "metadata": {},
            "outputs": [],
            "source": source,
        }

    return {
        "cells": [cell(kind, text) for kind, text in cells],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _open_file(page, name: str, editor: str = ".monaco-editor .view-lines") -> None:
    """Quick Open (Ctrl+P), the file name, Enter: the editor has the focus afterwards."""
    page.locator(".monaco-workbench .part.editor").click()
    page.keyboard.press("Control+P")
    page.locator(".quick-input-widget input").fill(name)
    page.locator(".quick-input-list .monaco-list-row", has_text=name).first.wait_for()
    page.keyboard.press("Enter")
    page.locator(editor).first.wait_for()
    page.locator(editor).first.click()


def _toggle_and_restart(page, log: Path) -> None:
    """Settings reach the server: toggled off it says `disabled`; a restart re-sends them."""
    from playwright.sync_api import expect

    ready = _status(page, "ready")
    _run_command(page, "codelm: Toggle Suggestions")
    expect(_status(page, "disabled")).to_be_visible(timeout=START_TIMEOUT_S * 1000)
    _run_command(page, "codelm: Toggle Suggestions")
    expect(ready).to_be_visible(timeout=START_TIMEOUT_S * 1000)
    _run_command(page, "codelm: Restart Language Server")
    _wait_for(lambda: len(re.findall(r"codelm-lsp \d+ starting", log.read_text())) == 2, "restart")
    expect(ready).to_be_visible(timeout=START_TIMEOUT_S * 1000)


def _status(page, state: str):
    return page.locator(".statusbar-item", has_text=f"codelm: {state}")


def _run_command(page, title: str) -> None:
    page.keyboard.press("F1")
    page.locator(".quick-input-widget input").fill(f">{title}")
    page.locator(".quick-input-list .monaco-list-row", has_text=title).first.wait_for()
    page.keyboard.press("Enter")


def _wait_for(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
