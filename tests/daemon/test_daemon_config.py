"""DaemonConfig resolution: flags > CODELM_* environment > config.toml > defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from codelm.daemon.catalog import resolve_model_path
from codelm.daemon.config import DaemonConfig, resolve_config
from codelm.daemon.errors import ConfigError, ModelLoadError
from codelm.daemon.runtime import RuntimePaths


def _write_config(home: Path, text: str) -> Path:
    path = RuntimePaths.for_home(home).config_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_config_defaults_when_nothing_is_set(tmp_path):
    config = resolve_config({}, {"CODELM_HOME": str(tmp_path)})
    assert config.host == "127.0.0.1" and config.port == 0
    assert config.engine.model == "default" and config.engine.device == "auto"
    assert config.idle_unload_s == 0
    assert config.paths == RuntimePaths.for_home(tmp_path)


def test_config_flags_beat_env_beat_file(tmp_path):
    _write_config(tmp_path, 'port = 1111\nlog_level = "debug"\n[engine]\nquant = "int8"\n')
    env = {"CODELM_HOME": str(tmp_path), "CODELM_PORT": "2222", "CODELM_QUANT": "int4"}
    config = resolve_config({"port": 3333, "quant": None}, env)
    assert config.port == 3333  # flag
    assert config.engine.quant == "int4"  # env (the flag was not given)
    assert config.log_level == "DEBUG"  # file
    config = resolve_config({}, {"CODELM_HOME": str(tmp_path)})
    assert (config.port, config.engine.quant) == (1111, "int8")


def test_config_reads_engine_settings_flat_or_in_table(tmp_path):
    _write_config(tmp_path, 'device = "cpu"\n[engine]\nthreads = 3\nprefill_copies = "none"\n')
    config = resolve_config({}, {"CODELM_HOME": str(tmp_path)})
    assert (config.engine.device, config.engine.threads) == ("cpu", 3)
    assert config.engine.prefill_copies == "none"
    sized = resolve_config({}, {"CODELM_HOME": str(tmp_path), "CODELM_PREFILL_COPIES": "300MB"})
    assert sized.engine.prefill_copies == "300MB"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CODELM_PORT": "http"}, "port (from environment)"),
        ({"CODELM_PORT": "70000"}, "between 0 and 65535"),
        ({"CODELM_DEVICE": "tpu"}, "must be one of auto, cpu, cuda"),
        ({"CODELM_HOST": "0.0.0.0"}, "only listens on loopback"),
        ({"CODELM_IDLE_UNLOAD_S": "-1"}, "must be >= 0"),
        ({"CODELM_PREFILL_COPIES": "some"}, "(from environment): must be auto, none or a size"),
        ({"CODELM_IDLE_UNLOAD_S": "nan"}, "must be a finite number"),
        ({"CODELM_START_TIMEOUT_S": "inf"}, "must be a finite number"),
        ({"CODELM_PREFILL_CHUNK": "0"}, "must be at least 1"),
        ({"CODELM_THREADS": "100000"}, "must be at most 1024"),
        ({"CODELM_PORT": "abc"}, "port (from environment): must be an integer, got 'abc'"),
        ({"CODELM_FIM": "bogus"}, "fim (from environment): must be one of auto, none, server"),
        ({"CODELM_FIM": "server"}, "is for a model that is an inference server's URL"),
        ({"CODELM_START_TIMEOUT_S": "0"}, "must be at least 1"),
        ({"CODELM_MODEL": "ftp://host/x.gguf"}, "named by an http:// or https:// URL"),
    ],
)
def test_config_rejects_bad_env_values_naming_the_source(tmp_path, env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_config({}, {"CODELM_HOME": str(tmp_path), **env})


def test_config_rejects_bad_file_naming_the_file(tmp_path):
    path = _write_config(tmp_path, 'quant = "int3"\n')
    with pytest.raises(ConfigError, match=str(path)):
        resolve_config({}, {"CODELM_HOME": str(tmp_path)})
    _write_config(tmp_path, "port = [1\n")
    with pytest.raises(ConfigError, match="fix or remove the file"):
        resolve_config({}, {"CODELM_HOME": str(tmp_path)})
    (tmp_path / "config" / "config.toml").write_bytes(b"\xff\xfe=1\n")  # not UTF-8
    with pytest.raises(ConfigError, match="fix or remove the file"):
        resolve_config({}, {"CODELM_HOME": str(tmp_path)})
    _write_config(tmp_path, "port = true\n")
    with pytest.raises(ConfigError, match="must be an integer"):
        resolve_config({}, {"CODELM_HOME": str(tmp_path)})


def test_config_reads_choices_in_any_case_and_a_file_with_a_byte_order_mark(tmp_path):
    _write_config(tmp_path, '\ufeffquant = "INT4"\nlog_level = "debug"\n')
    config = resolve_config({}, {"CODELM_HOME": str(tmp_path), "CODELM_DEVICE": "CPU"})
    assert (config.engine.quant, config.log_level, config.engine.device) == ("int4", "DEBUG", "cpu")
    remote = {
        "CODELM_HOME": str(tmp_path),
        "CODELM_MODEL": "http://127.0.0.1:1",
        "CODELM_FIM": "server",
    }
    assert resolve_config({}, remote).engine.fim == "server"


def test_a_setting_both_at_the_top_and_in_the_engine_table_is_warned_of(tmp_path, caplog):
    path = _write_config(tmp_path, 'quant = "int8"\n[engine]\nquant = "int4"\n')
    assert resolve_config({}, {"CODELM_HOME": str(tmp_path)}).engine.quant == "int4"
    assert f"{path}: quant is set twice; the [engine] table's value is used" in caplog.text


def test_config_ignores_unknown_keys_with_a_warning(tmp_path, caplog):
    _write_config(tmp_path, "colour = 'blue'\n")
    config = resolve_config({}, {"CODELM_HOME": str(tmp_path)})
    assert config == DaemonConfig(paths=config.paths)
    assert "colour" in caplog.text


def test_a_misspelt_setting_in_the_file_or_the_environment_is_said_with_the_right_name(
    tmp_path, caplog
):
    # CODELM_THREAD=1 was ignored without a word: the daemon ran on every core.
    _write_config(tmp_path, "treads = 1\n")
    env = {"CODELM_HOME": str(tmp_path), "CODELM_THREAD": "1", "CODELM_LSP": "/opt/codelm-lsp"}
    config = resolve_config({}, env)
    assert config == DaemonConfig(paths=config.paths)
    warnings = [r.getMessage() for r in caplog.records]
    assert any(w.endswith("config.toml (did you mean threads?)") for w in warnings), warnings
    assert (
        "ignoring unknown setting CODELM_THREAD from environment (did you mean CODELM_THREADS?)"
        in warnings
    )
    assert len(warnings) == 2  # CODELM_HOME and CODELM_LSP are not daemon settings


def test_config_makes_model_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = resolve_config({"model": "models/x.gguf"}, {"CODELM_HOME": str(tmp_path)})
    assert config.engine.model == str(tmp_path / "models" / "x.gguf")
    assert resolve_config({"model": "default"}, {}).engine.model == "default"


def test_an_empty_model_is_refused_not_taken_for_the_working_folder(tmp_path):
    with pytest.raises(ConfigError, match="model .from command line.: must name a model"):
        resolve_config({"model": ""}, {"CODELM_HOME": str(tmp_path)})
    path = _write_config(tmp_path, 'model = " "\n')
    with pytest.raises(ConfigError, match=str(path)):
        resolve_config({}, {"CODELM_HOME": str(tmp_path)})


def test_a_model_name_no_file_could_have_is_a_name_not_a_crash(tmp_path):
    # Path.exists raises for a name longer than the system allows, or holding a NUL.
    for name in ("x" * 300, "a\x00b"):
        config = resolve_config({}, {"CODELM_HOME": str(tmp_path), "CODELM_MODEL": name})
        assert config.engine.model == name
        with pytest.raises(ModelLoadError, match="neither a known name"):
            resolve_model_path(name)


def test_codelm_home_puts_every_path_under_it(tmp_path):
    paths = resolve_config({}, {"CODELM_HOME": str(tmp_path)}).paths
    for path in (paths.runtime_dir, paths.log_dir, paths.data_dir, paths.cache_dir):
        assert Path(path).is_relative_to(tmp_path)
    assert paths.config_file.is_relative_to(tmp_path)


def test_config_is_frozen():
    config = DaemonConfig()
    with pytest.raises((AttributeError, TypeError)):
        config.port = 1  # type: ignore[misc]
    assert os.fspath(config.paths.log_file).endswith("daemon.log")
