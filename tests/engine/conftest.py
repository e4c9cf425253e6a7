"""Engine fixtures: the default model (fetched by `make install`) and tiny random llama models."""

from __future__ import annotations

from pathlib import Path

import pytest

from codelm.daemon import catalog


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """SmolLM2-135M, the suite's model (small and fast); fetched here if it is missing."""
    return catalog.fetch("smollm2-135m", log=lambda message: None)


@pytest.fixture(scope="session")
def default_engine(default_model_path):
    from codelm.daemon.engine import EngineConfig, load_engine

    return load_engine(EngineConfig(model=str(default_model_path), quant="fp32"))


@pytest.fixture(scope="session")
def fim_engine():
    """Qwen2.5-Coder (the project's default model, fetched by `make install`): SmolLM2 has no
    FIM tokens. Quantised as the daemon loads it, on one thread so that reruns sum alike."""
    from codelm.daemon.engine import EngineConfig, load_engine

    path = catalog.fetch("default", log=lambda message: None)
    return load_engine(EngineConfig(model=str(path), quant="auto", threads=1))


@pytest.fixture
def forwards(default_engine):
    """The number of forwards of the default engine's model since the test (or its last reset
    to 0) began: forwards[0]."""
    calls = [0]

    def count(module, args, output):
        calls[0] += 1

    handle = default_engine.model.register_forward_hook(count)
    yield calls
    handle.remove()
