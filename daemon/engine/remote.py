"""An engine that asks an inference server for its completions: llama.cpp's llama-server,
vLLM, TGI, Ollama or another codelm, through their OpenAI-compatible `/v1/completions`. For
a user whose model is too large for this machine, or who already runs such a server.

What makes suggestions good and cheap stays on this side: the prompt windows (the prefix
window anchored per document, so that the server's own prompt cache matches all but the last
keystrokes), the model's FIM layout, and the stop rules (single line, stop strings). The
server owns the tokens and the K/V: healing is done on text (the word at the cursor leaves
the prompt and the answer must retype it), and there are no drafts and no per-file cache.
No torch either: the daemon stays small (docs/daemon.md, "An inference server as the model").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from ..errors import BadRequest, Cancelled, ModelLoadError, ServerError
from ..protocol import (
    CompleteRequest,
    CompleteResponse,
    CompletionItem,
    OpenAICompletionRequest,
    Position,
    PromptResponse,
    Range,
    Snippet,
    Timings,
    offset_at,
)
from ..stops import ShownText, StopReason, StopRules, block_line, deadline_after
from . import EngineConfig
from .cancel import CancelToken
from .prompt import (
    FIM_FORMATS,
    FIM_SETTINGS,
    SERVER_FIM,
    FimFormat,
    aixcoder_header,
    comment_header,
    document_name,
    file_line,
    snippet_file,
    suffix_window,
    suffix_window_chars,
    trim_context,
    window_anchor,
    window_start,
)

logger = logging.getLogger(__name__)

CONNECT_S = 5.0  # the server must accept the connection within this
READ_S = 60.0  # and send each next piece of an answer within this (a cold prompt may be long)
LIST_S = 10.0  # the whole answer to GET /v1/models, at load
_SERVER_STOPS = 4  # stop strings sent at most (TGI's default --max-stop-sequences)
_CANCEL_POLL_S = 0.02  # how often a running request looks at its cancel token
_ANCHORED_DOCUMENTS = 512  # window anchors kept, most recently used first
_NARROWINGS = 4  # halvings of the windows a prompt too long for the server's context gets
# The end of the text before the cursor that the answer is to start by retyping: the word
# being typed and the spaces or tabs before it (in the tokens a model was trained on, a
# word's space and the word are one: " return"). Looked for in the last few characters.
# A longer word, or one in another script (\w would take a whole CJK sentence), stays.
_HEALED = re.compile(r"[ \t]*(?<![A-Za-z0-9_])[A-Za-z0-9_]{0,24}\Z")
_HEAL_TAIL_CHARS = 256
# Special-token text in a document, which servers would read as those tokens (an
# `<|endoftext|>` in a string ended every suggestion): a zero-width space after its `<` keeps
# it text. `<|...|>` (Qwen, GPT), `<｜...｜>` (DeepSeek), StarCoder's and llama's.
_SPECIAL_TEXT = re.compile(
    r"<(?=[|｜])|<(?=(?:fim_\w+|file_sep|filename|repo_name|reponame|gh_stars|issue_\w+"
    r"|jupyter_\w+|empty_output|commit_\w+|/?s|unk|PRE|SUF|MID|EOT)>)"
)

# Name fragments of models whose FIM format `fim = "auto"` picks, checked in this order.
_FIM_BY_NAME = (
    (("qwen", "coder"), "qwen"),
    (("deepseek", "coder"), "deepseek"),
    (("codellama",), "codellama"),
    (("code-llama",), "codellama"),
    (("starcoder",), "starcoder"),
    (("codeshell",), "starcoder"),
    (("aixcoder",), "aixcoder"),
)


def server_base(model: str) -> str:
    """`http://host:port`, `http://host:port/` or `http://host:port/v1` as the base that
    `/v1/...` paths follow."""
    return model.rstrip("/").removesuffix("/v1")


def guess_fim(setting: str, model_name: str) -> FimFormat | str | None:
    """The layout of prompts for `model_name`: a FimFormat, SERVER_FIM, or None (prefix only).
    `setting` is the `fim` setting; "auto" guesses from the model's name and, for a name it
    does not know, lets the server lay out the prompt."""
    if setting == "none":
        return None
    if setting == SERVER_FIM:
        return SERVER_FIM
    if setting != "auto":
        if setting not in FIM_FORMATS:
            known = ", ".join(FIM_SETTINGS)
            raise ModelLoadError(f"fim: unknown FIM format {setting!r}; known: {known}")
        return FIM_FORMATS[setting]
    name = model_name.lower()
    for fragments, fim in _FIM_BY_NAME:
        if all(f in name for f in fragments):
            return FIM_FORMATS[fim]
    return SERVER_FIM


class RemoteEngine:
    """Engine's interface (complete, complete_openai, show_prompt, close_document,
    cache_stats, info) over an inference server's HTTP API."""

    def __init__(self, config: EngineConfig, base: str, model: str, load_s: float) -> None:
        self.config = config
        self.base = base
        self.model = model
        self.fim = guess_fim(config.fim, model)
        # uri -> (the text its prefix window starts with, the share of prefix_chars and
        # suffix_chars its windows hold: less where its prompt was too long for the server)
        self.documents: OrderedDict[str, tuple[str, float]] = OrderedDict()
        if isinstance(self.fim, FimFormat):
            fim_info = self.fim.name
        elif self.fim == SERVER_FIM:
            fim_info = "laid out by the server (prompt and suffix)"
        else:
            fim_info = "none (prefix-only)"
        self.info: dict[str, Any] = {
            "server": base,
            "server_model": model,
            "fim": fim_info,
            "device": "server",
            "quant": "the server's",
            "load_s": round(load_s, 3),
        }

    @classmethod
    def load(cls, config: EngineConfig, progress=None) -> RemoteEngine:
        """Asks the server for its models: it must answer, and serve the one named by
        `server_model` (or any, where that is empty: the first it lists is used)."""
        t0 = time.perf_counter()
        base = server_base(config.model)
        if progress is not None:
            progress(0.0, f"asking the inference server at {base} for its models")
        try:
            listed = asyncio.run(_get_json(base + "/v1/models", config.server_api_key))
        except ServerError as exc:
            if not (exc.upstream_status == 404 and config.server_model):
                raise ModelLoadError(exc.message) from exc
            listed = {}  # a server without the list: the named model is taken on trust
        names = [m.get("id") for m in listed.get("data", []) if isinstance(m, dict)]
        names = [n for n in names if isinstance(n, str) and n]
        model = config.server_model
        if not model:
            if not names:
                raise ModelLoadError(
                    f"the inference server at {base} lists no model (GET /v1/models); "
                    "set `server_model` to the name it serves"
                )
            model = names[0]
        elif names and model not in names:
            raise ModelLoadError(
                f"the inference server at {base} does not serve {model!r} "
                f"(it lists {', '.join(names)}); fix `server_model`"
            )
        engine = cls(config, base, model, time.perf_counter() - t0)
        logger.info("engine ready: %s", engine.info)
        return engine

    # -- the engine's interface --

    def complete(
        self, request: CompleteRequest, cancel: CancelToken | None = None, on_text=None
    ) -> CompleteResponse:
        if request.is_warmup:  # the server keeps (and warms) its own cache
            return CompleteResponse(items=[], timings=Timings(), stop_reason="max_tokens")
        cursor = offset_at(request.text, request.line, request.character)
        rules = StopRules(
            stop_texts=request.stop,
            max_tokens=request.max_tokens,
            single_line=bool(request.single_line),
            block_line=None if request.single_line else block_line(request.text, cursor),
            deadline=deadline_after(request.max_time_ms),
        )
        at = Position(line=request.line, character=request.character)
        for narrowed in range(_NARROWINGS + 1):
            body, heal = self._body(request, cursor, remember=True)
            try:
                return self._ask(body, rules, cancel, on_text, at, heal)
            except ServerError as exc:
                if narrowed == _NARROWINGS or not _too_long(exc):
                    raise
                # The server's context is shorter than this document's windows (llama-server
                # splits its -c among its slots; dense text takes more tokens a character):
                # halve them, for its later requests too, from a new start.
                scale = self.documents[request.uri][1] / 2
                self.documents[request.uri] = ("", scale)
                logger.info(
                    "%s; %s's windows narrowed to %.0f%%", exc.message, request.uri, 100 * scale
                )
        raise AssertionError("unreachable")

    def complete_openai(
        self, request: OpenAICompletionRequest, cancel: CancelToken | None = None, on_text=None
    ) -> CompleteResponse:
        """A prompt without suffix is passed on as it came (a client's own template); with a
        suffix, its text is literal and laid out in the model's FIM format, as the local
        engine does (servers such as llama-server drop `suffix`)."""
        if not request.prompt and not request.suffix:
            raise BadRequest("prompt", "must not be empty")
        if request.suffix is None:
            body: dict[str, Any] = {"prompt": request.prompt}
        else:
            body = self._layout(_literal(request.prompt), _literal(request.suffix), "")
        rules = StopRules(stop_texts=request.stop, max_tokens=request.max_tokens)
        return self._ask(body, rules, cancel, on_text, Position(line=0, character=0))

    def show_prompt(self, request: CompleteRequest) -> PromptResponse:
        """The prompt text sent to the server (its tokens are the server's: none here)."""
        cursor = offset_at(request.text, request.line, request.character)
        body, heal = self._body(request, cursor, remember=False)
        shown = body["prompt"]
        if "suffix" in body:
            shown = f"{shown}<suffix, laid out by the server>{body['suffix']}"
        return PromptResponse(prompt=shown, token_ids=[], healed=heal)

    def close_document(self, uri: str) -> bool:
        return self.documents.pop(uri, None) is not None

    def refresh_due(self) -> bool:
        return False  # the server keeps the K/V (the scheduler never asks it to `refresh`)

    def cache_stats(self) -> dict[str, Any]:
        """The K/V is the server's to keep: here, only the documents' windows."""
        narrowed = sum(scale < 1 for _, scale in self.documents.values())
        return {"documents": len(self.documents), "narrowed_to_fit": narrowed}

    # -- prompts --

    def _body(
        self, request: CompleteRequest, cursor: int, *, remember: bool
    ) -> tuple[dict[str, Any], str]:
        """The /v1/completions body's prompt (and suffix) for a completion at `cursor`: the
        same windows as the local engine's (prompt.build_prompt), as text. And the text taken
        off the prefix's end (_HEALED) for the answer to start with, as prompt._heal does
        with tokens: after indentation a model wrote " return" on top of it, and inside a
        word went on with a word of its own."""
        text = request.text
        anchor, scale = self.documents.get(request.uri, ("", 1.0))
        prefix_max = int(self.config.prefix_chars * scale)
        suffix_max = int(suffix_window_chars(self.config.suffix_chars, request.trigger) * scale)
        start = window_start(text, cursor, prefix_max, anchor or None)
        if remember:
            self.documents[request.uri] = (window_anchor(text, start), scale)
            self.documents.move_to_end(request.uri)
            while len(self.documents) > _ANCHORED_DOCUMENTS:
                self.documents.popitem(last=False)
        prefix = text[start:cursor]
        found = _HEALED.search(prefix[-_HEAL_TAIL_CHARS:])
        heal = found.group() if found else ""
        prefix = prefix[: len(prefix) - len(heal)]
        path = document_name(request.uri, request.path, request.language)
        if self.fim is None:
            return {"prompt": comment_header(path) + _literal(prefix)}, heal
        suffix = suffix_window(text, cursor, suffix_max)
        context = trim_context(request.context, self.config.context_chars)
        return self._layout(_literal(prefix), _literal(suffix), path, context), heal

    def _layout(
        self, prefix: str, suffix: str, path: str | None, context: Sequence[Snippet] = ()
    ) -> dict[str, Any]:
        """The prompt (and suffix) fields for filling between `prefix` and `suffix`, after the
        other files' snippets (`context`, as prompt.context_ids lays them out)."""
        fim = self.fim
        if not isinstance(fim, FimFormat):
            return {"prompt": prefix, "suffix": suffix}  # SERVER_FIM: the server lays it out
        named = "".join(fim.file_sep + _literal(snippet_file(s)) for s in context if fim.file_sep)
        named += file_line(fim, path and _literal(path))
        if fim.order == "spm":
            header = aixcoder_header(path) if fim.file_header else ""
            return {
                "prompt": named + fim.prefix + fim.suffix + suffix + fim.middle + header + prefix
            }
        return {"prompt": named + fim.prefix + prefix + fim.suffix + suffix + fim.middle}

    # -- the request --

    def _ask(
        self,
        body: dict[str, Any],
        rules: StopRules,
        cancel: CancelToken | None,
        on_text: Callable[[str], None] | None,
        at: Position,
        heal: str = "",
    ) -> CompleteResponse:
        # The server stops at the FIM format's end tokens; the request's stop strings apply
        # here, after the healed text (the server would stop inside the word it retypes).
        fim_stops = self.fim.stop if isinstance(self.fim, FimFormat) else ()
        body = {
            **body,
            "model": self.model,
            "max_tokens": rules.max_tokens + _retyped_tokens(heal),
            "temperature": 0,
            "stream": True,
        }
        if fim_stops:
            body["stop"] = list(fim_stops[:_SERVER_STOPS])
        rules = dataclasses.replace(rules, stop_texts=(*rules.stop_texts, *fim_stops))
        answer = _Answer(rules, on_text, heal)
        asyncio.run(self._stream(body, answer, cancel))
        item = CompletionItem(text=answer.text, range=Range(start=at, end=at))
        timings = Timings(
            generated_tokens=answer.pieces,
            prefill_ms=answer.first_ms,
            decode_ms=answer.done_ms - answer.first_ms,
        )
        return CompleteResponse(items=[item], timings=timings, stop_reason=answer.reason.value)

    async def _stream(self, body: dict[str, Any], answer: _Answer, cancel: CancelToken | None):
        """Runs the request, stopping it (closing the connection, which ends the server's work
        too) when `cancel` is set or the stop rules end the answer."""
        key = self.config.server_api_key
        task = asyncio.ensure_future(_post_stream(self.base, key, body, answer))
        while not task.done():
            await asyncio.wait({task}, timeout=_CANCEL_POLL_S)
            if cancel is not None and cancel.is_cancelled and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ServerError):
                    await task
                raise Cancelled(f"cancelled while the inference server answered ({cancel.reason})")
        task.result()


