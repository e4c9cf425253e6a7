"""Prompt building: FIM formats as data, and a file window laid out for KV prefix reuse.

The stable part goes first (header, then the prefix window whose start moves in large steps on
line boundaries), the part that changes with each keystroke last.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ModelLoadError
from ..protocol import Snippet

if TYPE_CHECKING:  # the engine that asks an inference server imports this module without torch
    from .tokenizer import Tokenizer


@dataclass(frozen=True, kw_only=True, slots=True)
class FimFormat:
    """Special-token texts of one fill-in-the-middle format. order: psm | spm."""

    name: str
    prefix: str
    suffix: str
    middle: str
    order: str = "psm"
    stop: tuple[str, ...] = ()  # extra tokens that end a completion
    file_sep: str | None = None  # starts a file's path line in repository-level training
    bos: bool = False  # starts with BOS even where the tokenizer adds none (aiXcoder's `<s>`)
    file_header: bool = False  # aiXcoder's path + language comment lines before the prefix


FIM_FORMATS: dict[str, FimFormat] = {
    f.name: f
    for f in (
        FimFormat(
            name="starcoder",
            prefix="<fim_prefix>",
            suffix="<fim_suffix>",
            middle="<fim_middle>",
            stop=("<|endoftext|>", "<file_sep>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
            file_sep="<file_sep>",
        ),
        FimFormat(
            name="qwen",
            prefix="<|fim_prefix|>",
            suffix="<|fim_suffix|>",
            middle="<|fim_middle|>",
            # SPM: 70.9% HumanEval infill against PSM's 54.9%, and typing appends to the
            # prompt instead of changing its middle (docs/models.md).
            order="spm",
            stop=("<|endoftext|>", "<|file_sep|>", "<|fim_pad|>", "<|repo_name|>", "<|im_end|>"),
            file_sep="<|file_sep|>",
        ),
        FimFormat(
            name="deepseek",
            prefix="<｜fim▁begin｜>",
            suffix="<｜fim▁hole｜>",
            middle="<｜fim▁end｜>",
            stop=("<｜end▁of▁sentence｜>", "<|EOT|>"),
        ),
        FimFormat(
            name="codellama", prefix="▁<PRE>", suffix="▁<SUF>", middle="▁<MID>", stop=("▁<EOT>",)
        ),
        FimFormat(
            name="aixcoder",
            prefix="▁<AIX-SPAN-PRE>",
            suffix="▁<AIX-SPAN-POST>",
            middle="▁<AIX-SPAN-MIDDLE>",
            order="spm",
            stop=("</s>",),
            bos=True,
            file_header=True,
        ),
    )
}
# `fim = "server"`, for a model that is an inference server's URL: send the prefix as `prompt`
# and the suffix as `suffix`; the server lays out the FIM prompt (Ollama and codelm do; others
# may drop the suffix).
SERVER_FIM = "server"
FIM_SETTINGS = ("auto", "none", SERVER_FIM, *FIM_FORMATS)  # what the `fim` setting may be

# Line-comment syntax by file extension, for the file-path header of prefix-only prompts.
_HASH_COMMENT = {".py", ".sh", ".rb", ".pl", ".r", ".toml", ".yaml", ".yml", ".jl", ".nim", ".ps1"}
_DASH_COMMENT = {".lua", ".sql", ".hs", ".elm"}

# aiXcoder's header language by extension: (name as trained, comment open, comment close),
# from aiXcoder-7B's hf_mini/utils.py (LANGUAGE_TAG, LANGUAGE_WRAPPER); other files get none.
_AIX_LANGUAGES = {
    ".py": ("Python", "# ", ""),
    ".sh": ("Shell", "# ", ""),
    ".rb": ("Ruby", "# ", ""),
    ".r": ("R", "# ", ""),
    ".c": ("C", "// ", ""),
    ".h": ("C++", "// ", ""),
    ".cc": ("C++", "// ", ""),
    ".cpp": ("C++", "// ", ""),
    ".hpp": ("C++", "// ", ""),
    ".cs": ("C#", "// ", ""),
    ".java": ("Java", "// ", ""),
    ".js": ("JavaScript", "// ", ""),
    ".jsx": ("JavaScript", "// ", ""),
    ".ts": ("TypeScript", "// ", ""),
    ".tsx": ("TypeScript", "// ", ""),
    ".go": ("Go", "// ", ""),
    ".rs": ("Rust", "// ", ""),
    ".kt": ("Kotlin", "// ", ""),
    ".scala": ("Scala", "// ", ""),
    ".swift": ("swift", "// ", ""),
    ".php": ("PHP", "// ", ""),
    ".dart": ("Dart", "// ", ""),
    ".lua": ("Lua", "// ", ""),
    ".sql": ("SQL", "-- ", ""),
    ".css": ("CSS", "/* ", " */"),
    ".html": ("HTML", "<!--", "-->"),
}

# The prefix window starts on a line boundary at or after a multiple of this many characters,
# so it moves in large steps, not with every keystroke (which would defeat KV reuse).
WINDOW_STEP_CHARS = 2048


def detect_fim(tokenizer: Tokenizer, override: str = "auto") -> FimFormat | None:
    """The FIM format whose special tokens the tokenizer has; None means prefix-only."""
    if override == "none":
        return None
    if override != "auto":
        if override not in FIM_FORMATS:
            known = ", ".join(name for name in FIM_SETTINGS if name != SERVER_FIM)
            raise ModelLoadError(f"fim: unknown FIM format {override!r}; known: {known}")
        return FIM_FORMATS[override]
    for fmt in FIM_FORMATS.values():
        if all(tokenizer.token_id(t) is not None for t in (fmt.prefix, fmt.suffix, fmt.middle)):
            return fmt
    return None


def comment_header(path: str | None) -> str:
    if not path:
        return ""
    ext = os.path.splitext(path)[1].lower()
    if ext in _HASH_COMMENT:
        return f"# {path}\n"
    if ext in _DASH_COMMENT:
        return f"-- {path}\n"
    if ext in (".html", ".xml", ".md", ".vue", ".svelte"):
        return f"<!-- {path} -->\n"
    return f"// {path}\n"


def file_line(fim: FimFormat, path: str | None) -> str:
    """`{file_sep}{path}\n`, the line that names a file in the repository-level prompts of
    formats that have one (Qwen2.5-Coder, StarCoder2), before the FIM tokens; "" without
    either. Without it the model cannot tell the language of a short file."""
    if fim.file_sep is None or not path:
        return ""
    return f"{fim.file_sep}{path}\n"


def aixcoder_header(path: str | None) -> str:
    """`# the file path is: {path}\n# the code file is written by {Language}\n`, in the file's
    comment syntax; empty for a file whose language aiXcoder was not trained to name."""
    language = _AIX_LANGUAGES.get(os.path.splitext(path or "")[1].lower())
    if language is None:
        return ""
    name, open_, close = language
    return (
        f"{open_}the file path is: {path}{close}\n"
        f"{open_}the code file is written by {name}{close}\n"
    )


ANCHOR_CHARS = 256  # how much text from the window start identifies it after edits elsewhere


def window_anchor(text: str, start: int) -> str:
    return text[start : start + ANCHOR_CHARS]


def window_start(text: str, cursor: int, max_chars: int, anchor: str | None = None) -> int:
    """Start of the prefix window: a line start that stays put while the user types nearby.

    `anchor` is the text the previous window of this document started with: if it is still
    there, within reach of the cursor, the window keeps starting there, so an edit above the
    window (which shifts every offset) costs no recomputation. Of its copies within reach the
    earliest: a copy pasted near the cursor (a function duplicated to edit it) would shrink
    the window to a few lines.
    """
    if cursor <= max_chars:
        return 0
    # (A window of a step or less moves in steps of half of it: rounded up to a multiple of
    # a whole step, its start could pass the cursor.)
    step = WINDOW_STEP_CHARS if max_chars > WINDOW_STEP_CHARS else max(1, max_chars // 2)
    if anchor:
        found = text.find(anchor, max(0, cursor - max_chars - step), cursor)
        while found >= 0:
            if found == 0 or text[found - 1] == "\n":
                return found
            found = text.find(anchor, found + 1, cursor)
    lowest = cursor - max_chars
    target = -(-lowest // step) * step  # (before the cursor)
    line_start = text.rfind("\n", 0, target) + 1
    if line_start >= lowest:
        return line_start
    # The line there starts too far back: the next line, unless that keeps less than half
    # of the window from `target` (after a long line, none of it); then from mid-line.
    line_start = text.find("\n", target, cursor) + 1
    if line_start and cursor - line_start >= max(1, (cursor - target) // 2):
        return line_start
    return target


def suffix_window_chars(setting: int, trigger: str) -> int:
    """Characters after the cursor a prompt holds (`setting`: the suffix_chars setting). While
    typing (`automatic`) a third: a PSM prompt runs the suffix again on every key that changes
    the prefix, an SPM prompt on every move of the cursor."""
    return setting // (3 if trigger == "automatic" else 1)


def path_from_uri(uri: str) -> str | None:
    """The file name a `file://` URI ends with, for the prompt's file-path header."""
    if uri.startswith("file://"):
        return os.path.basename(uri[len("file://") :])
    return None


