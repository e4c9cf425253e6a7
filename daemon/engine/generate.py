"""Prefill and decode with stop rules: a generator of steps wrapped into a GenerationResult."""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import Cancelled
from .cancel import CancelToken
from .kv import KVCache
from .sampling import HealingPicker, greedy
from .tokenizer import Tokenizer

_FIRST_LINE = re.compile(r"\S[^\n]*\n")


class StopReason(str, enum.Enum):
    EOS = "eos"
    STOP_TEXT = "stop_text"
    MAX_TOKENS = "max_tokens"
    SINGLE_LINE = "single_line"
    CANCELLED = "cancelled"
    CONTEXT = "context"


@dataclass(frozen=True, kw_only=True, slots=True)
class StopRules:
    """When to stop: stop token ids, stop strings, max tokens, end of line."""

    stop_ids: frozenset[int] = frozenset()
    stop_texts: tuple[str, ...] = ()
    max_tokens: int = 64
    single_line: bool = False

    def scan(self, text: str) -> tuple[int, StopReason | None]:
        """Given all generated text so far: (how much of it may be shown, stop reason or None).

        Text that could still become a stop string is held back until it cannot.
        """
        cut, reason = len(text), None
        if self.single_line:
            # Stop at the first line break that follows visible text (a leading break is kept:
            # the suggestion then fills the next line).
            line = _FIRST_LINE.search(text)
            if line is not None:
                cut, reason = line.end() - 1, StopReason.SINGLE_LINE
        for stop in self.stop_texts:
            index = text.find(stop)
            if 0 <= index < cut:
                cut, reason = index, StopReason.STOP_TEXT
        if reason is None:
            cut = min(cut, len(text) - _partial_stop(text, self.stop_texts))
        return cut, reason


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


@dataclass(kw_only=True, slots=True)
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    stop_reason: StopReason = StopReason.MAX_TOKENS
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.token_ids) / (self.decode_ms / 1000) if self.decode_ms else 0.0


def prefill(
    model: torch.nn.Module,
    kv: KVCache,
    tokens: list[int],
    chunk: int,
    cancel: CancelToken | None = None,
) -> torch.Tensor:
    """Run `tokens` after what `kv` holds, in chunks; returns the last position's logits."""
    assert tokens, "prefill needs at least one token"
    logits = None
    ids = torch.tensor(tokens, dtype=torch.long)
    for start in range(0, len(tokens), chunk):
        if cancel is not None and cancel.is_cancelled:
            raise Cancelled(f"cancelled during prefill ({cancel.reason})")
        logits = model(ids[start : start + chunk], kv)
    return logits


def decode_steps(
    model: torch.nn.Module,
    kv: KVCache,
    logits: torch.Tensor,
    max_tokens: int,
    pick: Callable[[torch.Tensor, int], int] = lambda logits, step: greedy(logits),
) -> Iterator[int]:
    """Yield up to `max_tokens` tokens. A yielded token is fed to the model (and so enters `kv`)
    only when the consumer asks for the next one, so a stop costs no extra forward."""
    for step in range(max_tokens):
        token = pick(logits, step)
        yield token
        if step + 1 < max_tokens:
            if kv.length >= kv.max_len:
                return
            logits = model(torch.tensor([token], dtype=torch.long), kv)


def generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    kv: KVCache,
    prompt: list[int],
    rules: StopRules,
    *,
    chunk: int = 256,
    cancel: CancelToken | None = None,
    on_text: Callable[[str], None] | None = None,
    heal: bytes = b"",
    decode_threads: int = 0,
) -> GenerationResult:
    """Prefill what of `prompt` the cache lacks, then decode until a stop rule fires.

    `kv` must hold a prefix of `prompt` (the caller trims it); it ends holding the prompt plus
    the generated tokens that were fed back. `heal`: bytes removed from the prompt's end that
    the first generated tokens must spell again; they are not part of the result's text.
    `decode_threads`: CPU threads for the decode steps (0: as for prefill).
    """
    assert kv.length < len(prompt), "the cache must leave at least one prompt token to run"
    result = GenerationResult(cached_tokens=kv.length, prefilled_tokens=len(prompt) - kv.length)
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = prefill(model, kv, prompt[kv.length :], chunk, cancel)
        t1 = time.perf_counter()
        result.prefill_ms = (t1 - t0) * 1000
        threads = torch.get_num_threads()
        try:
            if decode_threads:
                torch.set_num_threads(decode_threads)
            _decode(model, tokenizer, kv, logits, rules, result, cancel, on_text, heal)
        finally:
            torch.set_num_threads(threads)
        result.decode_ms = (time.perf_counter() - t1) * 1000
    return result


def _decode(model, tokenizer, kv, logits, rules, result, cancel, on_text, heal) -> None:
    streamer = tokenizer.streamer(skip=heal)
    text, shown = "", 0
    pick = HealingPicker(tokenizer, heal) if heal else (lambda lg, step: greedy(lg))
    steps = decode_steps(model, kv, logits, rules.max_tokens, pick)
    result.stop_reason = StopReason.MAX_TOKENS
    for token in steps:
        if cancel is not None and cancel.is_cancelled:
            raise Cancelled(f"cancelled during decode ({cancel.reason})")
        if token in rules.stop_ids:
            result.stop_reason = StopReason.EOS
            break
        result.token_ids.append(token)
        text += streamer.push(token)
        cut, reason = rules.scan(text)
        if cut > shown and on_text is not None:
            on_text(text[shown:cut])
        shown = max(shown, cut)
        if reason is not None:
            result.stop_reason = reason
            text = text[:cut]
            break
    else:
        if len(result.token_ids) < rules.max_tokens:
            result.stop_reason = StopReason.CONTEXT
        text += streamer.flush()
    if result.stop_reason is StopReason.EOS:
        text += streamer.flush()
    cut_short = result.stop_reason in (StopReason.STOP_TEXT, StopReason.SINGLE_LINE)
    if not cut_short and on_text is not None and len(text) > shown:
        # Nothing more can complete a held-back partial stop string: show it all.
        on_text(text[shown:])
    result.text = text