def _retyped_tokens(heal: str) -> int:
    """About how many of the server's max_tokens retyping `heal` takes: a token for its
    indentation, one per 3 characters of its word."""
    word = heal.lstrip(" \t")
    return (word != heal) + -(-len(word) // 3)


class _Answer:
    """The streamed text as the stop rules let it through, less the healed text."""

    def __init__(
        self, rules: StopRules, on_text: Callable[[str], None] | None, heal: str = ""
    ) -> None:
        self.rules = rules
        self.shown = ShownText(rules, on_text)
        self.heal: str | None = heal or None  # None once the answer's start is settled
        self.pending = ""  # the answer's start while it may still be the healed text
        self.text = ""
        self.pieces = 0
        self.kept = 0  # pieces after the healed text: what max_tokens counts
        self.reason = StopReason.MAX_TOKENS
        self.started = time.perf_counter()
        self.first_ms = 0.0
        self.done_ms = 0.0

    def add(self, piece: str) -> bool:
        """Takes the next piece; True when the answer is complete."""
        if not self.pieces:
            self.first_ms = (time.perf_counter() - self.started) * 1000
        self.pieces += 1
        if self.heal is not None:
            self.pending += piece
            unhealed = self._unheal()
            if unhealed is None:  # another word than the user's: nothing to suggest
                self.finish(StopReason.STOP_TEXT)
                return True
            if self.heal is not None:
                return False
            piece = unhealed
        self.kept += 1
        reason = self.shown.add(piece)
        if reason is None and self.kept >= self.rules.max_tokens:
            reason = StopReason.MAX_TOKENS
        if reason is not None:
            self.finish(reason)
            return True
        return False

    def _unheal(self) -> str | None:
        """The answer without the text taken off the prompt's end, once its start is known
        ("" while it is not; None where the answer does not go on with the user's word). The
        model writes the indentation it wants; where that is not the user's (which stays in
        the document), its own is dropped."""
        heal, pending = self.heal or "", self.pending
        word = heal.lstrip(" \t")
        text = pending.lstrip(" \t")
        indent = pending[: len(pending) - len(text)]
        if not word:
            if not text and not indent.startswith(heal):
                # Short of the healed run, or other indentation (which goes, however many
                # more pieces it takes): wait for the text.
                return ""
            self.heal = None
            return pending[len(heal) :] if indent.startswith(heal) else text
        if len(text) < len(word) and word.startswith(text):
            return ""  # the word so far: wait
        self.heal = None
        return text[len(word) :] if text.startswith(word) else None

    def finish(self, reason: StopReason) -> None:
        self.reason = reason
        self.text = self.shown.finish(reason)
        self.done_ms = (time.perf_counter() - self.started) * 1000


def _session(api_key: str) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_S, sock_read=READ_S)
    return aiohttp.ClientSession(headers=headers, timeout=timeout)


