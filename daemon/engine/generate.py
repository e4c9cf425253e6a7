"""Prefill and decode with stop rules: a generator of steps wrapped into a GenerationResult."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..cache import common_prefix
from ..errors import Cancelled
from ..stops import ShownText, StopReason, StopRules
from .cancel import CancelToken
from .kv import KVCache
from .sampling import Banning, Greedy, HealingPicker, Picker, greedy
from .tokenizer import Tokenizer


@dataclass(kw_only=True, slots=True)
class GenerationResult:
    text: str = ""
    past_stop: str = ""  # decoded after where the stop rules cut `text` (ShownText.past_stop)
    token_ids: list[int] = field(default_factory=list)
    stop_reason: StopReason = StopReason.MAX_TOKENS
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    drafted_tokens: int = 0
    accepted_tokens: int = 0  # draft tokens generated as guessed

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.token_ids) / (self.decode_ms / 1000) if self.decode_ms else 0.0


def prefill(
    model: torch.nn.Module,
    kv: KVCache,
    tokens: list[int],
    chunk: int,
    cancel: CancelToken | None = None,
    n_logits: int = 1,
) -> torch.Tensor:
    """Run `tokens` after what `kv` holds, in chunks; returns the logits of the last `n_logits`
    positions ([n_logits, vocab]), which all run in the final chunk (it grows to hold them).
    `cancel` stops it between blocks of a chunk (Decoder.forward), with `kv` holding the
    chunks done before."""
    assert tokens, "prefill needs at least one token"
    logits = None
    ids = torch.tensor(tokens, dtype=torch.long)
    starts = list(range(0, len(tokens), chunk))
    while len(starts) > 1 and starts[-1] > len(tokens) - n_logits:
        starts.pop()  # the final chunk grows to hold every position whose logits are wanted
    for start, end in zip(starts, [*starts[1:], len(tokens)], strict=True):
        n_rows = n_logits if end == len(tokens) else 1
        logits = model(ids[start:end], kv, n_logits=n_rows, cancel=cancel)
    return logits


def decode_steps(
    model: torch.nn.Module,
    kv: KVCache,
    sequence: list[int],
    rows: dict[int, torch.Tensor],
    max_tokens: int,
    pick: Picker | None = None,
    n_draft: int = 0,
    known: dict[int, int] | None = None,
) -> Iterator[int]:
    """Yield up to `max_tokens` tokens after `sequence` (the prompt and `n_draft` draft tokens,
    all in `kv`). A yielded token is fed to the model (and so enters `kv`) only when the
    consumer asks for the next one, so a stop costs no extra forward.

    The token after position p comes from `rows[p]` (logits [1, vocab] of that position), else
    from `known[p]` (the greedy pick a forward over the same tokens made before) when the picker
    can use it, else from a forward of token p. Draft tokens the model picks itself are yielded
    without a forward; the first it does not pick ends the draft (its K/V is dropped). Picks
    made from logits are added to `known`. Close the generator (contextlib.closing) so `kv` is
    trimmed to what was yielded when the consumer stops early.
    """
    pick = pick or Greedy()
    known = {} if known is None else known
    n_prompt = len(sequence) - n_draft
    tokens = sequence[:n_prompt]  # the prompt and what was yielded
    ahead = sequence[n_prompt:]  # draft tokens in kv after `tokens`
    step = 0

    def forward(token: int) -> torch.Tensor:  # one token's logits, as far as this pick reads
        return model(torch.tensor([token], dtype=torch.long), kv, top_two=pick.top_two(step))

    try:
        while True:
            at = len(tokens) - 1
            row = rows.get(at)
            token = pick.known(known[at], step) if row is None and at in known else None
            if token is None:
                if row is None:
                    # Nothing kept for this position: run its token again. That rewrites its
                    # own K/V only; what kv holds after it stays.
                    held = kv.length
                    kv.trim_to(at)
                    row = forward(tokens[at])
                    kv.length = held
                known[at] = greedy(row)
                token = pick(row, step)
            step += 1
            yield token
            if step >= max_tokens:
                return
            tokens.append(token)
            if ahead and ahead[0] == token:
                ahead.pop(0)  # its K/V is in kv, and rows/known may hold what follows it
                continue
            # Off the draft: what kv and `known` hold past here belongs to another sequence.
            kv.trim_to(len(tokens) - 1)
            ahead = []
            for stale in [p for p in known if p >= len(tokens) - 1]:
                del known[stale]
            if kv.length >= kv.max_len:
                return
            rows = {len(tokens) - 1: forward(token)}
    finally:
        # The last yielded token is never in kv; everything yielded before it is.
        kv.trim_to(min(kv.length, n_prompt + max(step - 1, 0)))


def generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    kv: KVCache,
    prompt: list[int],
    rules: StopRules,
    *,
    chunk: int = 512,
    cancel: CancelToken | None = None,
    on_text: Callable[[str], None] | None = None,
    heal: bytes = b"",
    draft: Sequence[int] = (),
    known: dict[int, int] | None = None,
    ban: tuple[int, int] | None = None,
) -> GenerationResult:
    """Prefill what of `prompt` (and `draft`) the cache lacks, then decode until a stop rule
    fires.

    `kv` must hold a prefix of `prompt + draft` shorter than it (the caller trims it); it ends
    holding the prompt plus the generated tokens that were fed back.
    `heal`: bytes removed from the prompt's end that the first generated tokens must spell
    again; they are not part of the result's text.
    `draft`: a guess at the first generated tokens (e.g. the document's last suggestion, less
    what the user has typed since), run with the prompt's tail in one forward; what the model
    confirms costs no decode step. The result is the same as without it.
    `known`: position -> the greedy pick a forward made there before, valid for the tokens `kv`
    holds (FileCache keeps them with the K/V); this run's picks are added to it.
    `ban`: (step, token): that token is not picked at that step of the generation.
    """
    draft = usable_draft(draft, len(prompt), rules.max_tokens, kv.max_len)
    sequence = prompt + draft
    assert kv.length < len(sequence), "the cache must leave at least one token to run"
    cached = min(kv.length, len(prompt))
    result = GenerationResult(cached_tokens=cached, prefilled_tokens=len(prompt) - cached)
    with torch.inference_mode():
        t0 = time.perf_counter()
        tail = sequence[kv.length :]
        n_rows = min(len(tail), len(draft) + 1)  # the rows that pick or check a token
        logits = prefill(model, kv, tail, chunk, cancel, n_logits=n_rows)
        first = len(sequence) - n_rows
        rows = {first + i: logits[i : i + 1] for i in range(n_rows)}
        if logits.is_cuda:  # prefill_ms is the GPU's work, not only its launch
            torch.cuda.synchronize(logits.device)
        t1 = time.perf_counter()
        result.prefill_ms = (t1 - t0) * 1000
        pick = HealingPicker(tokenizer, heal) if heal else Greedy()
        if ban is not None:
            pick = Banning(pick, *ban)
        steps = decode_steps(model, kv, sequence, rows, rules.max_tokens, pick, len(draft), known)
        with contextlib.closing(steps):
            _decode(steps, tokenizer, rules, result, cancel, on_text, heal)
        result.decode_ms = (time.perf_counter() - t1) * 1000
    result.drafted_tokens = len(draft)
    result.accepted_tokens = common_prefix(result.token_ids, draft)
    return result


def usable_draft(draft: Sequence[int], n_prompt: int, max_tokens: int, max_len: int) -> list[int]:
    """The part of `draft` a generation can check: max_tokens - 1 tokens (the last pick needs
    no draft token), within the context after a prompt of n_prompt tokens."""
    return list(draft[: min(max_tokens - 1, max_len - n_prompt)])


def _decode(steps, tokenizer, rules, result, cancel, on_text, heal) -> None:
    streamer = tokenizer.streamer(skip=heal)
    shown = ShownText(rules, on_text)
    result.stop_reason = StopReason.MAX_TOKENS
    for token in steps:
        if cancel is not None and cancel.is_cancelled:
            raise Cancelled(f"cancelled during decode ({cancel.reason})")
        if token in rules.stop_ids:
            result.stop_reason = StopReason.EOS
            break
        result.token_ids.append(token)
        reason = shown.add(streamer.push(token))
        if reason is not None:
            result.stop_reason = reason
            break
    else:
        if len(result.token_ids) < rules.max_tokens:
            result.stop_reason = StopReason.CONTEXT
    result.text = shown.finish(result.stop_reason, streamer.flush())
    result.past_stop = shown.past_stop
