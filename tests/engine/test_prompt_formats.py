"""FIM prompt formats: the exact prompt each format builds, with small hand-built tokenizers.

Each tokenizer is a byte-level BPE without merges (one token per byte) plus the model family's
special tokens, saved as tokenizer.json and loaded by our loader: no downloads.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from codelm.daemon.cache import FileCache
from codelm.daemon.engine.engine import Engine
from codelm.daemon.engine.prompt import (
    FIM_FORMATS,
    WINDOW_STEP_CHARS,
    aixcoder_header,
    build_prompt,
    detect_fim,
    document_name,
    raw_prompt,
    trim_context,
    window_anchor,
    window_start,
)
from codelm.daemon.engine.tokenizer import Tokenizer, tokenizer_from_folder
from codelm.daemon.errors import ModelLoadError
from codelm.daemon.protocol import CompleteRequest, OpenAICompletionRequest, Snippet

# Special tokens (as in each family's tokenizer.json), BOS, EOS, add_bos_token.
FAMILIES = {
    "starcoder": (
        ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
        + ["<file_sep>"],
        "<|endoftext|>",
        "<|endoftext|>",
        False,
    ),
    "qwen": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>"]
        + ["<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"],
        None,
        "<|endoftext|>",
        False,
    ),
    "deepseek": (
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>"]
        + ["<｜fim▁end｜>", "<|EOT|>"],
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        True,
    ),
    "codellama": (
        ["<unk>", "<s>", "</s>", "▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"],
        "<s>",
        "</s>",
        True,
    ),
    # aiXcoder's tokenizer_config.json does not ask for BOS; its prompt spells `<s>` itself.
    "aixcoder": (
        ["<unk>", "<s>", "</s>", "▁<AIX-SPAN-PRE>", "▁<AIX-SPAN-MIDDLE>", "▁<AIX-SPAN-POST>"],
        "<s>",
        "</s>",
        False,
    ),
}

DOCUMENT = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"
CURSOR = DOCUMENT.index(" + b")  # after "return a"
PREFIX, SUFFIX = DOCUMENT[:CURSOR], DOCUMENT[CURSOR:]
PY_HEADER = "# the file path is: calc.py\n# the code file is written by Python\n"

EXPECTED = {
    # The file's name on a line of its own first, as in their repository-level training.
    "starcoder": f"<file_sep>calc.py\n<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>",
    "qwen": f"<|file_sep|>calc.py\n<|fim_prefix|><|fim_suffix|>{SUFFIX}<|fim_middle|>{PREFIX}",
    "deepseek": (
        f"<｜begin▁of▁sentence｜><｜fim▁begin｜>{PREFIX}<｜fim▁hole｜>{SUFFIX}<｜fim▁end｜>"
    ),
    "codellama": f"<s>▁<PRE>{PREFIX}▁<SUF>{SUFFIX}▁<MID>",
    "aixcoder": (
        f"<s>▁<AIX-SPAN-PRE>▁<AIX-SPAN-POST>{SUFFIX}▁<AIX-SPAN-MIDDLE>{PY_HEADER}{PREFIX}"
    ),
}


def _byte_tokenizer(
    folder: Path, specials: list[str], bos: str | None, eos: str, add_bos: bool
) -> Tokenizer:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = HFTokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    settings = {"bos_token": bos, "eos_token": eos, "add_bos_token": add_bos}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return tokenizer_from_folder(folder, {})


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    root = tmp_path_factory.mktemp("tokenizers")
    built = {name: _byte_tokenizer(root / name, *spec) for name, spec in FAMILIES.items()}
    built["plain"] = _byte_tokenizer(
        root / "plain", ["<|endoftext|>"], None, "<|endoftext|>", False
    )
    return built


def _prompt(tokenizer: Tokenizer, name: str, heal: bool = False):
    return build_prompt(
        tokenizer,
        FIM_FORMATS[name],
        DOCUMENT,
        CURSOR,
        path="calc.py",
        prefix_chars=10_000,
        suffix_chars=10_000,
        heal=heal,
    )


CONTEXT = (Snippet("util.py", "def half(x):\n    return x / 2"), Snippet("b.py", "B = 1\n"))


@pytest.mark.parametrize("name", ["starcoder", "qwen", "deepseek"])
def test_other_files_come_first_as_files_of_the_repository(tokenizers, name):
    fim = FIM_FORMATS[name]
    prompt = build_prompt(
        tokenizers[name],
        fim,
        DOCUMENT,
        CURSOR,
        path="calc.py",
        prefix_chars=10_000,
        suffix_chars=10_000,
        heal=False,
        context=CONTEXT,
    )
    text = tokenizers[name].decode(prompt.token_ids)
    if fim.file_sep is None:  # the model could not tell the files apart
        assert text == EXPECTED[name]
    else:
        sep = fim.file_sep
        files = f"{sep}util.py\ndef half(x):\n    return x / 2\n{sep}b.py\nB = 1\n"
        assert text == files + EXPECTED[name]


def test_the_context_is_cut_to_its_budget_nearest_the_document_first():
    assert trim_context(CONTEXT, 1000) == CONTEXT
    assert trim_context(CONTEXT, 34) == (Snippet("b.py", "B = 1\n"),)
    util = (Snippet("util.py", "def half(x):\n    return x / 2"),)
    assert trim_context(util, 20) == (Snippet("util.py", "def half(x):\n"),)
    assert trim_context(util, 13) == (Snippet("util.py", "def half(x):\n"),)
    assert trim_context(util, 12) == ()
    assert trim_context(CONTEXT, 0) == ()


def test_a_tokenizer_without_the_file_separator_gets_no_file_line(tokenizers):
    # StarCoder (1) and SmolLM have the FIM tokens but no <file_sep>.
    tokenizer = tokenizers["deepseek"]
    fim = FIM_FORMATS["deepseek"]
    named = dataclasses.replace(fim, file_sep="<file_sep>")
    text = build_prompt(
        tokenizer,
        named,
        DOCUMENT,
        CURSOR,
        path="calc.py",
        prefix_chars=999,
        suffix_chars=999,
        heal=False,
    )
    assert tokenizer.decode(text.token_ids) == EXPECTED["deepseek"]


@pytest.mark.parametrize(
    ("uri", "path", "language", "name"),
    [
        ("file:///src/main.rs", None, "rust", "main.rs"),
        ("file:///src/main.rs", "lib/x.rs", None, "lib/x.rs"),
        # An untitled buffer: Qwen2.5-Coder wrote Angular TypeScript for an empty Rust one.
        ("untitled:Untitled-1", None, "rust", "untitled.rs"),
        ("untitled:Untitled-2", None, "SQL", "untitled.sql"),
        ("untitled:Untitled-3", None, "dockerfile", "Dockerfile"),
        ("untitled:Untitled-4", None, "no-such-language", None),
        ("untitled:Untitled-5", None, None, None),
        # A notebook's cells read as a script of their language.
        ("file:///nb/analysis.ipynb", None, "python", "analysis.py"),
        ("file:///nb/a.IPYNB", "/nb/a.IPYNB", "julia", "/nb/a.jl"),
        ("file:///nb/analysis.ipynb", None, "no-such-language", "analysis.ipynb"),
    ],
)
def test_the_document_name_in_the_prompt(uri, path, language, name):
    assert document_name(uri, path, language) == name


def test_every_fim_format_has_a_prompt_test():
    assert set(EXPECTED) == set(FIM_FORMATS) == set(FAMILIES)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_fim_prompt_is_exactly_the_documented_string(tokenizers, name):
    tokenizer = tokenizers[name]
    prompt = _prompt(tokenizer, name)
    assert tokenizer.decode(prompt.token_ids) == EXPECTED[name]
    assert prompt.heal == b"" and prompt.fim is FIM_FORMATS[name]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_fim_special_tokens_are_single_ids_in_the_prompt(tokenizers, name):
    tokenizer, fmt = tokenizers[name], FIM_FORMATS[name]
    ids = _prompt(tokenizer, name).token_ids
    for marker in (fmt.prefix, fmt.suffix, fmt.middle):
        marker_id = tokenizer.token_id(marker)
        assert marker_id is not None and ids.count(marker_id) == 1
        # The same characters inside a document are text, never the special token.
        assert marker_id not in tokenizer.encode(f"x = '{marker}'")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_detect_fim_picks_the_format_from_special_tokens(tokenizers, name):
    assert detect_fim(tokenizers[name]) is FIM_FORMATS[name]


def test_detect_fim_without_fim_tokens_or_when_overridden(tokenizers):
    assert detect_fim(tokenizers["plain"]) is None
    assert detect_fim(tokenizers["qwen"], "none") is None
    assert detect_fim(tokenizers["plain"], "starcoder") is FIM_FORMATS["starcoder"]
    with pytest.raises(ModelLoadError, match="unknown FIM format .* known: auto, none, "):
        detect_fim(tokenizers["plain"], "fim-of-the-future")


def test_spm_prompt_heals_its_last_token_and_psm_only_inside_a_word(tokenizers):
    healed = _prompt(tokenizers["aixcoder"], "aixcoder", heal=True)
    plain = _prompt(tokenizers["aixcoder"], "aixcoder", heal=False)
    assert healed.token_ids == plain.token_ids[:-1]
    assert healed.heal == PREFIX[-1].encode()  # one byte = one token in these tokenizers
    tokenizer, fim = tokenizers["starcoder"], FIM_FORMATS["starcoder"]
    for cursor, heals in ((CURSOR, True), (CURSOR + 1, False), (CURSOR + 2, False)):
        prompt = build_prompt(
            tokenizer, fim, DOCUMENT, cursor, path=None, prefix_chars=999, suffix_chars=999
        )
        prefix = DOCUMENT[:cursor]
        assert prompt.heal == (prefix[-1].encode() if heals else b""), repr(prefix[-3:])
        kept = prefix[:-1] if heals else prefix
        pre, suf = (tokenizer.token_id(t) for t in (fim.prefix, fim.suffix))
        expected_start = [pre, *tokenizer.encode(kept), suf]
        assert prompt.token_ids[: len(expected_start)] == expected_start


def test_aixcoder_header_names_language_in_the_files_comment_syntax():
    assert aixcoder_header("calc.py") == PY_HEADER
    assert aixcoder_header("src/app.ts") == (
        "// the file path is: src/app.ts\n// the code file is written by TypeScript\n"
    )
    assert aixcoder_header("notes.txt") == ""
    assert aixcoder_header(None) == ""


def test_aixcoder_prompt_without_a_known_language_has_no_header(tokenizers):
    tokenizer = tokenizers["aixcoder"]
    prompt = build_prompt(
        tokenizer,
        FIM_FORMATS["aixcoder"],
        DOCUMENT,
        CURSOR,
        path=None,
        prefix_chars=10_000,
        suffix_chars=10_000,
        heal=False,
    )
    expected = f"<s>▁<AIX-SPAN-PRE>▁<AIX-SPAN-POST>{SUFFIX}▁<AIX-SPAN-MIDDLE>{PREFIX}"
    assert tokenizer.decode(prompt.token_ids) == expected


def test_healing_takes_back_a_partial_word_split_over_tokens(default_engine):
    tokenizer = default_engine.tokenizer
    assert [tokenizer.pieces[i] for i in tokenizer.encode(" wi")] == [b" w", b"i"]
    for text, healed in (
        ("def area(width):\n    return wi", b" wi"),  # " w" + "i": both leave the prompt
        ("def area(width):\n    return ", b" "),
        ("def area(width):\n    ", b"\n    "),
        ("x = values.app", b"app"),  # "." ends the word
    ):
        prompt = build_prompt(
            tokenizer, None, text, len(text), path=None, prefix_chars=999, suffix_chars=0
        )
        assert prompt.heal == healed, text
        assert tokenizer.decode(prompt.token_ids).endswith(text[: len(text) - len(healed)])


@pytest.mark.parametrize("name", list(EXPECTED))
def test_raw_prompt_of_the_documented_string_is_the_fim_prompt(tokenizers, name):
    # What a client that lays out the FIM template itself sends: the same ids (BOS not doubled).
    # Both heal only where the prompt ends in the prefix's text (SPM), not after a FIM token.
    tokenizer = tokenizers[name]
    built = _prompt(tokenizer, name, heal=FIM_FORMATS[name].order == "spm")
    raw = raw_prompt(tokenizer, EXPECTED[name])
    assert (raw.token_ids, raw.heal) == (built.token_ids, built.heal)


def _cold_completion(engine: Engine, request: OpenAICompletionRequest) -> str:
    """The completion from an empty KV cache: no reused rows to differ at a near-tie."""
    engine.cache = FileCache(budget_bytes=1 << 30, new_kv=engine.new_kv)
    return engine.complete_openai(request).items[0].text


def test_openai_prompt_laid_out_as_fim_completes_as_prompt_with_suffix(fim_engine):
    # A client's own FIM template (Tabby, Continue) in the layout codelm uses for Qwen (SPM),
    # sent without a suffix: the same ids as codelm's prompt, so the same text.
    before, after = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    fim = fim_engine.fim
    assert fim is FIM_FORMATS["qwen"]
    laid_out = f"{fim.prefix}{fim.suffix}{after}{fim.middle}{before}"
    ours = _cold_completion(
        fim_engine, OpenAICompletionRequest(prompt=before, suffix=after, max_tokens=8)
    )
    theirs = _cold_completion(fim_engine, OpenAICompletionRequest(prompt=laid_out, max_tokens=8))
    assert ours.startswith("return a + b")
    assert theirs == ours


def test_a_function_of_another_open_file_is_called_once_the_file_is_in_context(fim_engine):
    # Without the other file the model cannot know the name: Qwen2.5-Coder wrote `21.5`.
    # With it, its prompt (the snippet first, as a file of the repository) is cached as the
    # document's start: the next key reuses all of it.
    units = Snippet(
        "/proj/units.py",
        "def fahrenheit_from_celsius(degrees):\n    return degrees * 9 / 5 + 32\n",
    )
    text = "from units import *\n\nreading = 21.5\nshown = "

    def ask(text: str, context: tuple[Snippet, ...]):
        line = text.count("\n")
        character = len(text) - text.rfind("\n") - 1
        request = CompleteRequest(
            uri="file:///proj/main.py",
            text=text,
            line=line,
            character=character,
            trigger="invoked",
            single_line=True,
            max_tokens=16,
            context=context,
        )
        return fim_engine.complete(request)

    fim_engine.close_document("file:///proj/main.py")
    assert "fahrenheit" not in ask(text, ()).items[0].text
    with_context = ask(text, (units,))
    assert with_context.items[0].text == "fahrenheit_from_celsius(reading)"
    typed = ask(text + "fahr", (units,))
    assert typed.items[0].text == "enheit_from_celsius(reading)"
    assert typed.timings.prefilled_tokens <= 3 < typed.timings.cached_tokens
    fim_engine.close_document("file:///proj/main.py")


def test_after_a_long_line_the_prefix_window_is_not_empty():
    # The next line start after the window's lowest point was taken even where it is the
    # cursor's line start: after a line longer than the window (minified code, a data line)
    # the prompt held no text before the cursor at all. A narrow window (prefix_chars set
    # low, or narrowed for a short context) rounded its start up past the cursor.
    text = "x" * 10_000 + "\nb"
    assert window_start(text, 10_001, 8000) == 2048
    assert 0 < 10_001 - window_start(text, 10_001, 100) <= 100


def test_the_prefix_window_holds_text_before_the_cursor_within_its_reach():
    """Random documents (short lines among lines longer than a window), cursors and widths,
    with and without the anchor of an earlier window: the window starts before the cursor
    (unless at 0) and reaches back at most max_chars, a step more with an anchor."""
    rng = random.Random(0)
    for _ in range(5000):
        lengths = rng.choices([0, 1, 5, 40, 120, 3000, 9000], k=rng.randint(0, 200))
        text = "".join(f"{k}:" + "x" * n + "\n" for k, n in enumerate(lengths))
        cursor = rng.randint(0, len(text))
        max_chars = rng.choice([1, 2, 3, 100, 1000, 2048, 2400, 4095, 8000])
        anchor = None
        if rng.random() < 0.5:
            earlier = max(0, cursor - rng.randint(0, 3000))
            anchor = window_anchor(text, window_start(text, earlier, max_chars))
        held = cursor - window_start(text, cursor, max_chars, anchor)
        assert held > 0 or cursor == 0, (cursor, max_chars, anchor)
        assert held <= max_chars + WINDOW_STEP_CHARS * (anchor is not None)
