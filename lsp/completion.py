"""Inline completion: should-complete rules, adaptive debounce, per-URI supersede, the daemon
call, post-processing and the typing-through cache.

`Completer.inline_completion` is what the LSP handler awaits. A newer request for the same URI
cancels the older one's task (it answers an empty list); the debounce is an `await` inside
that task, so it is cancelled too. Rules and delays are plain functions, tested alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from statistics import median
from typing import TYPE_CHECKING

from lsprotocol import types

from codelm.daemon.errors import CodelmError, ModelLoading
from codelm.daemon.protocol import (
    SEND_MARGIN_CHARS,
    CompleteRequest,
    CompleteResponse,
    CompletionItem,
    Snippet,
    text_window,
)

from .cache import DocState, TypingCache
from .context import snippets
from .positions import offset_at, position_at, to_range
from .postprocess import (
    BLOCK_OPENER,
    LINE_REST_OK,
    Context,
    Suggestion,
    between_braces,
    postprocess,
)

if TYPE_CHECKING:
    from .daemon_link import DaemonLink
    from .documents import Document, DocumentStore, View
    from .settings import LspSettings

logger = logging.getLogger(__name__)

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, a surrogate is always alone

# A daemon answer slower than this puts the status at busy; it is waited for up to timeoutMs.
SLOW_S = 3.0
FAST_TYPING_MS = 250.0  # median gap between edits below this counts as typing fast
MAX_DEBOUNCE_FACTOR = 3.0
# A warm-up waits for the cursor to rest this long, and is not sent while the user types:
# their own completions keep the document's cache warm then.
WARMUP_DELAY_S = 0.3
WARMUP_RETRY_S = 1.0  # while the model loads
TYPING_S = 1.0


def skip_reason(line_before: str, line_after: str, is_invoked: bool) -> str | None:
    """Why not to suggest at this cursor (None: go ahead). Invoked requests always go."""
    if is_invoked:
        return None
    if line_after[:1].isalnum() or line_after[:1] == "_":
        if line_before[-1:].isalnum() or line_before[-1:] == "_":
            return "in the middle of a word"
        return "before a word"
    if not LINE_REST_OK.match(line_after) and not between_braces(line_before, line_after):
        return "text after the cursor on this line"
    return None


def is_single_line(line_before: str, line_after: str, mode: str) -> bool:
    """auto: one line mid-line or after a statement; several on a blank line, after `{`/`:`,
    and between braces the editor closed (`{|}`: the body goes on lines of its own)."""
    if mode != "auto":
        return mode == "always"
    if line_after.strip():
        return not between_braces(line_before, line_after)
    if not line_before.strip():
        return False
    return not BLOCK_OPENER.search(line_before)


def debounce_ms(
    edit_times: list[float], now: float, base_ms: float, line_before: str, is_invoked: bool
) -> float:
    """How long to wait before asking the daemon (edit times and now in seconds).

    While the user types fast, wait a bit longer than their usual gap between keys (a request
    sent mid-burst is wasted work); after a pause, or after `.`/`(`, answer sooner.
    """
    if is_invoked or base_ms <= 0:
        return 0.0
    delay = base_ms
    gaps_ms = [1000 * (b - a) for a, b in pairwise(edit_times[-6:]) if b - a < 1.0]
    if gaps_ms and median(gaps_ms) < FAST_TYPING_MS:
        delay = min(max(1.5 * median(gaps_ms), base_ms), MAX_DEBOUNCE_FACTOR * base_ms)
    if line_before.rstrip()[-1:] in (".", "(", ",", ":", "{") or not line_before.strip():
        delay /= 2
    since_edit_ms = 1000 * (now - edit_times[-1]) if edit_times else 0.0
    return max(0.0, delay - since_edit_ms)


@dataclass(frozen=True, slots=True)
class ResultItem:
    """One suggestion for the editor: `text` replaces `range` (LSP units)."""

    text: str
    range: types.Range
    request_id: str


@dataclass(slots=True)
class Stats:
    requests: int = 0
    cache_hits: int = 0
    daemon_calls: int = 0
    shown: int = 0
    skipped: int = 0
    superseded: int = 0
    timeouts: int = 0
    errors: int = 0
    accepted: int = 0
    dismissed: int = 0
    accepted_chars: int = 0
    warmups: int = 0

    def to_json(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


def suggestions_from_response(
    response: CompleteResponse, text: str, offset: int
) -> list[Suggestion]:
    """Daemon items as insertions at the cursor (`offset`), dropping ones that do not fit."""
    out: list[Suggestion] = []
    # Cut short by a limit, not ended by the model: its last line may be unfinished.
    truncated = response.stop_reason in ("max_tokens", "time_limit")
    for item in response.items:
        s = _as_insertion(item, text, offset, truncated)
        if s is not None and s not in out:
            out.append(s)
    return out


def _as_insertion(
    item: CompletionItem, text: str, offset: int, truncated: bool
) -> Suggestion | None:
    start = offset_at(text, item.range.start.line, item.range.start.character)
    end = offset_at(text, item.range.end.line, item.range.end.character)
    if not start <= offset <= end:
        logger.debug("dropping an item whose range %s does not hold the cursor", item.range)
        return None
    typed = text[start:offset]
    if not item.text.startswith(typed):
        logger.debug("dropping an item that does not start with the text before the cursor")
        return None
    return Suggestion(text=item.text[len(typed) :], replace_after=end - offset, truncated=truncated)


def _state(uri: str, text: str, start: int, offset: int) -> DocState:
    """The typing-through cache's key for the cursor at `offset` of `text`, whose window
    (protocol.text_window) starts at `start`: the same for a completion and for a warm-up.
    Of a large file only the text around the cursor is sent (all the daemon's prompt and the
    post-processing can use), and only that is hashed (a 20 MB file took 140 ms a request):
    from the window's start, which stays put while the user types, and as far after the
    cursor as the window reaches at least."""
    return DocState.of(uri, text[start:offset], text[offset : offset + SEND_MARGIN_CHARS])


def _shown(response: CompleteResponse, sent: str, at: int, ctx: Context) -> list[Suggestion]:
    """The daemon's items for the cursor at `at` of the text `sent`, as the editor shows them:
    insertions at the cursor, post-processed."""
    items = suggestions_from_response(response, sent, at)
    return [p for s in items if (p := postprocess(s, ctx)) is not None]


@dataclass(frozen=True, slots=True)
class _Warm:
    """A warm-up request, with what its answer is read against: the text sent and the
    cursor in it, the cursor's context, and the document state it was asked at."""

    request: CompleteRequest
    sent: str
    at: int
    ctx: Context
    state: DocState