async def _get_json(url: str, api_key: str) -> dict[str, Any]:
    async with _session(api_key) as session:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=LIST_S)) as response:
                await _check(response, url)
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            raise ServerError(_failure(url, exc)) from exc
    if not isinstance(body, dict):
        raise ServerError(f"the inference server's answer to GET {url} is not a JSON object")
    return body


async def _post_stream(base: str, api_key: str, body: dict[str, Any], answer: _Answer) -> None:
    url = base + "/v1/completions"
    async with _session(api_key) as session:
        try:
            async with session.post(url, json=body) as response:
                await _check(response, url)
                await _read_events(response, answer, url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServerError(_failure(url, exc)) from exc


async def _read_events(response: aiohttp.ClientResponse, answer: _Answer, url: str) -> None:
    """Server-sent events: `data: {text_completion chunk}` lines, then `data: [DONE]`; or,
    from a server that does not stream, one text_completion object."""
    if response.content_type == "application/json":
        if not _take(await response.text(), answer, url):
            answer.finish(StopReason.EOS)
        return
    if response.content_type != "text/event-stream":
        raise ServerError(
            f"the inference server answered POST {url} with {response.content_type}, not a "
            "completion: is `model` the URL of an OpenAI-compatible server?"
        )
    async for raw in response.content:
        line = raw.decode("utf-8", errors="replace").strip()
        if line.startswith("error:"):  # llama-server's way of failing mid-stream
            raise ServerError(f"the inference server failed (POST {url}): {line[6:].strip()}")
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            break
        if _take(data, answer, url):
            return
    answer.finish(StopReason.EOS)


def _take(data: str, answer: _Answer, url: str) -> bool:
    """Passes one text_completion chunk (JSON text) to `answer`; True when it is complete."""
    try:
        chunk = json.loads(data)
        if isinstance(chunk, dict) and "error" in chunk:
            raise ServerError(f"the inference server failed (POST {url}): {chunk['error']}")
        choices = chunk["choices"]
        if not choices:
            return False  # a chunk of other news (Azure's content filters)
        piece, finish = choices[0].get("text") or "", choices[0].get("finish_reason")
        if not isinstance(piece, str):
            raise TypeError(f"text is a {type(piece).__name__}")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ServerError(
            f"the inference server sent what is not a completion (POST {url}): {data[:200]!r}"
        ) from exc
    if piece and answer.add(piece):
        return True
    if finish:
        answer.finish(StopReason.MAX_TOKENS if finish == "length" else StopReason.EOS)
        return True
    return False


async def _check(response: aiohttp.ClientResponse, url: str) -> None:
    if response.status < 400:
        return
    text = (await response.text(errors="replace"))[:500]
    try:
        error = json.loads(text).get("error")
        detail = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        detail = None
    if not isinstance(detail, str) or not detail:
        html = response.content_type == "text/html" or text.lstrip().startswith("<")
        detail = (response.reason if html else text.strip()) or response.reason
    hint = "; check `server_api_key`" if response.status in (401, 403) else ""
    error = ServerError(
        f"the inference server answered {response.method} {url} with {response.status}: "
        f"{detail}{hint}"
    )
    error.upstream_status = response.status
    raise error


_TOO_LONG = re.compile(r"context|too long|exceed|must be <=", re.IGNORECASE)


def _too_long(error: ServerError) -> bool:
    """Whether the server refused the prompt as longer than its context (llama-server: "the
    request exceeds the available context size"; vLLM: "maximum context length"; TGI, 422:
    "`inputs` tokens + `max_new_tokens` must be <= 2048")."""
    return error.upstream_status in (400, 413, 422) and bool(_TOO_LONG.search(error.message))


def _literal(text: str) -> str:
    """Document text as text: special-token text broken by a zero-width space."""
    return _SPECIAL_TEXT.sub("<\u200b", text)


def _failure(url: str, exc: BaseException) -> str:
    # An https:// URL for a plain-HTTP server fails its TLS handshake, or waits for one.
    tls = "; is it a plain-HTTP server (http://)?" if url.lower().startswith("https:") else ""
    if isinstance(exc, TimeoutError):
        what = f"did not answer in time{tls}"
    elif isinstance(exc, aiohttp.ClientSSLError):
        what = f"failed its TLS handshake ({exc.os_error or exc}){tls}"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        what = (
            f"could not be reached ({exc.os_error or exc}); start it, or set `model` to a "
            "local model"
        )
    else:
        what = f"failed ({type(exc).__name__}: {exc})"
    return f"the inference server at {url} {what}"
