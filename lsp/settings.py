"""LspSettings: the server's settings, read from camelCase `initializationOptions`.

The same converter handles `workspace/didChangeConfiguration`. An invalid value falls back to
its default and an unknown key is ignored; both are reported once, as one warning listing
every problem.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import urlsplit

from codelm.daemon.protocol import LOOPBACK_NAMES, MAX_TIME_MS_LIMIT, MAX_TOKENS_LIMIT

logger = logging.getLogger(__name__)

SINGLE_LINE_MODES = ("auto", "always", "never")


@dataclass(frozen=True, kw_only=True, slots=True)
class LspSettings:
    """Settings of one `codelm-lsp` process; durations in ms."""

    enabled: bool = True  # false: answer nothing, status "disabled"
    daemon_url: str | None = None  # None: discover the daemon from the runtime dir
    auto_start: bool = True
    model: str | None = None  # passed to `codelm-daemon start --model` on auto-start
    max_tokens: int = 64
    max_time_ms: int = 0  # the daemon stops decoding after this long (0: no limit)
    single_line: str = "auto"  # auto | always | never
    debounce_ms: int = 75
    timeout_ms: int = 10_000  # a daemon answer later than this is dropped (empty list)
    enabled_languages: tuple[str, ...] = ()  # empty: every language not disabled
    disabled_languages: tuple[str, ...] = ()
    completion_fallback: bool = False  # also serve textDocument/completion
    context_files: int = 3  # other open files whose snippets the prompt reads (lsp/context.py)
    warmup: bool = True  # prefill where the editor shows the cursor (codelm/didFocus)
    # Also take the cursor from textDocument/documentHighlight requests (answered with none),
    # which editors without codelm/didFocus send where the cursor rests (LSP4IJ, Zed).
    warmup_from_highlights: bool = True

    def is_language_enabled(self, language: str | None) -> bool:
        lang = (language or "").lower()
        if not self.enabled or lang in self.disabled_languages:
            return False
        return not self.enabled_languages or lang in self.enabled_languages


def _url(value: Any) -> str | None:
    """The local daemon's address. It listens on this machine only, and the token it is sent
    with is that daemon's: any other host, or a URL that cannot be one, is refused."""
    wanted = "must be the local daemon's http://127.0.0.1:PORT or unix:/path/to/socket"
    if not isinstance(value, str):
        raise ValueError(wanted)
    if value.startswith("unix:"):
        if len(value) > len("unix:"):
            return value
        raise ValueError(wanted)
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:  # "http://[::1", a port past 65535
        raise ValueError(wanted) from None
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_NAMES or port is None:
        raise ValueError(wanted)
    return value.rstrip("/")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("must be true or false")


