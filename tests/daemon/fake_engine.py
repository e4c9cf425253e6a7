"""A small stand-in for daemon.engine.engine.Engine with the same interface, for in-process tests.

Each "token" is one text piece derived from a hash of prefix and suffix, so /v1/complete and
/v1/completions agree for the same context. `step_s` makes generation slow enough to cancel.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from codelm.daemon.engine import EngineConfig
from codelm.daemon.engine.cancel import CancelToken
from codelm.daemon.errors import Cancelled, ModelLoadError
from codelm.daemon.protocol import (
    CompleteRequest,
    CompleteResponse,
    CompletionItem,
    OpenAICompletionRequest,
    Position,
    PromptResponse,
    Range,
    Timings,
    offset_at,
)

WARMUP_STEPS = 20  # a warm-up takes as long as this many tokens' generation, and shows none


@dataclass
class FakeEngine:
    config: EngineConfig
    step_s: float = 0.0
    load_s: float = 0.0
    calls: list[tuple[str, str]] = field(default_factory=list)  # (key, outcome)
    started: list[str] = field(default_factory=list)
    cached: set[str] = field(default_factory=set)
    running: threading.Event = field(default_factory=threading.Event)
    thread_ids: set[int] = field(default_factory=set)
    stale: int = 0  # tokens of approximate K/V; refresh() takes step_s for each

    @classmethod
    def load(
        cls,
        config: EngineConfig,
        progress: Callable[[float, str], None] | None = None,
        **kwargs: Any,
    ) -> FakeEngine:
        engine = cls(config=config, **kwargs)
        if config.model.endswith("missing.gguf"):
            raise ModelLoadError(f"{config.model} does not exist; pass a .gguf file or `default`")
        for i in range(4):
            if progress is not None:
                progress(i / 4, f"loading layer {i}")
            time.sleep(engine.load_s / 4)
        return engine

    @property
    def info(self) -> dict[str, Any]:
        return {
            "model": "fake",
            "path": self.config.model,
            "arch": "fake",
            "device": "cpu",
            "quant": "fp32",
            "quant_reason": "fake engine",
            "n_params": 0,
            "n_ctx": 2048,
            "load_s": self.load_s,
        }

    def complete(
        self,
        request: CompleteRequest,
        cancel: CancelToken,
        on_text: Callable[[str], None] | None = None,
    ) -> CompleteResponse:
        offset = offset_at(request.text, request.line, request.character)
        text, timings = self._generate(
            request.uri,
            request.text[:offset],
            request.text[offset:],
            request.max_tokens or WARMUP_STEPS,
            cancel,
            on_text,
        )
        self.cached.add(request.uri)
        if request.is_warmup:
            timings = Timings(prefilled_tokens=timings.prefilled_tokens)
            return CompleteResponse(items=[], timings=timings, stop_reason="max_tokens")
        here = Position(line=request.line, character=request.character)
        item = CompletionItem(text=text, range=Range(start=here, end=here))
        return CompleteResponse(items=[item], timings=timings, stop_reason="max_tokens")

    def complete_openai(
        self,
        request: OpenAICompletionRequest,
        cancel: CancelToken,
        on_text: Callable[[str], None] | None = None,
    ) -> CompleteResponse:
        text, timings = self._generate(
            "openai", request.prompt, request.suffix or "", request.max_tokens, cancel, on_text
        )
        here = Position(line=0, character=0)
        item = CompletionItem(text=text, range=Range(start=here, end=here))
        return CompleteResponse(items=[item], timings=timings, stop_reason="max_tokens")

    def show_prompt(self, request: CompleteRequest) -> PromptResponse:
        """The real engine's prompt layout (SPM) over characters, one id a character."""
        offset = offset_at(request.text, request.line, request.character)
        prompt = f"<suffix>{request.text[offset:]}<prefix>{request.text[:offset]}<middle>"
        return PromptResponse(prompt=prompt, token_ids=[ord(c) for c in prompt])

    def close_document(self, uri: str) -> bool:
        if uri in self.cached:
            self.cached.discard(uri)
            return True
        return False

    def cache_stats(self) -> dict[str, Any]:
        return {"entries": len(self.cached), "bytes": 1024 * len(self.cached)}

    def refresh_due(self) -> bool:
        return self.stale > 0

    def refresh(self, cancel: CancelToken) -> int:
        self.thread_ids.add(threading.get_ident())
        self.started.append("refresh")
        done = 0
        while self.stale and not cancel.is_cancelled:
            time.sleep(self.step_s)
            self.stale, done = self.stale - 1, done + 1
        self.calls.append(("refresh", f"{done}" + (f", {cancel.reason}" * cancel.is_cancelled)))
        return done

    def _generate(
        self,
        key: str,
        prefix: str,
        suffix: str,
        max_tokens: int,
        cancel: CancelToken,
        on_text: Callable[[str], None] | None,
    ) -> tuple[str, Timings]:
        self.thread_ids.add(threading.get_ident())
        self.started.append(key)
        self.running.set()
        seed = int(hashlib.sha256(f"{prefix}\0{suffix}".encode()).hexdigest()[:8], 16)
        pieces = []
        try:
            for i in range(max_tokens):
                if cancel.is_cancelled:
                    self.calls.append((key, f"cancelled:{cancel.reason}"))
                    raise Cancelled(f"the request was {cancel.reason}")
                time.sleep(self.step_s)
                piece = f"t{(seed + i) % 97} "
                pieces.append(piece)
                if on_text is not None:
                    on_text(piece)
        finally:
            self.running.clear()
        self.calls.append((key, "ok"))
        timings = Timings(prefilled_tokens=len(prefix) + len(suffix), generated_tokens=max_tokens)
        return "".join(pieces), timings


def make_loader(**kwargs: Any) -> Callable[..., FakeEngine]:
    """A loader for Scheduler(loader=...); the loaded engine is kept on `loader.engine`."""

    def loader(
        config: EngineConfig, progress: Callable[[float, str], None] | None = None
    ) -> FakeEngine:
        engine = FakeEngine.load(config, progress, **kwargs)
        loader.engine = engine  # type: ignore[attr-defined]
        return engine

    loader.engine = None  # type: ignore[attr-defined]
    return loader
