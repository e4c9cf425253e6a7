"""Helpers for tests that run the real daemon as a subprocess with CODELM_HOME in a tmp dir."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from codelm.daemon.runtime import RuntimePaths

ENGINE_FILE = Path(__file__).parents[2] / "daemon" / "engine" / "engine.py"
START_TIMEOUT_S = 240


def require_engine() -> None:
    if not ENGINE_FILE.exists():
        pytest.skip("daemon/engine/engine.py is not written yet (the lead is on it)")


# The suite runs on the small SmolLM2 model (fast); `default` is the everyday Qwen model.
TEST_MODEL = "smollm2-135m"


def real_models_dir() -> Path:
    """The models folder of the user's real data dir (or of an outer CODELM_HOME)."""
    return RuntimePaths.for_home(os.environ.get("CODELM_HOME")).data_dir / "models"


def ensure_default_model() -> None:
    """Fetch the default model once (as `make install` does) when it is not there yet."""
    from codelm.daemon import catalog

    entry = catalog.catalog_entry(TEST_MODEL)
    assert entry is not None
    if not (real_models_dir() / entry.filename).exists():
        try:
            catalog.fetch(TEST_MODEL, log=lambda _msg: None)
        except Exception as exc:
            pytest.fail(f"the default model is missing and could not be fetched: {exc}")


def make_home(root: Path) -> Path:
    """A CODELM_HOME whose data/models links to the real models folder (no second copy)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    link = root / "data" / "models"
    if not link.exists():
        link.symlink_to(real_models_dir(), target_is_directory=True)
    return root


def cli(
    home: Path,
    *args: str,
    timeout: float = START_TIMEOUT_S,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run `codelm-daemon ARGS` with CODELM_HOME=home (and no other CODELM_* from outside),
    in `cwd` (where a relative home is)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODELM_")} | (env or {})
    env["CODELM_HOME"] = str(home)
    env.setdefault("CODELM_MODEL", TEST_MODEL)  # a --model flag still wins
    return subprocess.run(
        [sys.executable, "-m", "codelm.daemon.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


@dataclass
class Live:
    home: Path
    url: str
    token: str
    pid: int

    @property
    def paths(self) -> RuntimePaths:
        return RuntimePaths.for_home(self.home)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def connection(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[int, Any]:
        """One request; `body` may be bytes (sent as is) or JSON-able. Returns (status, json)."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json"}
        if auth:
            all_headers["Authorization"] = f"Bearer {self.token}"
        all_headers.update(headers or {})
        conn = self.connection()
        try:
            conn.request(method, path, body=data, headers=all_headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        return resp.status, json.loads(raw) if raw else None


def read_live(home: Path) -> Live:
    paths = RuntimePaths.for_home(home)
    return Live(
        home=home,
        url=paths.url_file.read_text().strip(),
        token=paths.token_file.read_text().strip(),
        pid=int(paths.pid_file.read_text()),
    )