def document_name(uri: str, path: str | None, language: str | None) -> str | None:
    """The name the prompt gives a document: its path, the name its `file:` URI ends with,
    or for one without a file (an editor's `untitled:` buffer) a name its language id gives
    it (`rust` -> `untitled.rs`), so the model still knows the language. A notebook's cells
    read as a script of their language: `analysis.ipynb` -> `analysis.py`."""
    name = path or path_from_uri(uri)
    ending = _LANGUAGE_ENDINGS.get((language or "").lower())
    if name and name.lower().endswith(NOTEBOOK_ENDING) and ending and ending[0] == ".":
        return name[: -len(NOTEBOOK_ENDING)] + ending
    if name or ending is None:
        return name
    return ending if ending[0].isupper() else f"untitled{ending}"


NOTEBOOK_ENDING = ".ipynb"

# Editors' language ids (VS Code's, which Neovim and LSP4IJ mostly share) -> a file ending,
# or a whole name for files known by name.
_LANGUAGE_ENDINGS = {
    "python": ".py",
    "javascript": ".js",
    "typescript": ".ts",
    "javascriptreact": ".jsx",
    "typescriptreact": ".tsx",
    "go": ".go",
    "rust": ".rs",
    "c": ".c",
    "cpp": ".cpp",
    "csharp": ".cs",
    "java": ".java",
    "kotlin": ".kt",
    "swift": ".swift",
    "ruby": ".rb",
    "php": ".php",
    "shellscript": ".sh",
    "sh": ".sh",
    "bash": ".sh",
    "sql": ".sql",
    "html": ".html",
    "css": ".css",
    "scss": ".scss",
    "less": ".less",
    "json": ".json",
    "jsonc": ".json",
    "yaml": ".yaml",
    "toml": ".toml",
    "markdown": ".md",
    "lua": ".lua",
    "r": ".r",
    "scala": ".scala",
    "dart": ".dart",
    "haskell": ".hs",
    "elixir": ".ex",
    "perl": ".pl",
    "powershell": ".ps1",
    "vue": ".vue",
    "svelte": ".svelte",
    "zig": ".zig",
    "julia": ".jl",
    "objective-c": ".m",
    "cuda-cpp": ".cu",
    "xml": ".xml",
    "latex": ".tex",
    "dockerfile": "Dockerfile",
    "makefile": "Makefile",
}


