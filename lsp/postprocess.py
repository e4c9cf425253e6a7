"""Post-processing of the daemon's suggestions: an ordered list of small pure filters.

Each filter takes a Suggestion and the Context at the cursor and returns a Suggestion or None
(discard), logging at DEBUG why it acted. Text inside the filters uses \\n line breaks; the
last filter restores the document's line ending. Golden cases: tests/golden/postprocess/.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import pairwise

from codelm.daemon.stops import BLOCK_OPENER, indent_width  # (blocks measured as stops are)

logger = logging.getLogger(__name__)

OPENERS = "([{"
CLOSERS = ")]}"
QUOTES = "\"'`"
_PAIRS = dict(zip(CLOSERS, OPENERS, strict=True))
CLOSER_OF = dict(zip(OPENERS, CLOSERS, strict=True))
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# A shell line's end that continues the command on the next line.
_DANGLING_PIPE = re.compile(r"\s*(?:\|\||&&|\||\\|`)\s*$")
# A line that starts a definition: on a blank line, the suggestion's statements go on at its
# indentation up to one of these (_starts_definition).
_DEFINITION = re.compile(
    r"(?:(?:export|public|private|protected|internal|static|final|abstract|override|async"
    r"|pub|open|suspend|inline|virtual|default|local|readonly)\s+)*"
    r"(?:(?:def|defp|defmacro|defmodule|class|function|func|fn|fun|interface|struct|enum|impl"
    r"|trait|module|object)\b(?=\s*[\w$(<])(?!\s*\w+\s*[=;,.])"  # not `module = x`, `struct s;`
    r"|(?:const|let|var)?\s*[\w$]+\s*=\s*(?:async\s+)?(?:function\b|\([^)]*\)\s*=>|[\w$]+\s*=>))"
)
# A method's signature (`int f(x) {`, `get() {`) or a test (`it("a", () => {`), in the
# languages whose definitions have no keyword of their own.
_SIGNATURE = re.compile(
    r"(?:it|test|describe|context)\s*\("
    r"|(?!(?:if|for|while|switch|catch|else|do|try|return|using|lock|foreach|synchronized|go"
    r"|defer|new)\b)(?:[\w<>\[\],.?*&:]+\s+)*\*?[\w$]+\s*\([^;]*\)[^;=]*\{$"
)
_SIGNATURE_LANGUAGES = frozenset(
    {"c", "cpp", "java", "csharp", "javascript", "javascriptreact", "typescript"}
    | {"typescriptreact", "php", "objective-c", "objective-cpp", "dart", "cuda-cpp"}
)
# Where `@name` begins a definition (a decorator or annotation), not a Makefile's silent
# command or SCSS's `@include`.
_DECORATED = frozenset(
    {"python", "java", "kotlin", "scala", "javascript", "javascriptreact", "typescript"}
    | {"typescriptreact", "dart", "swift", "groovy", "php"}
)
_ELSE = re.compile(r"(?:}\s*)?(?:else|finally)\b(?!\s+if\b)")  # one to a statement, unlike elif
_BLOCK_SCALAR = re.compile(r"[|>][-+]?\d*$")
_TABLE_HEADER = re.compile(r"^\[[^\]]*\]+\s*(?:[#;].*)?$")  # TOML's `[tool.ruff]`, INI's `[server]`
# Languages whose elements (`<ul>` ... `</ul>`) nest like brackets, and the HTML elements
# that have no closing tag.
_MARKUP = frozenset(
    {"html", "xml", "vue", "svelte", "javascriptreact", "typescriptreact", "xsl", "svg"}
)
_VOID_ELEMENTS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}
    | {"track", "wbr"}
)
_TAG = re.compile(r"<(/?)([A-Za-z][\w.:-]*)(?:\s[^<>]*?)?(/?)>")
# An element's opening tag at the end of a line (`<ul>`, `<a href="/">`): its name.
_OPEN_TAG_AT_END = re.compile(r"<([A-Za-z][\w.:-]*)(?:\s[^<>]*)?>\s*$")
# What may follow the cursor on its line for a mid-line suggestion (see completion.py).
LINE_REST_OK = re.compile(r"^[\s)\]}\"'`;,]*$")
# A line that goes on with the statement above it at its indentation (`} else {`, `except:`,
# Go's and C's `case x:` under their `switch`, C++'s `public:` under its `class`).
_CONTINUATION = re.compile(
    r"^(?:[)\]}]|(?:else|elif|except|finally|catch)\b"
    r"|case\b.*:$|(?:default|public|private|protected)\s*:$)"  # labels, not `default = {`
)
# A line at column 0 that opens a scope (`void f(int x) {`, `def f():`, an Allman `{`): the
# brackets open around the cursor begin there. Not a preprocessor line, a label (`out:`) or a
# line that closes (`}`), which sit at column 0 inside functions too.
_TOP_LEVEL = re.compile(r"^(?![\s#)\]}])(?![A-Za-z_]\w*:\s*$).*[{(\[:][ \t]*$", re.MULTILINE)
# A Rust lifetime's quote (`'a`, `'static`, `'_`), which opens no character literal.
_LIFETIME = re.compile(r"'(?=[A-Za-z_]\w*(?![\w']))")
_SCOPE_CHARS = 100_000  # how far back the brackets around the cursor are looked for
# What a bracket scan reads: every other run of characters becomes one space (keeping `a / b`
# from reading as `//`), so the Python loop sees a small share of the text.
_NOT_SCANNED = re.compile(r"[^()\[\]{}\"'`\\\n/*#]+")
_HASH_COMMENTS = frozenset(
    {
        "python",
        "ruby",
        "toml",
        "r",
        "makefile",
        "elixir",
        "julia",
        "powershell",
        "coffeescript",
        "nim",
        "cmake",
    }
)
_SLASH_COMMENTS = frozenset(
    {
        "c",
        "cpp",
        "java",
        "javascript",
        "javascriptreact",
        "typescript",
        "typescriptreact",
        "go",
        "rust",
        "csharp",
        "kotlin",
        "swift",
        "scala",
        "dart",
        "php",
        "objective-c",
        "objective-cpp",
        "groovy",
        "zig",
        "jsonc",
        "cuda-cpp",
        "scss",
        "less",
    }
)
# Where a `#` starts a comment only at the start of a word: `$#`, `${#a[@]}`, `$#array` and
# YAML's `a#b` are none.
_WORD_HASH_COMMENTS = frozenset({"shellscript", "yaml", "perl", "dockerfile"})
_HASH_IN_WORD = re.compile(r"(?<=[^\s;|&(])#")
_DASH_COMMENTS = frozenset({"lua", "sql", "haskell", "elm", "ada", "vhdl"})  # `-- ...`
_LUA_LONG_COMMENT = re.compile(r"--\[(=*)\[[\s\S]*?\]\1\]")
_TAG_COMMENTS = frozenset({"html", "xml", "vue", "svelte", "xsl", "svg"})  # `<!-- ... -->`
# Strings without escapes, whose backslashes the scan must not read as one: C#'s verbatim
# `@"C:\dir\"` and Rust's raw `r"..."`, `r#"..."#` (read as an empty string).
_VERBATIM_STRING = re.compile(r'@"(?:[^"]|"")*"')
_RUST_RAW_STRING = re.compile(r'\bb?r(#*)"[\s\S]*?"\1')
# Haskell's and Elm's primes (`foldl'`, `x''`), once their character literals are out of the way.
_PRIMED = frozenset({"haskell", "elm", "purescript"})
_CHAR_LITERAL = re.compile(r"'(?:\\.|[^'\\\n])'")
_PRIME = re.compile(r"(?<=[\w'])'")

# Languages whose triple-quoted strings span lines (Python's docstrings, Kotlin's raw strings).
_TRIPLE_QUOTED_STRINGS = frozenset(
    {"python", "kotlin", "scala", "swift", "julia", "groovy", "dart", "toml", "elixir"}
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Suggestion:
    """`text` inserted at the cursor, replacing the next `replace_after` chars (str indices)."""

    text: str
    replace_after: int = 0
    truncated: bool = False  # the model stopped at max_tokens: its last line is unfinished


@dataclass(frozen=True, kw_only=True)
class Context:
    """The document around the cursor: `prefix` + `suffix` is the whole text."""

    prefix: str
    suffix: str
    is_single_line: bool
    language: str | None = None

    @cached_property
    def line_before(self) -> str:
        return self.prefix[max(self.prefix.rfind("\n"), self.prefix.rfind("\r")) + 1 :]

    @cached_property
    def line_after(self) -> str:
        end = _LINE_BREAK.search(self.suffix)
        return self.suffix[: end.start()] if end else self.suffix

    @cached_property
    def eol(self) -> str:
        """The document's line ending near the cursor: the most common of \r\n, \n and a
        lone \r (classic Mac OS files)."""
        text = self.prefix[-20_000:] + self.suffix[:20_000]
        crlf = text.count("\r\n")
        counts = {"\r\n": crlf, "\n": text.count("\n") - crlf, "\r": text.count("\r") - crlf}
        return max(counts, key=lambda eol: (counts[eol], eol == "\n"))

    @cached_property
    def suffix_lines(self) -> list[str]:
        """Lines after the cursor line (at most 50), \\r stripped."""
        start = len(self.line_after)
        rest = self.suffix[start : start + 20_000].replace("\r\n", "\n").replace("\r", "\n")
        return rest[1:].split("\n", 50)[:50] if rest else []

    @cached_property
    def between_braces(self) -> bool:
        """The cursor sits between braces or square brackets the editor closed: `{|}`,
        `=> {|});`, `$config = [|];`."""
        return between_braces(self.line_before, self.line_after)

    @cached_property
    def brackets_before(self) -> _Brackets:
        """The brackets open at the cursor, scanned from the top-level line it is under (a
        fixed number of lines would miss the `{` of a function longer than them)."""
        end = len(self.prefix) - len(self.line_before)
        head = self.prefix[max(0, end - _SCOPE_CHARS) : end]
        starts = [m.start() for m in _TOP_LEVEL.finditer(head)]
        if starts:
            start = starts[-1]  # the nearest scope start
        elif end > len(head):
            start = head.find("\n") + 1  # the window cut a line: from the next whole one
        else:
            start = 0
        text = head[start:].replace("\r\n", "\n").replace("\r", "\n") + self.line_before
        brackets = _Brackets(
            comments=_comment_style(self.language),
            triple_quotes=self.language in _TRIPLE_QUOTED_STRINGS,
        )
        return brackets.fed(self.scannable(text))

    def scannable(self, text: str) -> str:
        """`text` as the bracket scan should read it: without Rust's lifetime quotes, Haskell's
        primes and prose's apostrophes, and strings without escapes read as empty ones."""
        if self.language == "rust":
            return _LIFETIME.sub("", _RUST_RAW_STRING.sub('""', text))
        if self.language == "csharp":
            return _VERBATIM_STRING.sub('""', text)
        if self.language in _PRIMED:
            return _PRIME.sub("", _CHAR_LITERAL.sub('""', text))
        if self.language in _PROSE:  # `It's`: an apostrophe, no quote
            return text.replace("'", "")
        return text

    @cached_property
    def prefix_lines(self) -> list[str]:
        """Lines before the cursor line (at most 50, nearest last), \\r stripped."""
        end = len(self.prefix) - len(self.line_before)
        head = self.prefix[max(0, end - 8000) : end]  # slices, not copies of a huge prefix
        lines = head.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        return lines[:-1][-50:]


