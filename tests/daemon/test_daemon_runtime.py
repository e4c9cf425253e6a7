"""Runtime files: private token, single-instance lock, stale pid files."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time

import pytest

from codelm.daemon.errors import Conflict, DaemonUnavailable
from codelm.daemon.runtime import (
    InstanceLock,
    RuntimePaths,
    cleanup_stale,
    code_stamp,
    is_lock_held,
    is_process_alive,
    mark_stopped,
    publish_endpoint,
    read_daemon_info,
    read_pid,
    stop_mark,
    stopped_by_user,
)


@pytest.fixture
def paths(tmp_path) -> RuntimePaths:
    return RuntimePaths.for_home(tmp_path)


def test_token_file_and_runtime_dir_are_private(paths):
    with InstanceLock(paths):
        publish_endpoint(paths, "http://127.0.0.1:1", 1, "secret")
        assert stat.S_IMODE(paths.token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(paths.runtime_dir.stat().st_mode) == 0o700
        info = read_daemon_info(paths)
    assert (info.pid, info.url, info.token) == (os.getpid(), "http://127.0.0.1:1", "secret")
    assert paths.port_file.exists() is False  # removed on release


def test_instance_lock_refuses_a_second_holder(paths):
    with InstanceLock(paths):
        assert is_lock_held(paths)
        with pytest.raises(Conflict, match=f"already running \\(pid {os.getpid()}\\)"):
            InstanceLock(paths).acquire()
    assert not is_lock_held(paths)
    with InstanceLock(paths):
        assert read_pid(paths) == os.getpid()


def test_a_daemon_whose_runtime_folder_was_replaced_leaves_the_new_files_alone(paths):
    # The folder deleted under a running daemon, another started there: when the first one
    # stops it must not remove the second one's files (the second could not be found).
    first = InstanceLock(paths)
    first.acquire()
    shutil.rmtree(paths.runtime_dir)
    with InstanceLock(paths):
        publish_endpoint(paths, "http://127.0.0.1:2", 2, "second")
        first.release()
        assert read_daemon_info(paths).token == "second"


def test_stale_files_without_lock_are_detected_and_removed(paths):
    paths.ensure_dirs()
    paths.pid_file.write_text("999999\n")
    paths.url_file.write_text("http://127.0.0.1:9\n")
    paths.token_file.write_text("old\n")
    assert read_pid(paths) is None
    with pytest.raises(DaemonUnavailable, match="died"):
        read_daemon_info(paths)
    assert not paths.pid_file.exists() and not paths.token_file.exists()
    assert cleanup_stale(paths) is False


def test_no_daemon_reads_as_unavailable(paths):
    with pytest.raises(DaemonUnavailable, match="not running"):
        read_daemon_info(paths)


def test_daemon_without_published_url_reads_as_starting(paths):
    with InstanceLock(paths), pytest.raises(DaemonUnavailable, match="starting"):
        read_daemon_info(paths)


def test_a_unix_socket_path_that_holds_a_file_is_refused_and_the_file_kept(tmp_path):
    # The daemon used to remove whatever stood at `unix_socket` (and again at exit).
    from codelm.daemon.config import DaemonConfig
    from codelm.daemon.server import BindError, _bind

    notes = tmp_path / "notes.txt"
    notes.write_text("the user's own words\n")
    with pytest.raises(BindError, match="exists and is not a socket"):
        _bind(DaemonConfig(unix_socket=str(notes)))
    assert notes.read_text() == "the user's own words\n"
    with pytest.raises(BindError, match="cannot listen on unix socket"):
        _bind(DaemonConfig(unix_socket=str(tmp_path / "no-such-folder" / "d.sock")))


def test_a_codelm_home_that_is_a_file_says_so(tmp_path):
    # `status` reads it as no daemon; `start` says which folder it cannot make, not a traceback.
    from codelm.daemon.errors import ConfigError

    home = tmp_path / "a-file"
    home.write_text("")
    paths = RuntimePaths.for_home(home)
    assert is_lock_held(paths) is False
    with pytest.raises(ConfigError, match=f"cannot create the folder {home}.*CODELM_HOME"):
        paths.ensure_dirs()


def test_stop_marks_the_home_stopped_until_a_daemon_starts(home, capsys):
    # The mark keeps connected editors from starting the daemon again (lsp/daemon_link.py).
    from codelm.daemon.cli import EXIT_NOT_RUNNING, main

    paths = RuntimePaths.for_home(home)
    with InstanceLock(paths):  # a daemon ran here
        pass
    assert main(["stop"]) == 0
    assert stopped_by_user(paths)
    capsys.readouterr()
    assert main(["status"]) == EXIT_NOT_RUNNING
    assert "stopped with `codelm-daemon stop`" in capsys.readouterr().out
    with InstanceLock(paths):
        assert not stopped_by_user(paths)


def test_a_stop_mark_tells_a_stop_from_a_restart(tmp_path):
    paths = RuntimePaths.for_home(tmp_path)
    paths.ensure_dirs()
    assert stop_mark(paths) is None
    mark_stopped(paths, restarting=True)
    assert stop_mark(paths) == "restart" and not stopped_by_user(paths)
    mark_stopped(paths)
    assert stop_mark(paths) == "stop" and stopped_by_user(paths)
    paths.stopped_file.write_text("1765000000\n")  # as versions before restart wrote it
    assert stop_mark(paths) == "stop"


def test_mark_stopped_without_a_runtime_folder_is_harmless(tmp_path):
    paths = RuntimePaths.for_home(tmp_path / "never-ran")
    mark_stopped(paths)
    assert not stopped_by_user(paths)


def test_the_code_stamp_changes_with_the_daemons_code_only(tmp_path):
    """What an upgrade or an edit changes in the code a daemon runs changes the stamp; the
    language server's code, byte code and other files do not."""
    files = {
        "daemon/service.py": "A = 1\n",
        "daemon/engine/loader.py": "B = 2\n",
        "quant/kernels_x86.c": "int f(void);\n",
        "lsp/server.py": "C = 3\n",
        "daemon/__pycache__/service.cpython-311.pyc": "\0",
        "daemon/py.typed": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    stamp = code_stamp(tmp_path)
    for unrelated in (
        "lsp/server.py",
        "daemon/__pycache__/service.cpython-311.pyc",
        "daemon/py.typed",
    ):
        (tmp_path / unrelated).write_text("changed")
        assert code_stamp(tmp_path) == stamp, unrelated
    for changed in ("daemon/engine/loader.py", "quant/kernels_x86.c"):
        (tmp_path / changed).write_text("changed")
        assert code_stamp(tmp_path) != stamp, changed
        stamp = code_stamp(tmp_path)
    (tmp_path / "daemon/engine/loader.py").rename(tmp_path / "daemon/engine/moved.py")
    assert code_stamp(tmp_path) != stamp


def test_a_process_that_exited_is_not_alive_before_its_parent_reaps_it():
    # A zombie still answers kill(pid, 0): a fetch killed under a parent that had not yet
    # reaped it kept its working folder.
    child = subprocess.Popen(["sleep", "30"])
    assert is_process_alive(child.pid)
    child.kill()
    deadline = time.monotonic() + 10
    while is_process_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not is_process_alive(child.pid)
    assert child.poll() == -9  # reaped only now: it was a zombie
    assert is_process_alive(os.getpid())