def suffix_window(text: str, cursor: int, max_chars: int) -> str:
    """The text after the cursor, cut at a line end within `max_chars`."""
    end = cursor + max_chars
    if end >= len(text):
        return text[cursor:]
    newline = text.rfind("\n", cursor, end)
    return text[cursor : newline + 1] if newline >= 0 else text[cursor:end]


@dataclass(frozen=True, kw_only=True, slots=True)
class Prompt:
    token_ids: list[int]
    prefix_start: int  # document offset where the prefix window starts
    fim: FimFormat | None
    heal: bytes = b""  # the prompt's last token, removed for the model to spell again


def _heal(tokenizer: Tokenizer, ids: list[int]) -> bytes:
    """Pop the last token of `ids` (the text just before the cursor) and return its bytes; when
    it continues a word that earlier tokens began, pop those too (up to the word's start).

    Text at the cursor often ends inside what the model would write as one token (indentation,
    half a word); letting the model choose those tokens again is token healing. A partial word
    can be split oddly: SmolLM2 writes "return wi" as "return", " w", "i", and healing "i"
    alone made it continue "i * wi"; healing " wi" lets it choose " width".
    """
    special = tokenizer.special_ids
    if len(ids) < 2 or ids[-1] in special:
        return b""
    healed = tokenizer.pieces[ids.pop()]
    while (
        len(ids) >= 2
        and len(healed) < _HEAL_MAX_BYTES
        and _is_word(healed)
        and ids[-1] not in special
        and _is_word(tokenizer.pieces[ids[-1]].removeprefix(b" "))
    ):
        healed = tokenizer.pieces[ids.pop()] + healed
    return healed


_HEAL_MAX_BYTES = 24


def _is_word(piece: bytes) -> bool:
    """Letters, digits and `_` only (bytes of non-ASCII letters count)."""
    return bool(piece) and all(b >= 0x80 or chr(b).isalnum() or b == 0x5F for b in piece)


