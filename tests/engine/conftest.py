"""Engine fixtures: the default model (fetched by `make install`) and tiny random llama models."""

from __future__ import annotations

from pathlib import Path

import pytest

from codelm.daemon import catalog


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default GGUF; `make install` fetches it (fetched here if a bare pytest run lacks it)."""
    return catalog.fetch("default", log=lambda message: None)


@pytest.fixture(scope="session")
def default_engine(default_model_path):
    from codelm.daemon.engine import EngineConfig, load_engine

    return load_engine(EngineConfig(model=str(default_model_path), quant="fp32"))
