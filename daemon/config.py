"""DaemonConfig, resolved once: command-line flags > CODELM_* environment > config.toml > defaults.

The only module of the daemon that reads environment variables and the config file.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import path_exists
from .engine import QUANT_MODES, EngineConfig, copies_budget, is_server_url
from .engine.prompt import FIM_SETTINGS, SERVER_FIM
from .errors import ConfigError
from .runtime import RuntimePaths

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: settings still come from flags and the environment
    tomllib = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

ENV_PREFIX = "CODELM_"
HOME_ENV = "CODELM_HOME"
# CODELM_* variables that are not daemon settings: the home folder, the JetBrains plugin's
# codelm-lsp, the editor tests of `make test`.
OTHER_ENV = (HOME_ENV, "CODELM_LSP", "CODELM_EDITOR_TESTS")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "quant": QUANT_MODES,
    "log_level": LOG_LEVELS,
    "fim": FIM_SETTINGS,
}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
AT_LEAST = {"prefill_chunk": 1, "max_body_bytes": 1, "max_pending": 1, "start_timeout_s": 1}
MAX_THREADS = 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class DaemonConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks a free port; clients read it from the runtime dir
    unix_socket: str | None = None  # serve on this socket path instead of TCP
    engine: EngineConfig = field(default_factory=EngineConfig)
    log_level: str = "INFO"
    idle_unload_s: float = 0.0  # unload the model after this long without requests; 0: never
    max_body_bytes: int = 32 * 1024 * 1024
    max_pending: int = 256  # queued requests beyond this are refused (503)
    start_timeout_s: float = 60.0  # how long `start` and clients wait for the socket
    paths: RuntimePaths = field(default_factory=lambda: RuntimePaths.for_home(None))

    def to_json(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        body["paths"] = {k: str(v) for k, v in body["paths"].items()}
        if body["engine"]["server_api_key"]:
            body["engine"]["server_api_key"] = "(set)"  # status shows the config: not the key
        return body


_DAEMON_FIELDS = {f.name: f for f in dataclasses.fields(DaemonConfig)}
_ENGINE_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}
_SETTABLE = (set(_DAEMON_FIELDS) - {"engine", "paths"}) | set(_ENGINE_FIELDS)


def daemon_environment(config: DaemonConfig) -> dict[str, str]:
    """The environment for the daemon `start` spawns, which reads its settings again in `/`:
    CODELM_HOME and the unix socket as whole paths (relative ones named other folders)."""
    env = dict(os.environ)
    if env.get(HOME_ENV):
        env[HOME_ENV] = str(Path(env[HOME_ENV]).expanduser().absolute())
    if config.unix_socket:
        env[ENV_PREFIX + "UNIX_SOCKET"] = config.unix_socket
    return env


def resolve_paths(environ: Mapping[str, str] | None = None) -> RuntimePaths:
    """Runtime paths, all under $CODELM_HOME when it is set (tests use that for isolation)."""
    env = os.environ if environ is None else environ
    return RuntimePaths.for_home(env.get(HOME_ENV) or None)


def resolve_config(
    cli_overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> DaemonConfig:
    """Merge defaults, config.toml, CODELM_* variables and flags (None values are ignored).

    Setting names are the field names of DaemonConfig and EngineConfig, flat (`model`,
    `device`, `port`...); the config file may also group engine settings under `[engine]`.
    Raises ConfigError naming the source of a bad value.
    """
    env = os.environ if environ is None else environ
    paths = resolve_paths(env)
    values: dict[str, Any] = {}
    for source, layer in (
        (str(paths.config_file), _read_file(paths.config_file)),
        ("environment", _read_env(env)),
        ("command line", {k: v for k, v in (cli_overrides or {}).items() if v is not None}),
    ):
        for name, raw in layer.items():
            if name not in _SETTABLE:
                _warn_unknown(name, source)
                continue
            values[name] = _coerce(name, raw, source)
    return _build(values, paths)


def _read_file(path: Path) -> dict[str, Any]:
    if tomllib is None:
        if path.exists():
            raise ConfigError(f"{path}: reading config.toml needs Python 3.11 or newer")
        return {}
    try:
        # Without the byte order mark some Windows editors write (tomllib refuses it).
        data = tomllib.loads(path.read_bytes().decode("utf-8").removeprefix("\ufeff"))
    except FileNotFoundError:
        return {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{path}: {exc}; fix or remove the file") from exc
    engine = data.pop("engine", {})
    if not isinstance(engine, dict):
        raise ConfigError(f"{path}: [engine] must be a table")
    for name in sorted(data.keys() & engine.keys()):
        logger.warning("%s: %s is set twice; the [engine] table's value is used", path, name)
    return {**data, **engine}


def _read_env(env: Mapping[str, str]) -> dict[str, str]:
    """The CODELM_* variables as settings, unknown names included (a misspelt one is said)."""
    return {
        key.removeprefix(ENV_PREFIX).lower(): raw
        for key, raw in sorted(env.items())
        if key.startswith(ENV_PREFIX) and key not in OTHER_ENV and raw != ""
    }


def _warn_unknown(name: str, source: str) -> None:
    environment = source == "environment"
    spelt = ENV_PREFIX + name.upper() if environment else name
    close = difflib.get_close_matches(name, sorted(_SETTABLE), n=1, cutoff=0.6)
    hint = ""
    if close:
        hint = f" (did you mean {ENV_PREFIX + close[0].upper() if environment else close[0]}?)"
    logger.warning("ignoring unknown setting %s from %s%s", spelt, source, hint)


def _field_type(name: str) -> str:
    f = _DAEMON_FIELDS.get(name) or _ENGINE_FIELDS[name]
    return str(f.type)


def _coerce(name: str, raw: Any, source: str) -> Any:
    kind = _field_type(name)
    where = f"{name} (from {source})"
    try:
        if kind == "int":
            value: Any = _to_int(raw)
        elif kind == "float":
            value = _to_float(raw)
        elif kind == "bool":
            value = _to_bool(raw)
        elif kind.startswith("str"):
            if not isinstance(raw, str):
                raise TypeError(f"must be a string, got {type(raw).__name__}")
            value = raw
        else:
            raise TypeError(f"unsupported setting type {kind}")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return _check(name, value, where)


def _to_int(raw: Any) -> int:
    try:
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise ValueError
        return int(raw)
    except ValueError:
        raise TypeError(f"must be an integer, got {raw!r}") from None


def _to_float(raw: Any) -> float:
    try:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ValueError
        return float(raw)
    except ValueError:
        raise TypeError(f"must be a number, got {raw!r}") from None


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    words = {"1": True, "true": True, "yes": True, "on": True}
    words |= {"0": False, "false": False, "no": False, "off": False}
    if isinstance(raw, str) and raw.lower() in words:
        return words[raw.lower()]
    raise TypeError(f"must be true or false, got {raw!r}")


def _check(name: str, value: Any, where: str) -> Any:
    if name in CHOICES:  # in any case: `INFO`, `info`; `int4`, `INT4`
        value = value.upper() if name == "log_level" else value.lower()
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"{where}: must be one of {', '.join(CHOICES[name])}, got {value!r}")
    if name == "prefill_copies":
        try:
            copies_budget(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if name == "port" and not 0 <= value <= 65535:
        raise ConfigError(f"{where}: must be between 0 and 65535, got {value}")
    if name == "host" and value not in LOOPBACK_HOSTS:
        raise ConfigError(f"{where}: the daemon only listens on loopback ({LOOPBACK_HOSTS})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ConfigError(f"{where}: must be >= 0, got {value}")
    if name in AT_LEAST and value < AT_LEAST[name]:
        raise ConfigError(f"{where}: must be at least {AT_LEAST[name]}, got {value}")
    if name == "threads" and value > MAX_THREADS:
        raise ConfigError(
            f"{where}: must be at most {MAX_THREADS} (0: the free cores), got {value}"
        )
    if name == "model":
        if not value.strip():
            # Path("") is the working folder: the load failed on some folder's config.json.
            raise ConfigError(
                f"{where}: must name a model (`default`, a .gguf file, a folder or a server URL)"
            )
        if "://" in value and not is_server_url(value):
            raise ConfigError(
                f"{where}: an inference server is named by an http:// or https:// URL, "
                f"got {value!r}"
            )
        value = _server_url(value, where) if is_server_url(value) else _absolute_model(value)
    if name == "unix_socket":
        value = str(Path(value).expanduser().absolute()) if value else None
    return value


def _server_url(url: str, where: str) -> str:
    """An inference server's URL, checked now rather than at the first request."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise ConfigError(f"{where}: {url!r} is not a valid URL ({exc})") from None
    if parts.username or parts.password:
        raise ConfigError(
            f"{where}: put the server's key in `server_api_key`, not in the URL (the URL is "
            "shown by /health and status, and logged)"
        )
    if not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(
            f"{where}: an inference server is named by its URL, such as http://127.0.0.1:8080, "
            f"got {url!r}"
        )
    return url


def _absolute_model(model: str) -> str:
    """A model given as a path is made absolute now: the daemon runs in another folder."""
    path = Path(model).expanduser()
    looks_like_path = os.sep in model or model.endswith(".gguf") or model.startswith(("~", "."))
    return str(path.absolute()) if looks_like_path or path_exists(path) else model


def _build(values: dict[str, Any], paths: RuntimePaths) -> DaemonConfig:
    if values.get("fim") == SERVER_FIM and not is_server_url(values.get("model", "")):
        raise ConfigError(
            f"fim = {SERVER_FIM!r} is for a model that is an inference server's URL; a local "
            "model needs auto, none or a FIM format"
        )
    engine_values = {k: v for k, v in values.items() if k in _ENGINE_FIELDS}
    daemon_values = {k: v for k, v in values.items() if k in _DAEMON_FIELDS}
    return DaemonConfig(engine=EngineConfig(**engine_values), paths=paths, **daemon_values)