@dataclass
class Completer:
    """Per-URI supersede, debounce, typing-through cache, daemon call and post-processing."""

    link: DaemonLink
    documents: DocumentStore
    settings: LspSettings
    cache: TypingCache = field(default_factory=TypingCache)
    stats: Stats = field(default_factory=Stats)
    clock: Callable[[], float] = time.monotonic
    _tasks: dict[str, asyncio.Task[list[ResultItem]]] = field(
        default_factory=dict, init=False, repr=False
    )
    _warming: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    # uri -> Document.changes when its newest request arrived (note_request)
    _asked_at: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    async def inline_completion(
        self, uri: str, position: types.Position, is_invoked: bool
    ) -> list[ResultItem]:
        """Suggestions at `position`; [] when superseded, skipped, slow or failed."""
        self.stats.requests += 1
        previous = self._tasks.pop(uri, None)
        if previous is not None and not previous.done():
            previous.cancel()
            self.stats.superseded += 1
        task = asyncio.create_task(self._complete(uri, position, is_invoked))
        self._tasks[uri] = task
        try:
            # wait() does not raise when `task` is cancelled by a newer request, only when
            # this request itself is cancelled ($/cancelRequest): then the task goes too.
            await asyncio.wait({task})
        finally:
            if not task.done():
                task.cancel()
            if self._tasks.get(uri) is task:
                del self._tasks[uri]
        if task.cancelled():
            return []
        if (exc := task.exception()) is not None:
            logger.error("inline completion failed", exc_info=exc)
            self.stats.errors += 1
            return []
        return task.result()

    def note_request(self, uri: str) -> None:
        """A request for `uri` has arrived. Its handler starts later, when a change sent after
        it may already be applied: its position would then be read in a newer text."""
        if (doc := self.documents.get(uri)) is not None:
            self._asked_at[uri] = doc.changes

    def warm(self, uri: str, position: types.Position) -> None:
        """The editor shows `uri` with the cursor at `position`: once it rests there, have the
        daemon prefill the prompt a completion there would run, so the first key typed finds
        it computed (a file not seen yet, or whose snippets changed, costs its whole prompt:
        seconds on a CPU). One at a time: a newer one replaces it."""
        if self._warming is not None:
            self._warming.cancel()
        if self.settings.warmup:
            self._warming = asyncio.create_task(self._warm(uri, position))

    async def _warm(self, uri: str, position: types.Position) -> None:
        await asyncio.sleep(WARMUP_DELAY_S)
        while (warm := self._warmup_request(uri, position)) is not None:
            settings = self.settings
            try:
                response = await asyncio.wait_for(
                    self.link.complete(warm.request), settings.timeout_ms / 1000
                )
            except ModelLoading:  # the editor opened a file as the model loads: once it is up
                await asyncio.sleep(WARMUP_RETRY_S)
                continue
            except (CodelmError, asyncio.TimeoutError) as exc:
                logger.debug("warm-up of uri#%s: %r", _uri_hash(uri), exc)
                return
            self.stats.warmups += 1
            t = response.timings
            logger.info(
                "warm-up uri#%s: cached %d prefilled %d tokens in %.0f ms, %d generated",
                _uri_hash(uri),
                t.cached_tokens,
                t.prefilled_tokens,
                t.prefill_ms,
                t.generated_tokens,
            )
            if settings is self.settings:  # (new settings cleared what the old ones shaped)
                self._keep_warm_suggestion(warm, response)
            return

    def _warmup_request(self, uri: str, position: types.Position) -> _Warm | None:
        """What the first key at `position` will ask, as a warm-up; None for a document not
        open or not enabled, or while the user types there (their completions warm it)."""
        doc = self.documents.get(uri)
        if doc is None or not self.settings.is_language_enabled(doc.language):
            return None
        if uri in self._tasks or (doc.edit_times and self.clock() - doc.edit_times[-1] < TYPING_S):
            return None
        view = self.documents.view(doc)
        offset = view.start + doc.offset_at(position, self.documents.encoding)
        ctx = _context(view.text, offset, doc.language, self.settings.single_line)
        start, end = text_window(view.text, offset)
        request, sent, at = self._request(doc, view, offset, (start, end), ctx, False)
        state = _state(uri, view.text, start, offset)
        return _Warm(dataclasses.replace(request, max_tokens=0), sent, at, ctx, state)

    def _keep_warm_suggestion(self, warm: _Warm, response: CompleteResponse) -> None:
        """The daemon decoded a suggestion where the cursor rests (docs/daemon.md). Kept as if
        shown there, a first key typed along it is answered at once from the typing-through
        cache, without the debounce or a daemon call. Only one that ended where a
        completion's would (not cut at the warm-up's few tokens), at a cursor where an
        automatic request would ask."""
        ctx = warm.ctx
        if response.stop_reason == "max_tokens" or skip_reason(
            ctx.line_before, ctx.line_after, False
        ):
            return
        suggestions = _shown(response, warm.sent, warm.at, ctx)
        self.cache.store(warm.state, suggestions, f"warm-{uuid.uuid4().hex[:8]}")

    def apply_settings(self, settings: LspSettings) -> None:
        """New settings; the suggestions kept for typing through were shaped by the old ones
        (singleLine, maxTokens, the model), so they go."""
        if settings != self.settings:
            self.cache.clear()
        self.settings = settings

    def cancel(self, uri: str) -> None:
        """Cancel the in-flight request for `uri` (the document closed)."""
        task = self._tasks.pop(uri, None)
        if task is not None:
            task.cancel()
        self.cache.forget(uri)
        self._asked_at.pop(uri, None)

    async def _complete(
        self, uri: str, position: types.Position, is_invoked: bool
    ) -> list[ResultItem]:
        doc = self.documents.get(uri)
        settings = self.settings
        if doc is None or not settings.is_language_enabled(doc.language):
            self.stats.skipped += 1
            return []
        seen = doc.changes
        if self._asked_at.get(uri, seen) != seen:
            logger.debug("the document changed after the request: nothing to suggest")
            self.stats.superseded += 1
            return []
        # In a notebook cell the model sees the whole notebook (`view`); `local` is the cursor
        # in the cell's own text, where the editor's positions are.
        local = doc.offset_at(position, self.documents.encoding)
        view = self.documents.view(doc)
        text, offset = view.text, view.start + local
        start, end = text_window(text, offset)
        state = _state(uri, text, start, offset)
        hit = self.cache.lookup(state)
        if hit is not None:
            self.stats.cache_hits += 1
            logger.debug(
                "typing-through hit: %d chars typed into %s", hit.typed_chars, hit.request_id
            )
            return self._results(hit.suggestions, doc.text, local, hit.request_id)
        ctx = _context(text, offset, doc.language, settings.single_line)
        if (reason := skip_reason(ctx.line_before, ctx.line_after, is_invoked)) is not None:
            logger.debug("no suggestion: %s", reason)
            self.stats.skipped += 1
            return []
        delay_ms = debounce_ms(
            doc.edit_times, self.clock(), settings.debounce_ms, ctx.line_before, is_invoked
        )
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        items = await self._ask_daemon(doc, view, local, (start, end), ctx, state, is_invoked)
        if doc.changes != seen:  # changed meanwhile: the ranges are the old text's
            logger.debug("the document changed while the daemon answered: not shown")
            self.stats.superseded += 1
            return []
        return items

    async def _ask_daemon(
        self,
        doc: Document,
        view: View,
        local: int,
        window: tuple[int, int],
        ctx: Context,
        state: DocState,
        is_invoked: bool,
    ) -> list[ResultItem]:
        settings = self.settings
        request, sent, at = self._request(doc, view, view.start + local, window, ctx, is_invoked)
        request_id = uuid.uuid4().hex[:12]
        self.stats.daemon_calls += 1
        started = self.clock()
        try:
            response = await self._answer(request, settings.timeout_ms / 1000)
        except asyncio.TimeoutError:
            logger.info("request %s: no answer within %d ms", request_id, settings.timeout_ms)
            self.stats.timeouts += 1
            return []
        except CodelmError as exc:
            logger.info("request %s: %s", request_id, exc.message)
            self.stats.errors += 1
            return []
        suggestions = _shown(response, sent, at, ctx)
        _log_completion(
            request_id, request, response, 1000 * (self.clock() - started), len(suggestions)
        )
        if self.settings is settings:  # (new settings cleared what the old ones shaped)
            self.cache.store(state, suggestions, request_id)
        return self._results(suggestions, doc.text, local, request_id)

    def _request(
        self,
        doc: Document,
        view: View,
        offset: int,
        window: tuple[int, int],
        ctx: Context,
        is_invoked: bool,
    ) -> tuple[CompleteRequest, str, int]:
        """The daemon request for the cursor at `offset` of the view, and the text it sends
        (`window` of the view's) with the cursor's offset in that."""
        start, end = window
        sent, at = view.text[start:end], offset - start
        request = build_request(
            view.uri,
            self.documents.path_of(view.uri),
            doc.language,
            sent,
            at,
            ctx,
            is_invoked,
            self.settings,
            snippets(self.documents, doc, self.settings.context_files),
        )
        return request, sent, at

    async def _answer(self, request: CompleteRequest, timeout_s: float) -> CompleteResponse:
        """The daemon's answer within `timeout_s` (else TimeoutError). One slower than
        SLOW_S is still waited for (the first request on a large file prefills all of it,
        seconds on a laptop's CPU, and an editor asks again only when the user types), and
        the status says the daemon is slow meanwhile."""
        call = asyncio.ensure_future(self.link.complete(request))
        try:
            done, _ = await asyncio.wait({call}, timeout=min(SLOW_S, timeout_s))
            if not done:
                self.link.note_slow()
                done, _ = await asyncio.wait({call}, timeout=max(0.0, timeout_s - SLOW_S))
            if not done:
                raise asyncio.TimeoutError
            return call.result()
        finally:
            call.cancel()  # (done: no effect) superseded, cancelled or too slow

    def _results(
        self, suggestions: list[Suggestion], text: str, offset: int, request_id: str
    ) -> list[ResultItem]:
        encoding = self.documents.encoding
        self.stats.shown += len(suggestions)
        return [
            ResultItem(
                s.text, to_range(text, offset, offset + s.replace_after, encoding), request_id
            )
            for s in suggestions
        ]


