"""Engine: one loaded model + tokenizer + per-file KV cache, answering completion requests.

All methods run on one thread (the scheduler's worker); nothing here is thread-safe.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from codelm.quant import native, physical_cores

from ..cache import FileCache, find_moved_run
from ..errors import BadRequest, Cancelled, DeviceUnavailable, ModelLoadError
from ..protocol import (
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
from ..stops import block_line, deadline_after
from . import EngineConfig
from .cancel import CancelToken
from .generate import GenerationResult, StopRules, generate, prefill, usable_draft
from .kv import KVCache
from .loader import LoadedModel, available_memory_bytes, load_model
from .prompt import (
    Prompt,
    build_prompt,
    detect_fim,
    document_name,
    raw_prompt,
    suffix_window_chars,
    trim_context,
    window_anchor,
)
from .threads import CpuShare

logger = logging.getLogger(__name__)

_NARROWINGS = 5  # builds of a prompt whose windows hold too many tokens for the context
_SUGGESTED_TAIL = 256  # characters before the cursor a document's last suggestion keeps
# Tokens a warm-up decodes where the cursor rests, for the first key to draft from: the
# suggestions keystrokes.py asks for, most of a line.
WARM_TOKENS = 16
# Tokens per forward of `refresh`: the request that stops it waits for the block under way
_REFRESH_CHUNK = 128
_REFRESH_PICKS = 64  # at most this many positions' picks made again (their logits: the head)


@dataclass(slots=True)
class _Lease:
    """A document's KV checked out for one request (Engine._lease)."""

    kv: KVCache
    known: dict[int, int]  # Entry.known
    tokens: list[int]  # checked back in: what kv holds the K/V of
    moved_ms: float = 0.0  # the edit before a moved run prefilled, the run moved
    gap: int = 0  # tokens of that edit
    stale_from: int | None = None  # Entry.stale_from


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, load_s: float) -> None:
        self.model: nn.Module = loaded.model
        self.tokenizer = loaded.tokenizer
        self.args = loaded.args
        self.config = config
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.cache_dtype = kv_cache_dtype(self.device, self.dtype, config.quant)
        self.fim = detect_fim(self.tokenizer, config.fim)
        self.stop_ids = frozenset(self.tokenizer.eos_ids) | self._fim_stop_ids()
        budget = config.cache_budget_bytes or default_cache_budget(self.device)
        self.cache = FileCache(budget_bytes=budget, new_kv=self.new_kv)
        self.cpu: CpuShare | None = None  # threads per request, where the config sets none
        self.anchors: dict[str, str] = {}  # uri -> the text its prefix window starts with
        # uri -> (the length of the text before the cursor, its last _SUGGESTED_TAIL
        # characters, the suggestion made there): the whole text per document grew without
        # bound for clients that never close their documents
        self.suggestions: dict[str, tuple[int, str, str]] = {}
        self.info: dict[str, Any] = {
            **loaded.info,
            "fim": self.fim.name if self.fim else "none (prefix-only)",
            "load_s": round(load_s, 3),
            "cache_budget_bytes": budget,
            "kv_cache": str(self.cache_dtype).removeprefix("torch."),
        }

    @classmethod
    def load(cls, config: EngineConfig, progress=None) -> Engine:
        t0 = time.perf_counter()
        device = resolve_device(config.device)
        if device.type == "cpu":
            torch.set_num_threads(config.threads or physical_cores())
        loaded = load_model(config, device, progress)
        engine = cls(loaded, config, time.perf_counter() - t0)
        if device.type == "cpu" and not config.threads:
            engine.cpu = CpuShare(torch.get_num_threads())
        engine.info["threads"] = (
            f"up to {torch.get_num_threads()}, fewer while other processes keep cores busy"
            if engine.cpu
            else torch.get_num_threads()
        )
        logger.info("engine ready: %s", engine.info)
        return engine

    @contextlib.contextmanager
    def threads(self) -> Iterator[int]:
        """Runs the block with the CPU threads this request gets (CpuShare); yields them."""
        before = torch.get_num_threads()
        threads = self.cpu.threads() if self.cpu else before
        torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            torch.set_num_threads(before)

    def _fim_stop_ids(self) -> frozenset[int]:
        texts = self.fim.stop if self.fim else ()
        ids = (self.tokenizer.token_id(t) for t in texts)
        return frozenset(i for i in ids if i is not None)

    def new_kv(self) -> KVCache:
        a = self.args
        return KVCache(
            a.n_layers,
            a.n_kv_heads,
            a.head_dim,
            dtype=self.dtype,
            device=self.device,
            max_len=a.max_len,
            cache_dtype=self.cache_dtype,
        )

    def prompt(self, request: CompleteRequest) -> Prompt:
        """The prompt a completion at this point would run (its text: `prompt_text`); the
        document's window anchor stays as it was."""
        cursor = offset_at(request.text, request.line, request.character)
        return self._build(request, cursor, remember=False)

    def show_prompt(self, request: CompleteRequest) -> PromptResponse:
        """prompt() as `codelm-daemon prompt` and `POST /v1/prompt` show it."""
        prompt = self.prompt(request)
        healed = prompt.heal.decode("utf-8", errors="replace")
        return PromptResponse(
            prompt=self.prompt_text(prompt), token_ids=list(prompt.token_ids), healed=healed
        )

    def prompt_text(self, prompt: Prompt) -> str:
        return self.tokenizer.decode(prompt.token_ids)

    def suffix_chars(self, trigger: str) -> int:
        return suffix_window_chars(self.config.suffix_chars, trigger)

    def _build(self, request: CompleteRequest, cursor: int, *, remember: bool = True) -> Prompt:
        """`cursor`: the request's position as an offset into its text. The windows are
        measured in characters; where the text takes several tokens a character (emoji, CJK)
        and the model's context is short, they narrow until the prompt leaves room for
        max_tokens. `remember`: the prefix window's start becomes the document's anchor."""
        room = self.args.max_len - request.max_tokens
        prefix_chars, suffix_chars = self.config.prefix_chars, self.suffix_chars(request.trigger)
        anchor = self.anchors.get(request.uri)
        context = trim_context(request.context, self.config.context_chars)
        for _ in range(_NARROWINGS):
            prompt = build_prompt(
                self.tokenizer,
                self.fim,
                request.text,
                cursor,
                path=document_name(request.uri, request.path, request.language),
                prefix_chars=prefix_chars,
                suffix_chars=suffix_chars,
                anchor=anchor,
                context=context,
            )
            if len(prompt.token_ids) <= room:
                break
            if context:  # other files go before any of this one's text does
                context = ()
                continue
            # Narrow what the windows hold, not the settings (a short document's windows do
            # not reach them), and from a fresh start: the anchor's leeway would keep it.
            scale = 0.9 * room / len(prompt.token_ids)
            held_suffix = min(suffix_chars, len(request.text) - cursor)
            prefix_chars = int((cursor - prompt.prefix_start) * scale)
            suffix_chars = int(held_suffix * scale)
            anchor = None
        if remember:
            self.anchors[request.uri] = window_anchor(request.text, prompt.prefix_start)
        return prompt

    def complete(
        self, request: CompleteRequest, cancel: CancelToken | None = None, on_text=None
    ) -> CompleteResponse:
        cursor = offset_at(request.text, request.line, request.character)
        prompt = self._build(request, cursor)
        if request.is_warmup:  # answered with what it decoded: a client may keep it too
            return _answer(request, self._warm(request, cursor, prompt, cancel))
        rules = self._rules(request, cursor, request.max_tokens)
        before = request.text[:cursor]
        draft = self._draft(request.uri, before, prompt.heal)
        result = self._run(
            request.uri, prompt.token_ids, rules, cancel, on_text, prompt.heal, draft
        )
        if on_text is None and _repeats_next_line(request.text, cursor, result.text):
            # On a blank line the model may skip it and write the line below again, which the
            # editor would drop: ask once more with that line's first token ruled out
            # (docs/engine.md, "A suggestion that repeats the next line").
            pieces = [self.tokenizer.pieces[t] for t in result.token_ids]
            step = next((i for i, piece in enumerate(pieces) if piece.strip()), None)
            if step is not None:
                ban = (step, result.token_ids[step])
                result = self._run(
                    request.uri, prompt.token_ids, rules, cancel, None, prompt.heal, ban=ban
                )
        self._remember(request, cursor, result)
        return _answer(request, result)

    def complete_openai(
        self, request: OpenAICompletionRequest, cancel: CancelToken | None = None, on_text=None
    ) -> CompleteResponse:
        """A raw prompt continued (or filled, with a suffix and a FIM model), token-healed.

        Without a suffix, special-token texts in the prompt are those tokens (a client's own FIM
        template, as llama.cpp's server reads it); with one, the text is literal."""
        text = request.prompt + (request.suffix or "")
        if request.suffix is None and self.tokenizer.has_special_text(text):
            prompt = raw_prompt(self.tokenizer, text)
        else:
            prompt = build_prompt(
                self.tokenizer,
                self.fim if request.suffix is not None else None,
                text,
                len(request.prompt),
                path=None,
                prefix_chars=len(text) + 1,
                suffix_chars=len(text) + 1,
            )
        if not prompt.token_ids and not prompt.heal:
            raise BadRequest("prompt", "must not be empty")
        rules = StopRules(
            stop_ids=self.stop_ids, stop_texts=request.stop, max_tokens=request.max_tokens
        )
        result = self._run(None, prompt.token_ids, rules, cancel, on_text, prompt.heal)
        origin = Position(line=0, character=0)
        item = CompletionItem(text=result.text, range=Range(start=origin, end=origin))
        return _response([item], result)

    def _rules(self, request: CompleteRequest, cursor: int, max_tokens: int) -> StopRules:
        single_line = request.single_line if request.single_line is not None else False
        return StopRules(
            stop_ids=self.stop_ids,
            stop_texts=request.stop,
            max_tokens=max_tokens,
            single_line=single_line,
            block_line=None if single_line else block_line(request.text, cursor),
            deadline=deadline_after(request.max_time_ms),
        )

    def _remember(self, request: CompleteRequest, cursor: int, result: GenerationResult) -> None:
        """Keep the suggestion made at `cursor` as the document's draft for the next keys.
        It goes on past the stop: verifying the tokens that made it stop costs a row each in
        the same forward, decoding them a step each."""
        before = request.text[:cursor][-_SUGGESTED_TAIL:]
        self.suggestions[request.uri] = (cursor, before, result.text + result.past_stop)
        self._forget_evicted()

    def _draft(self, uri: str, before: str, heal: bytes) -> list[int]:
        """The document's last suggestion less what was typed since, as tokens to verify.

        Typing along a suggestion then costs one forward for the whole suggestion instead of a
        decode step per token; a draft that is wrong costs its few extra rows in that forward.
        """
        last = self.suggestions.get(uri)
        if last is None:
            return []
        at, tail, suggested = last
        # The text before the old cursor ends as it did (a wrong guess costs rows, not words).
        if len(before) < at or before[at - len(tail) : at] != tail:
            return []
        typed = before[at:]
        if not suggested.startswith(typed) or len(typed) >= len(suggested):
            return []
        try:
            healed = heal.decode("utf-8")
        except UnicodeDecodeError:
            return []
        return self.tokenizer.encode(healed + suggested[len(typed) :])

    def _forget_evicted(self) -> None:
        """Drop the window anchors and suggestions of documents whose KV cache was evicted:
        without the KV they save little, and a client that never closes documents would
        otherwise grow them forever."""
        for kept in (self.anchors, self.suggestions):
            for uri in kept.keys() - self.cache.entries.keys():
                del kept[uri]

    def _run(
        self,
        uri,
        ids,
        rules,
        cancel,
        on_text,
        heal: bytes = b"",
        draft: list[int] = (),
        ban: tuple[int, int] | None = None,
        *,
        completion: bool = True,
    ) -> GenerationResult:
        if len(ids) + rules.max_tokens > self.args.max_len:
            raise BadRequest(
                "text" if uri else "prompt",  # a document's, or /v1/completions' own
                f"the prompt ({len(ids)} tokens) and max_tokens do not fit the model's "
                f"context of {self.args.max_len} tokens",
            )
        # Cut as generate() will, so the cache is looked up with the tokens that will run.
        draft = usable_draft(draft, len(ids), rules.max_tokens, self.args.max_len)
        with self._lease(uri, ids, cancel, draft, completion=completion) as lease:
            result = generate(
                self.model,
                self.tokenizer,
                lease.kv,
                ids,
                rules,
                chunk=self.config.prefill_chunk,
                cancel=cancel,
                on_text=on_text,
                heal=heal,
                draft=draft,
                known=lease.known,
                ban=ban,
            )
            # The generated tokens whose K/V kv holds are cached with the prompt's.
            lease.tokens = ids + result.token_ids[: max(0, lease.kv.length - len(ids))]
        self.cache.stats.drafted_tokens += result.drafted_tokens
        self.cache.stats.accepted_tokens += result.accepted_tokens
        # The edited tokens before the moved run were prefilled too.
        result.prefill_ms += lease.moved_ms
        result.cached_tokens -= lease.gap
        result.prefilled_tokens += lease.gap
        return result

    def _warm(
        self, request: CompleteRequest, cursor: int, prompt: Prompt, cancel: CancelToken | None
    ) -> GenerationResult:
        """Run the prompt into the document's cache and decode a short suggestion there
        (WARM_TOKENS), showing nothing: the first key typed here finds the prompt computed
        and, where it types what the suggestion begins with, the rest of it a draft whose
        picks are kept ("The last suggestion is a draft to verify"), instead of the decode
        steps a new suggestion costs (~14 ms a token for the default model on 2 cores).
        A cancel keeps the chunks done."""
        ids = prompt.token_ids
        if len(ids) >= self.args.max_len:
            raise BadRequest("text", f"the prompt ({len(ids)} tokens) does not fit the model")
        tokens = min(WARM_TOKENS, self.args.max_len - len(ids))
        rules = self._rules(request, cursor, tokens)
        draft = self._draft(request.uri, request.text[:cursor], prompt.heal)  # (rested again)
        result = self._run(
            request.uri, ids, rules, cancel, None, prompt.heal, draft, completion=False
        )
        self._remember(request, cursor, result)
        return result

    @contextlib.contextmanager
    def _lease(
        self,
        uri: str | None,
        ids: list[int],
        cancel: CancelToken | None,
        draft: Sequence[int] = (),
        *,
        completion: bool = True,
    ) -> Iterator[_Lease]:
        """The document's KV, holding its cached prefix of `ids` (then `draft`) and, after an
        edit, the cached run moved past it; run with this request's threads. Checked back in
        with what it holds of `lease.tokens` (`ids` unless the caller extends it), whatever
        happened: what was computed stays for the next keystroke, also on a cancel.
        `completion`: False for a warm-up, whose approximate K/V wait for a completion before
        they are refreshed."""
        kv, reused, old, known, stale = self.cache.checkout(uri, [*ids, *draft], n_prompt=len(ids))
        lease = _Lease(kv, known, ids, stale_from=stale)
        try:
            with self.threads():
                lease.moved_ms, lease.gap, moved_to = self._reuse_moved_run(
                    kv, old, ids, reused, cancel
                )
                if lease.stale_from is None:
                    lease.stale_from = moved_to
                yield lease
        finally:
            kv.trim_to(min(kv.length, len(lease.tokens)))
            # A prompt without a document is filed under its opening tokens, so a client that
            # resends a growing prompt replaces its own entry instead of adding one each time.
            key = uri or f"prompt:{hash(tuple(ids[:64]))}"
            self.cache.checkin(key, lease.tokens, kv, known, lease.stale_from, completion)

    def _reuse_moved_run(self, kv: KVCache, old: list[int], ids: list[int], reused: int, cancel):
        """Position-shifted reuse after an edit (EngineConfig.cache_reuse_min_tokens): prefill
        the edited tokens, then move the cached run that follows them to its new positions.
        Returns (milliseconds spent, tokens prefilled, where the moved run starts: None when
        none moved); kv ends holding ids[:end of the run]. The run's K/V, and all computed
        after it, are approximate (stale) until `refresh` computes them again."""
        min_run = self.config.cache_reuse_min_tokens
        if not min_run or len(ids) - 1 - reused < min_run:
            return 0.0, 0, None
        found = find_moved_run(old, ids[: len(ids) - 1], reused, min_run)
        if found is None:
            return 0.0, 0, None
        t0 = time.perf_counter()
        new_at, old_at, n = found
        keys = kv.k[:, :, old_at : old_at + n].clone()
        values = kv.v[:, :, old_at : old_at + n].clone()
        with torch.inference_mode():
            if new_at > reused:
                prefill(self.model, kv, ids[reused:new_at], self.config.prefill_chunk, cancel)
            kv.reserve(new_at + n)
            kv.k[:, :, new_at : new_at + n] = self.model.rotary.shift(keys, new_at - old_at)
            kv.v[:, :, new_at : new_at + n] = values
        kv.length = new_at + n
        self.cache.stats.shifted_tokens += n
        self.cache.stats.prefilled_tokens -= n
        return (time.perf_counter() - t0) * 1000, new_at - reused, new_at

    def refresh_due(self) -> bool:
        """Whether `refresh` has work: approximate K/V where a completion ran."""
        return self.cache.to_refresh() is not None

    def refresh(self, cancel: CancelToken | None = None) -> int:
        """Compute again the approximate K/V (a moved run, and what followed it) of the most
        recently used document that has any where the last request was a completion (not a
        warm-up: Entry.refresh), as a fresh prefill would: the scheduler runs it while idle,
        so the suggestions after an edit's first one are what a fresh prompt gets.
        The greedy picks kept for the last suggestion's positions (Entry.known: typing along
        it then runs no decode step) are made again from the new logits. A cancel (the next
        request) keeps the chunks done. Returns the tokens computed."""
        found = self.cache.to_refresh()
        if found is None:
            return 0
        uri, entry = found
        kv, start, end = entry.kv, entry.stale_from, len(entry.tokens)
        picked = [p for p in entry.known if p >= start]
        n_logits = min(end - min(picked), _REFRESH_PICKS) if picked else 1
        logits = None
        kv.trim_to(start)
        try:
            with self.threads(), torch.inference_mode():
                logits = prefill(
                    self.model, kv, entry.tokens[start:], _REFRESH_CHUNK, cancel, n_logits
                )
        except Cancelled:
            pass
        except Exception:
            self.close_document(uri)  # not left stale to be tried again and again
            raise
        finally:
            # A chunk's forward writes only its own positions: those after it hold their
            # approximate K/V still, and the picks made from them stay.
            done, kv.length = kv.length, end
            entry.stale_from = done if done < end else None
            entry.known = {p: t for p, t in entry.known.items() if p < start or p >= done}
            self.cache.stats.refreshed_tokens += done - start
        if logits is not None and picked:
            picks = logits.argmax(dim=-1).tolist()
            entry.known.update(zip(range(end - n_logits, end), picks, strict=True))
        return done - start

    def close_document(self, uri: str) -> bool:
        self.anchors.pop(uri, None)
        self.suggestions.pop(uri, None)
        return self.cache.close(uri)

    def cache_stats(self) -> dict[str, Any]:
        return self.cache.to_json()


