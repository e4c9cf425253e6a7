"""Loading: a missing, corrupt or truncated model gives a clear ModelLoadError, not a traceback."""

from __future__ import annotations

import pytest

from codelm.daemon.engine import EngineConfig, load_engine
from codelm.daemon.errors import ModelLoadError


def test_missing_model_path_names_the_known_models(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a known name"):
        load_engine(EngineConfig(model=str(tmp_path / "nope.gguf")))


def test_corrupt_gguf_says_to_fetch_it_again(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file.*fetch it again"):
        load_engine(EngineConfig(model=str(bad)))


def test_truncated_gguf_is_reported(tmp_path, default_model_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_model_path.read_bytes()[: 8 << 20])
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_engine(EngineConfig(model=str(cut)))


def test_unknown_quantisation_is_refused(default_model_path):
    with pytest.raises(ModelLoadError, match="unknown quantisation"):
        load_engine(EngineConfig(model=str(default_model_path), quant="int3"))


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_engine(EngineConfig(model=str(tmp_path)))
