"""An in-process daemon app on the fake engine (aiohttp TestServer), for service/client tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fake_engine import make_loader

from codelm.daemon.config import DaemonConfig
from codelm.daemon.engine import EngineConfig
from codelm.daemon.runtime import RuntimePaths
from codelm.daemon.scheduler import EngineState, Scheduler
from codelm.daemon.service import create_app

TOKEN = "test-token-0123456789"


@dataclass
class FakeDaemon:
    app: web.Application
    client: TestClient
    scheduler: Scheduler
    loader: Any

    @property
    def engine(self) -> Any:
        return self.loader.engine

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    async def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        headers = {**self.auth, **kw.pop("headers", {})}
        return await self.client.post(path, json=body, headers=headers, **kw)


async def start_fake_daemon(
    tmp_path: Path, *, wait_ready: bool = True, max_body_bytes: int = 1024 * 1024, **loader_kw: Any
) -> FakeDaemon:
    model = loader_kw.pop("model", "fake.gguf")
    loader = make_loader(**loader_kw)
    config = DaemonConfig(
        engine=EngineConfig(model=model),
        max_body_bytes=max_body_bytes,
        paths=RuntimePaths.for_home(tmp_path),
    )
    scheduler = Scheduler(config.engine, loader=loader)
    app = create_app(config, scheduler, token=TOKEN)
    client = TestClient(TestServer(app))
    await client.start_server()
    deadline = asyncio.get_running_loop().time() + 5
    while wait_ready and scheduler.state is not EngineState.READY:
        assert asyncio.get_running_loop().time() < deadline, scheduler.health()
        await asyncio.sleep(0.005)
    return FakeDaemon(app=app, client=client, scheduler=scheduler, loader=loader)
