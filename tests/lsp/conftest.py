"""Fixtures for the language server tests: the fake daemon and an initialized editor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from lsp_editor import Editor, start_editor
from lsp_fake_daemon import FakeDaemon


@pytest_asyncio.fixture
async def fake_daemon() -> AsyncIterator[FakeDaemon]:
    daemon = await FakeDaemon().start()
    yield daemon
    await daemon.stop()


@pytest_asyncio.fixture
async def editor(tmp_path: Path, fake_daemon: FakeDaemon) -> AsyncIterator[Editor]:
    """codelm-lsp against the fake daemon, no debounce, initialized."""
    options = {"daemon": {"url": fake_daemon.url}, "debounceMs": 0, "timeoutMs": 2000}
    client, ed = await start_editor(tmp_path, options)
    await ed.wait_status("ready")
    yield ed
    await client.shutdown_session()
    await client.stop()