def build_prompt(
    tokenizer: Tokenizer,
    fim: FimFormat | None,
    text: str,
    cursor: int,
    *,
    path: str | None,
    prefix_chars: int,
    suffix_chars: int,
    anchor: str | None = None,
    heal: bool = True,
    context: Sequence[Snippet] = (),
) -> Prompt:
    """Token ids for completing `text` at string offset `cursor`.

    Each part is encoded on its own, so the ids of the stable parts do not depend on the rest.
    `heal=False` keeps the prompt's last token (no token healing; for comparisons). `context`:
    other files' snippets, each read as a file of the repository before this one, where the
    FIM format names files (see context_ids).
    """
    start = window_start(text, cursor, prefix_chars, anchor)
    prefix = text[start:cursor]
    add_bos = tokenizer.add_bos or (fim is not None and fim.bos)
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    prefix_ids = tokenizer.encode(prefix)
    if fim is None:
        healed = _heal(tokenizer, prefix_ids) if heal else b""
        ids = bos + tokenizer.encode(comment_header(path)) + prefix_ids
        if not ids:
            # An empty document: start where a new document starts in training, after a
            # document boundary token.
            ids = [tokenizer.bos_id if tokenizer.bos_id is not None else min(tokenizer.eos_ids)]
        return Prompt(token_ids=ids, prefix_start=start, fim=None, heal=healed)
    suffix = suffix_window(text, cursor, suffix_chars)
    pre, suf, mid = (tokenizer.token_id(t) for t in (fim.prefix, fim.suffix, fim.middle))
    head = bos + context_ids(tokenizer, fim, context) + _file_line_ids(tokenizer, fim, path)
    if fim.order == "spm":
        healed = _heal(tokenizer, prefix_ids) if heal else b""
        header = tokenizer.encode(aixcoder_header(path)) if fim.file_header else []
        ids = head + [pre, suf] + tokenizer.encode(suffix) + [mid] + header + prefix_ids
        return Prompt(token_ids=ids, prefix_start=start, fim=fim, heal=healed)
    # PSM: inside a word, the prefix's last token leaves the prefix and the middle starts by
    # spelling it (without, Qwen2.5-Coder continued "_a" with "append"). After whitespace or
    # punctuation it stays: healing there cost 3 of 213 HumanEval lines (docs/models.md).
    inside_word = prefix[-1:].isalnum() or prefix.endswith("_")
    healed = _heal(tokenizer, prefix_ids) if heal and inside_word else b""
    ids = head + [pre] + prefix_ids + [suf] + tokenizer.encode(suffix) + [mid]
    return Prompt(token_ids=ids, prefix_start=start, fim=fim, heal=healed)


def trim_context(context: Sequence[Snippet], max_chars: int) -> tuple[Snippet, ...]:
    """The snippets that fit in `max_chars` of text, the ones nearest the document (the last)
    first: earlier ones are left out whole. The last one, too long alone, keeps its first
    lines that fit."""
    kept: list[Snippet] = []
    left = max_chars
    for snippet in reversed(context):
        if len(snippet.text) <= left:
            kept.append(snippet)
            left -= len(snippet.text)
            continue
        if not kept and (cut := snippet.text.rfind("\n", 0, left)) >= 0:
            kept.append(Snippet(snippet.path, snippet.text[: cut + 1]))
        break
    return tuple(reversed(kept))


def context_ids(tokenizer: Tokenizer, fim: FimFormat, context: Sequence[Snippet]) -> list[int]:
    """`{file_sep}{path}\n{text}\n` for each snippet, as repository-level training prompts
    lay out the files before the one being completed (Qwen2.5-Coder, StarCoder2); none for a
    format without a file separator token, where the model could not tell the files apart."""
    file_sep = tokenizer.token_id(fim.file_sep) if fim.file_sep else None
    if file_sep is None:
        return []
    ids: list[int] = []
    for snippet in context:
        ids += [file_sep, *tokenizer.encode(snippet_file(snippet))]
    return ids


def snippet_file(snippet: Snippet) -> str:
    """A snippet as a file of the repository after its separator: `{path}\n{text}\n`."""
    return snippet.path + "\n" + snippet.text.removesuffix("\n") + "\n"


def _file_line_ids(tokenizer: Tokenizer, fim: FimFormat, path: str | None) -> list[int]:
    """file_line as tokens: the separator as its token, the path as plain text; none where
    the tokenizer has no separator token (StarCoder 1, SmolLM)."""
    file_sep = tokenizer.token_id(fim.file_sep) if fim.file_sep and path else None
    if file_sep is None:
        return []
    return [file_sep, *tokenizer.encode(f"{path}\n")]


def raw_prompt(tokenizer: Tokenizer, text: str) -> Prompt:
    """Token ids for continuing `text` as a client laid it out (Tabby's and Continue's own FIM
    templates): its special-token texts are those tokens, as llama.cpp's server reads them.

    BOS and token healing as build_prompt's prefix-only prompt; healing stops at a special last
    token (`<fim_middle>`), and a BOS the text already starts with is not doubled.
    """
    ids = tokenizer.encode_special(text)
    healed = _heal(tokenizer, ids)
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    if ids[:1] == bos:
        bos = []
    return Prompt(token_ids=bos + ids, prefix_start=0, fim=None, heal=healed)
