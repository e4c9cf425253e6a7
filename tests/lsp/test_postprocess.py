from __future__ import annotations

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
