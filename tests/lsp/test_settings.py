from __future__ import annotations

import pytest

from codelm.lsp.settings import LspSettings, settings_from_options


def test_settings_default_when_no_options():
    assert settings_from_options(None) == (LspSettings(), [])


def test_settings_read_camel_case_nested_options():
    settings, problems = settings_from_options(
        {
            "daemon": {"url": "http://127.0.0.1:9000/", "autoStart": False},
            "maxTokens": 32,
            "maxTimeMs": 1500,
            "singleLine": "always",
            "debounceMs": 10,
            "enabledLanguages": ["Python"],
            "completionFallback": True,
        }
    )
    assert problems == []
    assert settings.daemon_url == "http://127.0.0.1:9000"
    assert settings.auto_start is False
    assert (settings.max_tokens, settings.max_time_ms) == (32, 1500)
    assert settings.single_line == "always"
    assert settings.enabled_languages == ("python",)
    assert settings.completion_fallback is True


def test_settings_invalid_values_fall_back_to_defaults_with_problems():
    settings, problems = settings_from_options(
        {"maxTokens": "many", "singleLine": "sometimes", "debounceMs": True, "timeoutMs": 10}
    )
    assert settings == LspSettings()
    assert len(problems) == 4
    assert any("maxTokens" in p for p in problems)


def test_settings_accept_codelm_section_and_report_unknown_keys():
    settings, problems = settings_from_options({"codelm": {"model": "qwen", "colour": "red"}})
    assert (settings.model, problems) == ("qwen", ["unknown option colour"])


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"max_tokens": 8}, "unknown option max_tokens (did you mean maxTokens?)"),
        ({"maxtokens": 9}, "unknown option maxtokens (did you mean maxTokens?)"),
        ({"maxTokns": 9}, "unknown option maxTokns (did you mean maxTokens?)"),
        ({"daemonUrl": "x"}, "unknown option daemonUrl (did you mean daemon.url?)"),
        ({"auto_start": False}, "unknown option auto_start (did you mean daemon.autoStart?)"),
        ({"daemon": {"autostart": 1}}, "unknown option daemon.autostart (did you mean daemon"),
        ({"enable": False}, "unknown option enable (did you mean enabled?)"),
        ({"colour": "red"}, "unknown option colour"),
        ({"daemon": "http://127.0.0.1:1"}, "daemon must be an object with url and autoStart"),
    ],
)
def test_settings_report_an_unknown_key_with_the_option_it_may_mean(options, problem):
    # They were ignored in silence (logged at DEBUG), so `max_tokens: 8` did nothing.
    settings, problems = settings_from_options({**options, "debounceMs": 5})
    assert settings == LspSettings(debounce_ms=5)  # the known ones still apply
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_settings_say_nothing_of_keys_a_client_sends_for_itself():
    # VS Code's own `codelm.serverPath` and `codelm.trace.server`, should a client send the
    # whole section; beside `codelm`, other tools' sections.
    options = {
        "codelm": {"serverPath": "", "trace": {"server": "off"}, "maxTokens": 8},
        "python": {"analysis": {}},
    }
    assert settings_from_options(options) == (LspSettings(max_tokens=8), [])


def test_settings_apply_onto_a_base():
    base, _ = settings_from_options({"maxTokens": 8})
    settings, _ = settings_from_options({"debounceMs": 0}, base)
    assert (settings.max_tokens, settings.debounce_ms) == (8, 0)


def test_settings_non_object_options_report_one_problem():
    settings, problems = settings_from_options(["x"])
    assert settings == LspSettings() and len(problems) == 1


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([], LspSettings()),
        ({"codelm": []}, LspSettings()),
        ({"daemon": [], "maxTokens": 8}, LspSettings(max_tokens=8)),
    ],
)
def test_settings_take_an_empty_list_for_an_empty_object(options, expected):
    # Neovim encodes an empty Lua table as `[]`: `require('codelm').setup()` got the warning
    # "options must be an object, got list".
    assert settings_from_options(options) == (expected, [])


def test_language_filter():
    only_py = LspSettings(enabled_languages=("python",))
    assert only_py.is_language_enabled("python") and not only_py.is_language_enabled("rust")
    no_md = LspSettings(disabled_languages=("markdown",))
    assert no_md.is_language_enabled("python") and not no_md.is_language_enabled("Markdown")
    assert not LspSettings(enabled=False).is_language_enabled("python")


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9000", "http://localhost:9000/", "http://[::1]:9000", "unix:/run/d"]
)
def test_a_local_daemon_url_is_taken(url):
    assert settings_from_options({"daemon": {"url": url}})[0].daemon_url == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",  # left the status at `loading` for good, retried on every key
        "http://",
        "http://127.0.0.1:99999",
        "http://127.0.0.1",
        "unix:",  # connected to localhost:80
        "https://127.0.0.1:9000",  # the daemon speaks plain HTTP
        "http://192.168.1.5:9000",  # was sent the local daemon's token
        "http://example.com:9000",
        "ftp://127.0.0.1:21",
    ],
)
def test_a_daemon_url_that_cannot_be_the_local_daemon_is_refused(url):
    settings, problems = settings_from_options({"daemon": {"url": url}})
    assert settings.daemon_url is None
    assert problems and "127.0.0.1:PORT" in problems[0]