def _optional_str(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    raise ValueError("must be a non-empty string")


def _int_in(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        raise ValueError(f"must be an integer between {low} and {high}")

    return check


def _single_line(value: Any) -> str:
    if value in SINGLE_LINE_MODES:
        return str(value)
    raise ValueError(f"must be one of {', '.join(SINGLE_LINE_MODES)}")


def _languages(value: Any) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(v.lower() for v in value)
    raise ValueError("must be a list of language ids")


# camelCase option path -> (field name, converter). Dots separate nested objects.
_OPTIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "enabled": ("enabled", _bool),
    "daemon.url": ("daemon_url", _url),
    "daemon.autoStart": ("auto_start", _bool),
    "model": ("model", _optional_str),
    "maxTokens": ("max_tokens", _int_in(1, MAX_TOKENS_LIMIT)),
    "maxTimeMs": ("max_time_ms", _int_in(0, MAX_TIME_MS_LIMIT)),
    "singleLine": ("single_line", _single_line),
    "debounceMs": ("debounce_ms", _int_in(0, 2000)),
    "timeoutMs": ("timeout_ms", _int_in(50, 600_000)),
    "enabledLanguages": ("enabled_languages", _languages),
    "disabledLanguages": ("disabled_languages", _languages),
    "completionFallback": ("completion_fallback", _bool),
    "contextFiles": ("context_files", _int_in(0, 16)),
    "warmup": ("warmup", _bool),
    "warmupFromHighlights": ("warmup_from_highlights", _bool),
}


# Keys of VS Code's `codelm.*` settings that only the extension reads; a client that sends
# the whole section sends them too.
_CLIENT_ONLY = frozenset({"serverPath", "trace.server"})
_SEPARATORS = str.maketrans("", "", "-_.")  # dropped when comparing an unknown key with ours
# Objects that hold options: "daemon".
_GROUPS = frozenset(p.rsplit(".", 1)[0] for p in _OPTIONS if "." in p)


def _as_object(value: Any) -> Mapping[str, Any] | None:
    """`value` as an object; an empty list is one: Neovim encodes an empty Lua table, `{}`
    in a user's config, as `[]`."""
    if isinstance(value, Mapping):
        return value
    return {} if isinstance(value, list) and not value else None


def _flatten(options: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in options.items():
        path = f"{prefix}{key}"
        if path in _OPTIONS:
            flat[path] = value
        elif isinstance(value, Mapping) or (path in _GROUPS and _as_object(value) is not None):
            flat.update(_flatten(_as_object(value) or {}, f"{path}."))
        else:
            flat[path] = value
    return flat


def _unknown(path: str, value: Any) -> str:
    """The problem an unknown option is, with the known one it may have meant."""
    if path in _GROUPS:
        inner = " and ".join(p.split(".", 1)[1] for p in _OPTIONS if p.startswith(f"{path}."))
        return f"{path} must be an object with {inner} (got {value!r})"
    hint = _close_option(path)
    return f"unknown option {path}" + (f" (did you mean {hint}?)" if hint else "")


def _close_option(path: str) -> str | None:
    """The known option `path` most likely misspells: same letters once case, `_`, `-` and
    `.` are dropped (max_tokens, daemonUrl), a nested option's bare name (autoStart), or
    else a close spelling."""

    def squash(text: str) -> str:
        return text.lower().translate(_SEPARATORS)

    for known in _OPTIONS:
        if squash(path) in (squash(known), squash(known.rsplit(".", 1)[-1])):
            return known
    by_squashed = {squash(known): known for known in _OPTIONS}
    close = difflib.get_close_matches(squash(path), by_squashed, n=1, cutoff=0.75)
    return by_squashed[close[0]] if close else None


def settings_from_options(
    options: Any, base: LspSettings | None = None
) -> tuple[LspSettings, list[str]]:
    """Convert camelCase options onto `base` (defaults when None); returns settings + problems.

    Accepts the options object itself or one wrapped as `{"codelm": {...}}` (the shape
    `workspace/didChangeConfiguration` sends; the keys beside `codelm` are other tools').
    An empty list counts as an empty object (Neovim's `{}`). An unknown key is a problem
    (ignored, with the known key it may misspell), but not VS Code's client-only ones.
    """
    base = base or LspSettings()
    if options is None:
        return base, []
    if (given := _as_object(options)) is None:
        return base, [f"options must be an object, got {type(options).__name__}"]
    if (section := _as_object(given.get("codelm"))) is not None:
        given = section
    changes: dict[str, Any] = {}
    problems: list[str] = []
    for path, value in _flatten(given).items():
        if path not in _OPTIONS:
            if path not in _CLIENT_ONLY:
                problems.append(_unknown(path, value))
            continue
        name, convert = _OPTIONS[path]
        if value is None:
            changes[name] = getattr(LspSettings(), name)
            continue
        try:
            changes[name] = convert(value)
        except ValueError as exc:
            problems.append(f"{path} {exc} (got {value!r}); using the default")
            changes[name] = getattr(LspSettings(), name)
    return replace(base, **changes), problems


def describe(settings: LspSettings) -> str:
    """One line for the log."""
    return ", ".join(f"{f.name}={getattr(settings, f.name)!r}" for f in fields(settings))


def runtime_home() -> str | None:
    """$CODELM_HOME: one folder for the daemon's runtime files, logs and models (tests)."""
    return os.environ.get("CODELM_HOME") or None
