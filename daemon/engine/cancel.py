"""CancelToken: set by the scheduler (supersede, disconnect), checked between engine steps."""

from __future__ import annotations

import threading


class CancelToken:
    __slots__ = ("_event", "reason")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def is_cancelled(self) -> bool:
        return self._event.is_set()