def build_request(
    uri: str,
    path: str | None,
    language: str | None,
    text: str,
    offset: int,
    ctx: Context,
    is_invoked: bool,
    settings: LspSettings,
    context: tuple[Snippet, ...] = (),
) -> CompleteRequest:
    """The daemon request for the cursor at str index `offset` of `text` (a snapshot of what
    the document at `uri`, the file the prompt calls `path`, holds there), after the other
    files' snippets `context`."""
    pos = position_at(text, offset)  # the daemon speaks UTF-16, whatever the editor does
    return CompleteRequest(
        uri=uri,
        # JSON cannot carry a lone surrogate to the daemon (it refuses the request); U+FFFD
        # keeps every position, one UTF-16 unit for one.
        text=_LONE_SURROGATE.sub("\ufffd", text),
        line=pos.line,
        character=pos.character,
        path=path,
        language=language,
        trigger="invoked" if is_invoked else "automatic",
        max_tokens=settings.max_tokens,
        single_line=ctx.is_single_line,
        context=context,
        max_time_ms=settings.max_time_ms or None,
    )


def _context(text: str, offset: int, language: str | None, single_line_mode: str) -> Context:
    ctx = Context(
        prefix=text[:offset], suffix=text[offset:], is_single_line=False, language=language
    )
    single = is_single_line(ctx.line_before, ctx.line_after, single_line_mode)
    return Context(prefix=ctx.prefix, suffix=ctx.suffix, is_single_line=single, language=language)


def _uri_hash(uri: str) -> str:
    """What the log calls a document: no file name in it."""
    return hashlib.blake2b(uri.encode(), digest_size=3).hexdigest()


def _log_completion(
    request_id: str,
    request: CompleteRequest,
    response: CompleteResponse,
    total_ms: float,
    n_items: int,
) -> None:
    t = response.timings
    logger.info(
        "request %s uri#%s %s: %d items, cached %d prefilled %d generated %d tokens, "
        "prefill %.0f ms, decode %.0f ms, total %.0f ms, stop %s",
        request_id,
        _uri_hash(request.uri),
        request.trigger,
        n_items,
        t.cached_tokens,
        t.prefilled_tokens,
        t.generated_tokens,
        t.prefill_ms,
        t.decode_ms,
        total_ms,
        response.stop_reason or "-",
    )
