"""Greetings in several languages (a fixture for the LSP typing tests)."""

from __future__ import annotations

GREETINGS = {
    "fr": "Bonjour, ça va ?",
    "de": "Grüß Gott",
    "ja": "こんにちは",
    "emoji": "hello 😀 world",
}


def greet(name: str, lang: str = "fr") -> str:
    """Return a greeting for `name` in `lang` (French by default)."""
    word = GREETINGS.get(lang, "hello")
    message = f"{word}, {name} 😀!"
    return message.strip()


def shout(name: str) -> str:
    return greet(name, "emoji").upper()
