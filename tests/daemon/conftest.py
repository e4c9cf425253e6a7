"""Fixtures for daemon tests: an in-process app on a fake engine, isolated runtime paths."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fake_daemon import FakeDaemon, start_fake_daemon


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """CODELM_HOME in a temporary folder, so nothing touches the user's real files."""
    monkeypatch.setenv("CODELM_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
async def fake_daemon(tmp_path: Path) -> AsyncIterator[FakeDaemon]:
    daemon = await start_fake_daemon(tmp_path, step_s=0.001)
    yield daemon
    await daemon.client.close()


@pytest.fixture
async def slow_daemon(tmp_path: Path) -> AsyncIterator[FakeDaemon]:
    """Each generated piece takes 10 ms: long requests can be cancelled or superseded."""
    daemon = await start_fake_daemon(tmp_path, step_s=0.01)
    yield daemon
    await daemon.client.close()