Filter = Callable[[Suggestion, Context], "Suggestion | None"]


def between_braces(line_before: str, line_after: str) -> bool:
    """`{|}`, `[|]`, or an element's tags (`<ul>|</ul>`): both closed by the editor."""
    opener = line_before.rstrip()[-1:]
    if opener in ("{", "["):
        return (
            line_after.lstrip()[:1] == CLOSER_OF[opener]
            and LINE_REST_OK.match(line_after) is not None
        )
    tag = _OPEN_TAG_AT_END.search(line_before) if opener == ">" else None
    if tag is None:
        return False
    after = line_after.lstrip()
    closing = f"</{tag.group(1)}>"
    return after.startswith(closing) and LINE_REST_OK.match(after[len(closing) :]) is not None


def _leading(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def normalize_newlines(s: Suggestion, ctx: Context) -> Suggestion | None:
    if "\r" not in s.text:
        return s
    logger.debug("normalize_newlines: \\r\\n -> \\n")
    return replace(s, text=s.text.replace("\r\n", "\n").replace("\r", "\n"))


def drop_unfinished_line(s: Suggestion, ctx: Context) -> Suggestion | None:
    """A suggestion the model did not finish (max_tokens) loses its last, unfinished line
    (`component:`, `fmt.Printf("x = %d`): the text after its last line break, and the lines
    before it that open a block whose body never came. One that ends with a line break (and
    indentation) was finished; one of a single line is kept."""
    head, newline, tail = s.text.rpartition("\n")
    if not s.truncated or not newline or not tail.strip() or not head.strip():
        return s
    lines = head.rstrip().split("\n")
    while len(lines) > 1 and BLOCK_OPENER.search(lines[-1]):
        lines.pop()
    lines = _before_unclosed(lines, ctx)
    logger.debug(
        "drop_unfinished_line: %r and %d lines before it", tail, head.count("\n") + 1 - len(lines)
    )
    return replace(s, text="\n".join(lines))


def _before_unclosed(lines: list[str], ctx: Context) -> list[str]:
    """`lines` up to the one that opens a bracket (or, in markup, an element) the rest never
    closes (`"deps": {` whose entries max_tokens cut): the file would be left with it open.
    All of them where that is the first line: the user goes on with it."""
    state = ctx.brackets_before
    depth, elements = len(state.stack), 0
    markup = ctx.language in _MARKUP
    start = 0  # the first line after which the brackets stay deeper than at the cursor
    for n, line in enumerate(lines):
        if len(state.stack) <= depth and elements <= 0:
            start = n
        state = state.fed(ctx.scannable(line + "\n"))
        if markup:
            elements += _elements_opened(line)
    unclosed = len(state.stack) > depth or elements > 0
    return lines[:start] if unclosed and start > 0 else lines


def _elements_opened(line: str) -> int:
    """Elements `line` opens less those it closes."""
    count = 0
    for closing, name, self_closing in _TAG.findall(line):
        if closing:
            count -= 1
        elif not self_closing and name.lower() not in _VOID_ELEMENTS:
            count += 1
    return count


def trim_space(s: Suggestion, ctx: Context) -> Suggestion | None:
    """No trailing whitespace, but the space before a closer already after the cursor that
    mirrors its opener's (`{ name, age }`), on the cursor's line too; no leading spaces when
    the line already ends with one. Nor at the end of the lines after the first (the blank
    lines a model indents), unless the document's own blank lines keep their indentation or
    it is prose (Markdown's two trailing spaces break a line)."""
    text = s.text.rstrip()
    if "\n" in text and ctx.language not in _PROSE and not _indents_blank_lines(ctx):
        first, *rest = text.split("\n")
        text = "\n".join([first, *(line.rstrip(" \t") for line in rest)])
    if s.text[len(text) : len(text) + 1] == " " and _spaced_closer(ctx.line_before + text, ctx):
        text += " "
    if ctx.line_before.strip() and ctx.line_before[-1:] in (" ", "\t"):
        text = text.lstrip(" \t")
    head, newline, rest = text.partition("\n")
    if newline and ctx.line_before.strip() and head and not head.strip():
        text = newline + rest  # (`if x: ` would end with the spaces before the body's line)
    if text != s.text:
        logger.debug("trim_space: %d chars of whitespace", len(s.text) - len(text))
        return replace(s, text=text)
    return s


def _indents_blank_lines(ctx: Context) -> bool:
    """More of the blank lines around the cursor hold whitespace than none."""
    blank = [line for line in (*ctx.prefix_lines, *ctx.suffix_lines) if not line.strip()]
    return sum(1 for line in blank if line) > sum(1 for line in blank if not line)


def _spaced_closer(line: str, ctx: Context) -> bool:
    """The text after the cursor starts with a closer whose opener in `line` (the cursor's
    line once the suggestion is in) is followed by a space."""
    closer = ctx.line_after[:1]
    if closer not in _PAIRS or "\n" in line:  # (not `in CLOSERS`: "" is in every string)
        return False
    depth = 0
    for i in range(len(line) - 1, -1, -1):
        if line[i] in CLOSERS:
            depth += 1
        elif line[i] in OPENERS:
            if depth == 0:
                return line[i] == _PAIRS[closer] and line[i + 1 : i + 2] == " "
            depth -= 1
    return False


def start_on_cursor_line(s: Suggestion, ctx: Context) -> Suggestion | None:
    """On a line of nothing but indentation, a suggestion that opens with blank lines starts
    on the cursor's line: its first line of text goes there, less the indentation already typed.
    (Accepted as it came, it would leave the cursor's line blank with trailing whitespace and
    put the code below the cursor.)"""
    if ctx.line_before.strip() or ctx.line_after.strip() or "\n" not in s.text:
        return s
    lines = s.text.split("\n")
    if lines[0].strip():
        return s
    first = next((n for n, line in enumerate(lines) if line.strip()), None)
    if first is None or not lines[first].startswith(ctx.line_before):
        return s  # blank, or less indented than the cursor: left as it is
    logger.debug("start_on_cursor_line: %d blank lines dropped", first)
    return replace(s, text="\n".join([lines[first][len(ctx.line_before) :], *lines[first + 1 :]]))


def cut_single_line(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Keep one line. At the end of a finished line, that is the next line (after the newline).
    Between braces, a suggestion that goes on the cursor's line keeps to it too."""
    if "\n" not in s.text:
        return s
    first, rest = s.text.split("\n", 1)
    if not ctx.is_single_line and not (ctx.between_braces and first.strip()):
        return s
    if not first.strip() and not ctx.line_after.strip() and rest.strip():
        next_line = rest.lstrip("\n").split("\n", 1)[0].rstrip()
        logger.debug("cut_single_line: kept the line after the cursor's finished line")
        return replace(s, text="\n" + next_line)
    logger.debug("cut_single_line: kept the first of %d lines", s.text.count("\n") + 1)
    if ctx.language in ("powershell", "shellscript"):
        first = _DANGLING_PIPE.sub("", first)  # `... } |`: the command it went on to is cut
    return replace(s, text=first.rstrip())


def stop_at_block_end(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Multi-line: stop before the first line that leaves the cursor's block."""
    lines = s.text.split("\n")
    if ctx.is_single_line or len(lines) < 2:
        return s
    if len(ctx.brackets_before.quote) == 3:
        return _stop_after_docstring(s, ctx, lines)
    cursor_line = ctx.line_before + lines[0]
    if BLOCK_OPENER.search(ctx.line_before) and (
        _ends_statement(cursor_line, ctx)
        or (
            ctx.line_before.rstrip().endswith(":")
            and lines[0].strip()
            and not BLOCK_OPENER.search(cursor_line)
            and not _BLOCK_SCALAR.match(lines[0].strip())  # YAML's `run: |`
            and not _Brackets().fed(ctx.scannable(lines[0])).stack  # ` ["requests",`
        )
    ):
        # `=> x * x;`, `sum(a, b);`, `image: nginx:latest`: what the opener began ended on its
        # own line (the keys after a value are siblings, most often the document's already).
        logger.debug("stop_at_block_end: the cursor line ends its statement")
        return replace(s, text=lines[0].rstrip())
    base = indent_width(cursor_line)
    # After `{`/`:`, the block is the lines indented deeper than the cursor line. On a line of
    # nothing but indentation where the document's block ends below (the user writes the rest
    # of it), the statements after that block go on too, up to another definition.
    opens = BLOCK_OPENER.search(cursor_line) or (ctx.between_braces and not lines[0].strip())
    min_indent = base + 1 if opens else base
    next_line = _next_suffix_line(ctx)
    if not ctx.line_before.strip() and indent_width(next_line) < base:
        min_indent = base
    state = ctx.brackets_before.fed(ctx.scannable(lines[0] + "\n"))
    for n, line in enumerate(lines[1:], start=1):
        in_string, state = bool(state.quote), state.fed(ctx.scannable(line + "\n"))
        if in_string:
            continue  # a docstring's lines (`module: the module loaded.`) are not code
        if ctx.language in ("toml", "ini") and _TABLE_HEADER.match(line):
            logger.debug("stop_at_block_end: line %d starts another table", n)
            return replace(s, text="\n".join(lines[:n]).rstrip())
        if (
            min_indent == base
            and indent_width(line) == base
            and _starts_definition(line.strip(), ctx.language)
        ):
            logger.debug("stop_at_block_end: line %d starts another definition", n)
            return replace(s, text="\n".join(lines[:n]).rstrip())
        if not line.strip() or indent_width(line) >= min_indent:
            continue
        stripped = line.strip()
        if min_indent > base and indent_width(line) == base and _continues(stripped):
            if (
                _ELSE.match(stripped)
                and indent_width(next_line) == base
                and _continues(next_line.strip())
            ):
                # The document has its own `else:` there: a second one would not parse.
                logger.debug("stop_at_block_end: line %d repeats the document's %r", n, stripped)
                return replace(s, text="\n".join(lines[:n]).rstrip())
            continue  # `} else {`, `except KeyError:`: the same statement goes on
        if (
            ctx.language == "yaml"
            and indent_width(line) == base
            and (stripped.startswith("- ") or stripped == "-")
            and cursor_line.rstrip().endswith(":")
        ):
            continue  # `containers:` then `- name: web` at the key's indentation: its value
        # Keep the line that closes the cursor line's opener (`}`, `}, []);`, `} while (x);`)
        # unless the suffix already closes it.
        closes_opener = (
            min_indent > base
            and indent_width(line) == base
            and (stripped[:1] in CLOSERS or stripped.startswith("</"))
            and not (indent_width(next_line) == base and next_line.strip()[:1] == stripped[:1])
        )
        keep = n + 1 if closes_opener or _closes_unclosed(stripped, lines[:n], ctx) else n
        logger.debug("stop_at_block_end: line %d leaves the block (indent < %d)", n, min_indent)
        return replace(s, text="\n".join(lines[:keep]).rstrip())
    return s


def _starts_definition(stripped: str, language: str | None) -> bool:
    if stripped.endswith(";"):
        return False
    if stripped.startswith("@"):
        return language in _DECORATED
    if _DEFINITION.match(stripped):
        return True
    return language in _SIGNATURE_LANGUAGES and _SIGNATURE.match(stripped) is not None


def _closes_unclosed(stripped: str, kept: list[str], ctx: Context) -> bool:
    """At the end of the file (nothing after the cursor), `stripped` closes a bracket that
    the text before it leaves open: that block's `}`, which no auto-closing editor put there."""
    if ctx.suffix.strip() or stripped[:1] not in CLOSERS:
        return False
    state = ctx.brackets_before.fed(ctx.scannable("\n".join(kept) + "\n"))
    return state.stack[-1:] == [_PAIRS[stripped[0]]]


def _ends_statement(line: str, ctx: Context) -> bool:
    """`line` ends with a `;` outside any bracket it opens."""
    if not line.rstrip().endswith(";"):
        return False
    scan = _Brackets(comments=_comment_style(ctx.language)).fed(ctx.scannable(line))
    return not scan.stack and not scan.errors and not scan.comment


def _stop_after_docstring(s: Suggestion, ctx: Context, lines: list[str]) -> Suggestion:
    """Inside a docstring the block is the string: its `Args:` opens none, and the suggestion
    stops after the line that closes it (trim_repeated_suffix_lines then drops that line
    where the document closes the string already)."""
    state = ctx.brackets_before
    for n, line in enumerate(lines):
        state = state.fed(ctx.scannable(line + "\n"))
        if not state.quote:
            logger.debug("stop_at_block_end: line %d closes the docstring", n)
            return replace(s, text="\n".join(lines[: n + 1]).rstrip())
    return s


def _continues(stripped: str) -> bool:
    return bool(_CONTINUATION.match(stripped) and BLOCK_OPENER.search(stripped))


_PROSE = frozenset({"markdown", "mdx", "plaintext", "restructuredtext", "asciidoc", "quarto"})


def stop_at_code_fence(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Stop before a Markdown code fence (```) in a code file: an instruct-tuned model ends
    its code with one, then writes about it ("In this code, ..."). Files with fences of their
    own near the cursor (docstrings that show code) keep them. In prose, code suggested
    inside a fenced block stops at the fence that closes it: before it where the document
    has one after the cursor, else after it."""
    if "```" not in s.text:
        return s
    lines = s.text.split("\n")
    fence = next((n for n, line in enumerate(lines) if _is_fence(line)), None)
    if fence is None:
        return s
    before, after = ctx.prefix[-20_000:], ctx.suffix[:20_000]
    if ctx.language in _PROSE:
        above = before[: len(before) - len(ctx.line_before)].split("\n")
        if sum(map(_is_fence, above)) % 2 == 0:
            return s  # not inside a fenced block
        keep = fence if any(map(_is_fence, after.split("\n"))) else fence + 1
    elif "```" in before or "```" in after:
        return s
    else:
        keep = fence
    logger.debug("stop_at_code_fence: line %d is a Markdown fence", fence)
    return replace(s, text="\n".join(lines[:keep]).rstrip())


def _is_fence(line: str) -> bool:
    return line.lstrip().startswith("```")


def _next_suffix_line(ctx: Context) -> str:
    if ctx.line_after.strip():
        return ctx.line_before + ctx.line_after
    return next((line for line in ctx.suffix_lines if line.strip()), "")


def fix_indentation(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Re-indent continuation lines with the document's tabs or spaces."""
    if "\n" not in s.text:
        return s
    uses_tabs, width = detect_indentation([*ctx.prefix_lines, ctx.line_before, *ctx.suffix_lines])
    if uses_tabs is None or (ctx.language == "makefile" and not uses_tabs):
        return s  # (a Makefile's recipes take tabs, whatever its other lines are indented with)
    first, *rest = s.text.split("\n")
    wrong = "  " if uses_tabs else "\t"
    if not any(wrong in _leading(line) for line in rest):
        return s
    unit = indent_unit(rest) if uses_tabs else width
    fixed = [_reindent(line, uses_tabs, unit) for line in rest]
    logger.debug("fix_indentation: %s, width %d", "tabs" if uses_tabs else "spaces", unit)
    return replace(s, text="\n".join([first, *fixed]))


def detect_indentation(lines: list[str]) -> tuple[bool | None, int]:
    """(uses tabs?, indent width in spaces) of the lines; (None, 4) when undecided."""
    tabs = sum(1 for line in lines if line.startswith("\t"))
    spaced = [line for line in lines if line.startswith(" ") and line.strip()]
    if not tabs and not spaced:
        return None, 4
    return (True, 4) if tabs > len(spaced) else (False, indent_unit(lines))


def indent_unit(lines: list[str]) -> int:
    """The most common indent step between consecutive non-blank lines (like VS Code's guess)."""
    widths = [indent_width(line) for line in lines if line.strip()]
    steps = Counter(abs(a - b) for a, b in pairwise(widths) if 0 < abs(a - b) <= 8)
    return steps.most_common(1)[0][0] if steps else 4


def _reindent(line: str, to_tabs: bool, unit: int) -> str:
    lead = _leading(line)
    width = indent_width(lead, unit)
    if to_tabs:
        return "\t" * (width // unit) + " " * (width % unit) + line[len(lead) :]
    return " " * width + line[len(lead) :]


def trim_repeated_suffix_lines(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Drop the suggestion's last lines when they repeat the lines after the cursor."""
    lines = s.text.split("\n")
    # (indent, text) of the next non-blank lines. The rest of the cursor line, on a line of its
    # own, goes at the cursor line's indentation: a deeper `}` closes a block of the suggestion.
    following = [(indent_width(line), line.strip()) for line in ctx.suffix_lines if line.strip()]
    if ctx.line_after.strip():
        following.insert(0, (indent_width(ctx.line_before), ctx.line_after.strip()))
    for n in range(1, len(lines)):  # longest repeated tail first
        tail = [(indent_width(line), line.strip()) for line in lines[n:] if line.strip()]
        if (
            tail
            and all(_repeats(t, f) for t, f in zip(tail, following, strict=False))
            and (len(tail) <= len(following))
        ):
            logger.debug("trim_repeated_suffix_lines: %d lines repeat the suffix", len(lines) - n)
            return replace(s, text="\n".join(lines[:n]).rstrip())
    return s


def _repeats(line: tuple[int, str], following: tuple[int, str]) -> bool:
    """(indent, text) `line` repeats `following`, maybe less the closers or `;` it ends with
    (`</div>` of `</div>;`, `}` of `});`): the document's line stays and ends it."""
    (indent, text), (indent_after, text_after) = line, following
    return (
        indent == indent_after
        and text_after.startswith(text)
        and LINE_REST_OK.match(text_after[len(text) :]) is not None
    )


def trim_closing_overlap(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Trim closing brackets/quotes at the end that the text after the cursor already has.

    Of the possible trims, keep the one that leaves the fewest bracket/quote errors around
    the cursor (`foo(bar(x)|)` keeps its `)`; `print("hi")|)` loses it). A trim never splits
    a triple quote: a suggestion that closes the docstring already closed after the cursor
    loses all three quotes, not one.
    """
    ahead = ctx.suffix.lstrip()
    text = s.text
    candidates = [
        k
        for k in range(1, min(len(text), len(ahead)) + 1)
        if text.endswith(ahead[:k])
        and LINE_REST_OK.match(ahead[:k])
        and ahead[:k].strip()
        and not _splits_triple_quote(text, len(text) - k)
    ]
    if not candidates:
        return s
    scores = {k: _errors_with(ctx, text[: len(text) - k], 0) for k in [0, *candidates]}
    # Ties go to the shortest trim, but a `;` or `,` (which the scan cannot score) is trimmed.
    best = min(scores, key=lambda k: (scores[k], -k if _unscored(ahead[:k]) else k))
    if best == 0:
        return s
    logger.debug("trim_closing_overlap: %r is already after the cursor", ahead[:best])
    return replace(s, text=text[: len(text) - best])  # (trim_space, next, takes the spaces)


def _unscored(overlap: str) -> bool:
    return not any(c in OPENERS + CLOSERS + QUOTES for c in overlap)


def _splits_triple_quote(text: str, cut: int) -> bool:
    """`text[cut - 1]` and `text[cut]` are the same quote in a run of three or more."""
    quote = text[cut : cut + 1]
    if not quote or quote not in QUOTES or text[cut - 1 : cut] != quote:
        return False
    before, after = text[:cut], text[cut:]
    return len(before) - len(before.rstrip(quote)) + len(after) - len(after.lstrip(quote)) >= 3


def _comment_style(language: str | None) -> str:
    """How the language's comments start: "#", "#word" (at a word's start), "//" (with /* */
    blocks), "--" or "<!--"; "" where unknown (none are skipped)."""
    for style, languages in (
        ("#", _HASH_COMMENTS),
        ("#word", _WORD_HASH_COMMENTS),
        ("//", _SLASH_COMMENTS),
        ("--", _DASH_COMMENTS),
        ("<!--", _TAG_COMMENTS),
    ):
        if language in languages:
            return style
    return ""


def line_comment(language: str | None) -> str | None:
    """What starts a line comment in the language (`#`, `//`, `--`); None where unknown."""
    style = _comment_style(language)
    return {"#": "#", "#word": "#", "//": "//", "--": "--"}.get(style)


def _comments_as_scanned(text: str, comments: str) -> str:
    """`text` with its comments written as the scan reads them: `#` ones, or `//` and
    /* */ ones (a Lua long comment goes, `--` becomes `//`, `<!-- -->` becomes /* */)."""
    if comments == "#word":
        return _HASH_IN_WORD.sub("_", text)
    if comments == "--":  # (a `//` there is Lua's floor division, no comment)
        return _LUA_LONG_COMMENT.sub(" ", text).replace("//", " ").replace("--", "//")
    if comments == "<!--":
        return text.replace("<!--", "/*").replace("-->", "*/")
    return text


def _errors_with(ctx: Context, text: str, replace_after: int) -> int:
    """Bracket errors of the cursor's scope and the lines after it once `text` is inserted."""
    after = ctx.line_after[replace_after:] + "\n" + "\n".join(ctx.suffix_lines[:5])
    return ctx.brackets_before.fed(ctx.scannable(text + after)).errors_at_end()


@dataclass(slots=True)
class _Brackets:
    """Where a left-to-right scan for bracket errors stands: the brackets open, the errors so
    far (closers with no opener, lines that end inside a string literal), the string literal
    it is in, and the comment it is in (`comments`: a _comment_style). Openers left open are
    no error: the text is a window of a larger file. Strings end with their line, but for a
    triple quote where `triple_quotes` (Python's docstrings)."""

    stack: list[str] = field(default_factory=list)
    errors: int = 0
    quote: str = ""  # the quote of the string literal the scan is in: `"`, or `"""`
    escaped: bool = False
    comments: str = ""
    comment: str = ""  # "line" or "block" while inside one
    triple_quotes: bool = False

    def fed(self, text: str) -> _Brackets:
        """The state after `text` (this one is left as it is)."""
        stack, errors, quote, escaped = list(self.stack), self.errors, self.quote, self.escaped
        comments, comment = self.comments, self.comment
        scanned = _NOT_SCANNED.sub(" ", _comments_as_scanned(text, comments))
        hashes = comments in ("#", "#word")
        slashes = ("/", "*") if comments in ("//", "--") else ("*",) if comments == "<!--" else ()
        skip = 0
        for i, ch in enumerate(scanned):
            if skip:
                skip -= 1
            elif comment == "block":
                if ch == "/" and scanned[i - 1 : i] == "*":
                    comment = ""
            elif ch == "\n":
                if len(quote) != 3:
                    errors += bool(quote)
                    quote = ""
                escaped, comment = False, ""
            elif comment:
                pass
            elif quote:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif scanned.startswith(quote, i):
                    quote, skip = "", len(quote) - 1
            elif ch == "\\":
                skip = 1  # `\(` in a regex literal or a shell word opens nothing
            elif ch in QUOTES:
                quote = ch * 3 if self.triple_quotes and scanned.startswith(ch * 3, i) else ch
                skip = len(quote) - 1
            elif ch in OPENERS:
                stack.append(ch)
            elif ch in CLOSERS:
                if stack and stack[-1] == _PAIRS[ch]:
                    stack.pop()
                else:
                    errors += 1
            elif hashes and ch == "#":
                comment = "line"
            elif ch == "/" and scanned[i + 1 : i + 2] in slashes:
                comment = "line" if scanned[i + 1] == "/" else "block"
        return _Brackets(stack, errors, quote, escaped, comments, comment, self.triple_quotes)

    def errors_at_end(self) -> int:
        return self.errors + bool(self.quote)


def drop_repeated_line(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Discard a one-line suggestion that only repeats the line above or below, indentation
    included (`return False` closing an outer block after an inner one's is no repeat)."""
    below = next((p.rstrip() for p in ctx.suffix_lines if p.strip()), None)
    if "\n" not in s.text:
        line = (ctx.line_before + s.text + ctx.line_after).rstrip()
        above = next((p.rstrip() for p in reversed(ctx.prefix_lines) if p.strip()), None)
    elif s.text.count("\n") == 1 and s.text.startswith("\n") and not ctx.line_after.strip():
        line, above = s.text[1:].rstrip(), ctx.line_before.rstrip()  # one new line below
    else:
        return s
    if line.strip() and line in (above, below) and len(s.text.strip()) > 1:
        logger.debug("drop_repeated_line: repeats an adjacent line")
        return None
    return s


def drop_blank(s: Suggestion, ctx: Context) -> Suggestion | None:
    if s.text.strip():
        return s
    logger.debug("drop_blank: nothing but whitespace")
    return None


def replace_line_rest(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Replace the rest of the cursor's line when the suggestion retypes it: all of it (`sum
    + |, 0);` suggested `item.price, 0);`), or its closers where that leaves fewer errors
    (`foo(bar(x|)` may well be suggested `x)`: there it does not)."""
    rest = ctx.line_after
    if not rest.strip() or s.replace_after:
        return s
    if (
        "\n" not in s.text
        and BLOCK_OPENER.search(s.text)
        and not ctx.brackets_before.quote  # (in a string it must close that string first)
        and not _Brackets().fed(s.text).errors
    ):
        return s  # `f(|);` suggested `(req, res) => {`: the closers come after that block
    if not LINE_REST_OK.match(rest):
        if "\n" in s.text or rest.strip() not in s.text:
            return s
        if _closes_own_element(s.text, rest):
            return s  # `<div>|</div>` suggested `<div class="body">Hi</div>`: an inner element
        errors = _errors_with(ctx, s.text, len(rest)), _errors_with(ctx, s.text, 0)
        if s.text.rstrip().endswith(rest.strip()) and errors[0] <= errors[1]:
            logger.debug("replace_line_rest: the suggestion ends by retyping %r", rest)
            return replace(s, replace_after=len(rest))
        if len(rest.strip()) > 1 and errors[0] < errors[1]:  # (`href="|">` got `/">Home</a>`)
            logger.debug("replace_line_rest: the suggestion retypes %r and goes on", rest)
            return replace(s, replace_after=len(rest))
        return s
    # Of the closers, as many as the suggestion retypes, where that leaves fewer errors
    # (`print(|);` suggested `"a") + b` replaces the `)` and keeps the `;`); ties go to the
    # most.
    retyped = [
        k
        for k in range(1, len(rest) + 1)
        if (k == len(rest) or not rest[k].isspace()) and _retypes(s.text, rest[:k])
    ]
    errors = {k: _errors_with(ctx, s.text, k) for k in [0, *retyped]}
    best = min(errors, key=lambda k: (errors[k], -k))
    if errors[best] < errors[0]:
        logger.debug("replace_line_rest: the suggestion retypes %r", rest[:best])
        return replace(s, replace_after=best)
    return s


def _retypes(text: str, typed: str) -> bool:
    """Every character of `typed` but spaces is in `text`, in order: `text` in place of
    `typed` loses nothing the user wrote."""
    chars = iter(text)
    return all(ch in chars for ch in typed if not ch.isspace())


def _closes_own_element(text: str, rest: str) -> bool:
    """`rest` starts with a closing tag, and every one of those in `text` closes an element
    `text` opens itself."""
    tag = re.match(r"\s*</([\w.:-]+)>", rest)
    if tag is None:
        return False
    name = re.escape(tag.group(1))
    return len(re.findall(rf"<{name}[\s>]", text)) >= len(re.findall(rf"</{name}>", text))


def closer_on_own_line(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Between braces the editor closed (`{|}`), a body on lines of its own ends with a line
    break and the cursor line's indentation: the brace goes below it, as Enter there puts it."""
    if not ctx.between_braces or "\n" not in s.text or s.replace_after:
        return s
    end = "\n" + _leading(ctx.line_before)
    if s.text.endswith(end):
        return s
    logger.debug("closer_on_own_line: the closing brace goes below the body")
    return replace(s, text=s.text.rstrip() + end)


def restore_line_endings(s: Suggestion, ctx: Context) -> Suggestion | None:
    if ctx.eol == "\n" or "\n" not in s.text:
        return s
    logger.debug("restore_line_endings: \\n -> %r", ctx.eol)
    return replace(s, text=s.text.replace("\n", ctx.eol))


FILTERS: tuple[Filter, ...] = (
    normalize_newlines,
    drop_unfinished_line,
    trim_space,
    start_on_cursor_line,
    cut_single_line,
    stop_at_code_fence,
    stop_at_block_end,
    fix_indentation,
    trim_repeated_suffix_lines,
    trim_closing_overlap,
    trim_space,
    drop_repeated_line,
    drop_blank,
    replace_line_rest,  # (before closer_on_own_line: a body that retypes the closers is done)
    closer_on_own_line,
    restore_line_endings,
)


def postprocess(
    s: Suggestion, ctx: Context, filters: tuple[Filter, ...] = FILTERS
) -> Suggestion | None:
    """Run the filters in order; None when one discards the suggestion."""
    current: Suggestion | None = s
    for f in filters:
        if current is None:
            return None
        current = f(current, ctx)
    return current
