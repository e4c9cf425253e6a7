from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest
import tomllib

from codelm.daemon.stops import StopReason, StopRules, block_line
from codelm.lsp.completion import is_single_line
from codelm.lsp.postprocess import (
    Context,
    Suggestion,
    detect_indentation,
    indent_width,
    postprocess,
)

GOLDEN = Path(__file__).parents[1] / "golden" / "postprocess"
OPEN, CLOSE = "⦃", "⦄"  # never occur in code


def _split(marked: str) -> tuple[str, str, str]:
    """(prefix, suggestion, suffix) of a document with one ⦃suggestion⦄."""
    assert marked.count(OPEN) == 1 and marked.count(CLOSE) == 1, "one ⦃…⦄ per document"
    prefix, rest = marked.split(OPEN)
    middle, suffix = rest.split(CLOSE)
    return prefix, middle, suffix


def _cases() -> list[Path]:
    return sorted(GOLDEN.glob("*.toml"))


def _golden(path: Path) -> tuple[dict, str, Context]:
    """A case, its suggestion and its context."""
    case = tomllib.loads(path.read_text(encoding="utf-8"))
    eol = "\r\n" if case.get("crlf") else "\r" if case.get("cr") else "\n"
    prefix, raw, suffix = _split(case["text"].replace("\n", eol))
    ctx = Context(prefix=prefix, suffix=suffix, is_single_line=False, language=case.get("language"))
    mode = {"single": "always", "multi": "never"}.get(case.get("mode", ""), "auto")
    ctx = Context(
        prefix=prefix,
        suffix=suffix,
        is_single_line=is_single_line(ctx.line_before, ctx.line_after, mode),
        language=case.get("language"),
    )
    return case, raw, ctx


@pytest.mark.parametrize("path", _cases(), ids=lambda p: p.stem)
def test_postprocess_golden(path: Path):
    case, raw, ctx = _golden(path)
    prefix, suffix = ctx.prefix, ctx.suffix
    eol = "\r\n" if case.get("crlf") else "\r" if case.get("cr") else "\n"
    result = postprocess(Suggestion(text=raw, truncated=case.get("truncated", False)), ctx)
    if case.get("discard"):
        assert result is None, f"{case['description']}: expected discard, got {result}"
        return
    e_prefix, e_text, e_suffix = _split(case["expected"].replace("\n", eol))
    assert (e_prefix, e_suffix) == (prefix, suffix), "expected must keep the text around ⦃…⦄"
    assert result is not None, f"{case['description']}: discarded"
    assert result.text == e_text, case["description"]
    assert suffix[: result.replace_after] == case.get("replaced", "")


def test_golden_cases_exist():
    assert len(_cases()) >= 20


def test_the_engines_stop_at_the_block_end_changes_no_golden_result():
    """The engine stops a multi-line suggestion before a line that leaves the cursor's block
    (daemon/stops.py); what the language server shows must not change: each golden
    suggestion the engine would have stopped early shows as it did in full."""
    stopped = 0
    for path in _cases():
        case, raw, ctx = _golden(path)
        if ctx.is_single_line:
            continue
        line = block_line(ctx.prefix + ctx.suffix, len(ctx.prefix))
        cut, reason = StopRules(block_line=line).scan(raw)
        if reason is not StopReason.BLOCK_END:
            continue
        stopped += 1
        full = postprocess(Suggestion(text=raw, truncated=case.get("truncated", False)), ctx)
        early = postprocess(Suggestion(text=raw[:cut]), ctx)
        assert early == full, f"{path.stem}: {raw[:cut]!r}"
    assert stopped >= 10


def test_indent_width_expands_tabs():
    assert indent_width("\t  x") == 6
    assert indent_width("    x") == 4


def test_detect_indentation():
    assert detect_indentation(["def f():", "  x = 1", "  if x:", "    y"]) == (False, 2)
    assert detect_indentation(["func f() {", "\tx := 1", "}"]) == (True, 4)
    assert detect_indentation(["a", "b"]) == (None, 4)


# Pieces a model's text may hold that the golden documents seldom do.
_NOISE = ("", ")", "}", "]", ");", '"', "'", '"""', "\t", "  ", ":", "{", "(", "é", "𝄞", "\u200b")


def _broken_promises(out: Suggestion, ctx: Context) -> list[str]:
    """What a shown suggestion does that the language server promises never to do."""
    problems = []
    rest = ctx.line_after
    if not 0 <= out.replace_after <= len(rest):
        problems.append(f"replaces {out.replace_after} chars of a line rest of {len(rest)}")
    # Each character it replaces (but spaces) is in its text: nothing the user wrote is lost.
    lost = Counter(ch for ch in rest[: out.replace_after] if not ch.isspace()) - Counter(out.text)
    if lost:
        problems.append(f"replaces {''.join(lost.elements())!r} without retyping it")
    if not out.text.strip():
        problems.append("shows nothing but whitespace")
    if ctx.is_single_line and len([x for x in re.split(r"\r\n|\r|\n", out.text) if x.strip()]) > 1:
        problems.append("shows more than one line where one was asked for")
    if ctx.eol == "\r\n" and re.search(r"(?<!\r)\n", out.text):
        problems.append("a bare \\n in a CRLF document")
    if ctx.eol == "\n" and "\r" in out.text:
        problems.append("a \\r in an LF document")
    return problems


def test_random_cursors_and_suggestions_keep_the_promises():
    """Cursors anywhere in the golden documents, with any line ending, given suggestions cut
    from anywhere in them with brackets, quotes and odd characters added: the filters never
    raise, and what they show breaks no promise (_broken_promises)."""
    documents = []
    for path in _cases():
        case = tomllib.loads(path.read_text(encoding="utf-8"))
        text = case["text"].replace(OPEN, "").replace(CLOSE, "")
        documents.append((text, case.get("language")))
    rng = random.Random(0)
    failures = []
    for _ in range(20_000):
        text, language = rng.choice(documents)
        text = text.replace("\n", rng.choice(["\n", "\n", "\r\n", "\r"]))
        cursor = rng.randrange(len(text) + 1)
        if text[cursor - 1 : cursor + 1] == "\r\n":
            cursor -= 1  # (an editor's cursor never sits between \r and \n)
        start = rng.randrange(len(text))
        raw = text[start : start + rng.randint(1, 200)].replace("\r\n", "\n").replace("\r", "\n")
        for _ in range(rng.randrange(3)):
            at = rng.randrange(len(raw) + 1)
            raw = raw[:at] + rng.choice(_NOISE) + raw[at:]
        ctx = Context(
            prefix=text[:cursor],
            suffix=text[cursor:],
            is_single_line=rng.random() < 0.3,
            language=language,
        )
        case = (ctx.prefix[-80:], raw, ctx.suffix[:80], ctx.is_single_line, language)
        try:
            out = postprocess(Suggestion(text=raw, truncated=rng.random() < 0.2), ctx)
        except Exception as exc:  # noqa: BLE001 (every failure is reported, with its case)
            failures.append((repr(exc), *case))
            continue
        if out is not None and (problems := _broken_promises(out, ctx)):
            failures.append((problems, out, *case))
    assert not failures, f"{len(failures)} cases, the first: {failures[:3]}"