def _repeats_next_line(text: str, cursor: int, suggestion: str) -> bool:
    """Whether `suggestion`, at a cursor with nothing but indentation on its line, opens with
    the document's next non-blank line (more than one character): inserted, that line would
    be there twice."""
    start = text.rfind("\n", 0, cursor) + 1
    end = text.find("\n", cursor)
    end = len(text) if end < 0 else end
    if text[start:end].strip():
        return False
    first = next((line.strip() for line in suggestion.split("\n") if line.strip()), "")
    below = text[end + 1 : end + 1 + 20_000].split("\n")
    return len(first) > 1 and first == next((line.strip() for line in below if line.strip()), "")


def _answer(request: CompleteRequest, result: GenerationResult) -> CompleteResponse:
    """The suggestion as an insertion at the request's position."""
    at = Position(line=request.line, character=request.character)
    return _response([CompletionItem(text=result.text, range=Range(start=at, end=at))], result)


def _response(items: list[CompletionItem], result: GenerationResult) -> CompleteResponse:
    timings = Timings(
        cached_tokens=result.cached_tokens,
        prefilled_tokens=result.prefilled_tokens,
        generated_tokens=len(result.token_ids),
        prefill_ms=result.prefill_ms,
        decode_ms=result.decode_ms,
    )
    return CompleteResponse(
        items=items,
        timings=timings,
        stop_reason=result.stop_reason.value,
        token_ids=result.token_ids,
    )


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            "device cuda was asked for (--device, CODELM_DEVICE or `device` in config.toml), "
            "but no CUDA GPU is available; use auto or cpu"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ModelLoadError(f"unknown device {name!r} (auto, cpu, cuda)")
    return torch.device(name)


def kv_cache_dtype(device: torch.device, dtype: torch.dtype, quant: str) -> torch.dtype:
    """What keys and values are stored in: float16 for a float32 model with quantised weights
    on the CPU where the native attention reads it (half the bytes a decode step reads from the
    cache and half the memory a cached file holds; llama.cpp keeps fp16 K/V too). `--quant
    fp32` keeps the reference float32 throughout; other devices and dtypes keep theirs."""
    if device.type != "cpu" or dtype != torch.float32 or quant == "fp32":
        return dtype
    return torch.float16 if not isinstance(native.library(), str) else dtype


def default_cache_budget(device: torch.device) -> int:
    """A quarter of the memory the cache will live in that is available now (the weights
    loaded: the GPU's free memory, or the host's), between 256 MiB and 4 GiB."""
    if device.type == "cuda":
        available: int | None = torch.cuda.mem_get_info(device)[0]
    else:
        available = available_memory_bytes()
    if available is None:
        available = 4 << 30
    return int(min(4 << 30, max(256 << 20, available // 4)))
