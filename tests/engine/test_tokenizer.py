"""Tokenizers: ids equal the reference tokenizer's on real files and on fuzzed text; decoding
round-trips exactly, and streamed a token at a time."""

from __future__ import annotations

import random
import sysconfig
import unicodedata
from pathlib import Path

import pytest

from codelm.daemon import catalog
from codelm.daemon.engine.gguf_file import read_gguf_file
from codelm.daemon.engine.tokenizer import (
    StreamDecoder,
    Tokenizer,
    _byte_decoder,
    _byte_piece,
    _byte_table,
    tokenizer_from_gguf,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
REAL_FILES = ["json/decoder.py", "textwrap.py", "argparse.py", "dataclasses.py", "html/entities.py"]
ODD_TEXT = "naïve = 'café'  # 中文注释 🎉\r\n\tif x == 12345:\n\t\treturn '\\u00e9'   \n"


def _reference(path: Path):
    """transformers' tokenizer from a GGUF, splitting text as llama.cpp does for that model and
    reading special-token text in a document as plain text (as we do).

    transformers maps GGUF pre-tokenizer "smollm" to GPT-2's regex alone, but SmolLM2's own
    tokenizer.json (and llama.cpp) split digits one by one first; we follow the model's own.
    For "qwen2" it takes the regex of Qwen2.5's tokenizer.json but not its NFC normalizer:
    llama.cpp does not normalize either, and a prompt must round-trip the document exactly.
    Its `(?i:'s|...)` also reads "'ſ" as a contraction where llama.cpp's `'[sS]` does not; no
    Qwen token merges across that "ſ", so the ids are the same.
    """
    try:  # transformers 5: what AutoTokenizer builds, without its config read (12 s for Qwen)
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:
        ref = transformers.AutoTokenizer.from_pretrained(
            path.parent, gguf_file=path.name, split_special_tokens=True
        )
    else:
        architecture, vocab, _ = get_gguf_tokenizer(str(path))
        backend, _ = convert_gguf_tokenizer(architecture, vocab)
        ref = transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, split_special_tokens=True
        )
    if read_gguf_file(path)[0]["tokenizer.ggml.pre"] == "smollm":
        pre = tokenizers.pre_tokenizers
        ref.backend_tokenizer.pre_tokenizer = pre.Sequence(
            [
                pre.Digits(individual_digits=True),
                pre.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return ref


@pytest.fixture(scope="module")
def reference(default_model_path):
    """transformers' tokenizer from the default model's GGUF (_reference)."""
    return _reference(default_model_path)


@pytest.fixture(scope="module", params=["smollm2-135m", "default"], ids=["smollm2", "qwen"])
def model_tokenizers(request) -> tuple[Tokenizer, object]:
    """Ours (from the GGUF's metadata, without the weights) and the reference, for the suite's
    SmolLM2 and the product's default Qwen2.5-Coder."""
    path = catalog.fetch(request.param, log=lambda message: None)
    return tokenizer_from_gguf(read_gguf_file(path)[0]), _reference(path)


@pytest.mark.parametrize("name", REAL_FILES)
def test_bpe_ids_match_reference_on_stdlib_file(default_engine, reference, name):
    text = (STDLIB / name).read_text(encoding="utf-8")
    ours = default_engine.tokenizer.encode(text)
    assert ours == reference.encode(text, add_special_tokens=False)
    assert reference.decode(ours) == text
    assert default_engine.tokenizer.decode(ours) == text


def test_bpe_round_trips_non_ascii_and_crlf(default_engine, reference):
    ours = default_engine.tokenizer.encode(ODD_TEXT)
    assert ours == reference.encode(ODD_TEXT, add_special_tokens=False)
    assert default_engine.tokenizer.decode(ours) == ODD_TEXT


def test_special_token_text_in_a_document_is_encoded_as_plain_text(default_engine):
    tok = default_engine.tokenizer
    eos = tok.token_id("<|endoftext|>")
    ids = tok.encode("x = '<|endoftext|>'")
    assert eos is not None and eos not in ids
    assert tok.decode(ids) == "x = '<|endoftext|>'"


def test_encode_special_reads_special_texts_as_their_ids(default_engine):
    tok = default_engine.tokenizer
    eos, sep = tok.token_id("<|endoftext|>"), tok.token_id("<file_sep>")
    first, second = "def f(x):\n    return x\n", "x = '<|endof' + 'text|>'\n"
    ids = tok.encode_special(f"<file_sep>{first}<|endoftext|><file_sep>{second}")
    assert ids == [sep, *tok.encode(first), eos, sep, *tok.encode(second)]
    # Text without special-token text is encoded as `encode` does.
    assert tok.encode_special(ODD_TEXT) == tok.encode(ODD_TEXT)


def test_stream_decoder_never_splits_a_utf8_character(default_engine):
    tok = default_engine.tokenizer
    ids = tok.encode(ODD_TEXT)
    stream = tok.streamer()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == ODD_TEXT
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_holds_back_a_partial_character():
    pieces = [b"a", b"\xf0\x9f", b"\x8e\x89", b"b"]
    stream = StreamDecoder(pieces)
    assert [stream.push(i) for i in range(4)] == ["a", "", "🎉", "b"]


def _brute_force_consistent(tokenizer: Tokenizer, required: bytes) -> list[int]:
    return [i for i in range(tokenizer.vocab_size) if tokenizer.fits(i, required)]


def test_consistent_tokens_equal_a_pass_over_the_vocabulary_when_bytes_are_odd():
    pieces = [
        b"<s>",
        b"a",
        b"ab",
        b"abc",
        b"ab",
        b"",
        b"\xff",
        b"\xff\xff",
        b"a\xff",
        b"b",
        b"\xffa",
    ]
    tokenizer = Tokenizer(
        backend=None,
        kind="bpe",
        special={"<s>": 0},
        bos_id=None,
        eos_ids=frozenset(),
        add_bos=False,
        pieces=pieces,
    )
    for required in (b"", b"a", b"ab", b"abcd", b"\xff", b"\xff\xff\xff", b"a\xff", b"z", b"<s>"):
        got = tokenizer.consistent_tokens(required).tolist()
        assert got == _brute_force_consistent(tokenizer, required), required


def test_consistent_tokens_equal_a_pass_over_the_vocabulary_when_real(default_engine):
    tokenizer = default_engine.tokenizer
    for required in (b" ", b"        ", b"ret", b"return", b"\n", "é".encode(), b"self.assert"):
        got = tokenizer.consistent_tokens(required).tolist()
        assert got == _brute_force_consistent(tokenizer, required), required


def test_the_unused_tokens_padding_a_vocabulary_spell_nothing():
    """Qwen2.5's GGUF pads its vocabulary with 271 untrained `[PAD151665]` tokens (type 5,
    unused) whose head rows are as large as real ones: llama.cpp decodes them to nothing, and
    token healing must never pick one to go on with a healed `[`."""
    meta = read_gguf_file(catalog.fetch("default", log=lambda message: None))[0]
    unused = [i for i, kind in enumerate(meta["tokenizer.ggml.token_type"]) if kind == 5]
    ours = tokenizer_from_gguf(meta)
    assert len(unused) == 271 and ours.decode(unused) == ""
    for required in (b"[", b"[P", b"[PAD"):
        assert not set(ours.consistent_tokens(required).tolist()) & set(unused)


def test_byte_level_pieces_map_each_stand_in_to_its_byte_and_others_to_a_space():
    stand_ins = {b: c for c, b in _byte_decoder().items()}
    table = _byte_table()
    every_byte = "".join(stand_ins[b] for b in range(256))
    assert _byte_piece(every_byte, table) == bytes(range(256))
    # Characters that stand for no byte, below 256 (a real space, a soft hyphen) and above.
    assert _byte_piece("a b\u00ad€😀" + stand_ins[0], table) == b"a b   \x00"


# Fuzzed text: code-like pieces among the characters that trip tokenizers up. Strings with
# lone surrogates are left out: the daemon's JSON protocol cannot carry them.
FUZZ_CASES = 2000
_FUZZ_CODE = (
    *("def ", "return", "self.", "x", "_", "foo_bar", "__init__", "if", " else", "0x1F", "1e-9"),
    *("(", ")", "{", "}", "[", "]", ":", ";", ",", ".", "==", "->", "`", "#", "//", "/*", "\\"),
    *("'", '"', "'s", "'T", "'re", "'LL", "'d", "'ſ", "<", ">", "</div>", "<|", "|>", "\\n"),
    *("café", "naïve", "Straße", "İstanbul", "ﬁ", "ǅ", "K"),
    # Control tokens' text: plain text in a document. Not Qwen's user-defined "<tool_call>",
    # which llama.cpp, transformers and its tokenizer.json read as its token even so.
    *("<|endoftext|>", "<|fim_prefix|>", "<file_sep>", "<tool_call>", "</tool_call>"),
)
_FUZZ_SPACE = (
    *(" ", "  ", "\t", "\n", "\r", "\r\n", "\n\n", "\x0b", "\x0c", "\x85", "\u2028", "\u2029"),
    *("\u00a0", "\u1680", "\u2009", "\u3000", "\u180e", "\u200b", "\u200c", "\u200d", "\u2060"),
    *("\ufeff", "\x00", "\x1b", "\x06"),  # SmolLM2 has no token for byte 0x06
)
_FUZZ_UNICODE = (
    *("e\u0301", "é", "a\u0308\u0301\u0323", "\u1100\u1161\u11a8", "ᾈ", "กำ", "नमस्ते"),
    *("🎉", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "🧑\u200d💻", "🇩🇪", "1️⃣", "\ufe0f"),
    *("中文注释", "日本語", "한국어", "ｆｕｌｌ", "שלום", "مرحبا", "\u200f", "\u202e"),
    *("\U0001d7d8", "Ⅻ", "½", "٣", "²", "߀", "𝔘𝔫𝔦", "𐍈"),  # \p{N}, not ASCII digits
    *("\ue000", "\U000f0000", "\U0010fffd", "\uffff", "\ufdd0", "\ufffd"),
)


def _random_char(rng: random.Random) -> str:
    """Any character Python's Unicode tables assign (or private use): one newer than the
    tokenizers' regex tables would test their Unicode versions, not our code."""
    while True:
        low, high = rng.choice([(0, 0x80), (0x80, 0x800), (0x800, 0x10000), (0x10000, 0x110000)])
        c = chr(rng.randrange(low, high))  # 1 to 4 bytes of UTF-8 alike
        if unicodedata.category(c) not in ("Cs", "Cn"):
            return c


def _fuzz_text(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(1, 24)):
        kind = rng.random()
        if kind < 0.35:
            pieces.append(rng.choice(_FUZZ_CODE))
        elif kind < 0.55:
            pieces.append(rng.choice(_FUZZ_SPACE))
        elif kind < 0.75:
            pieces.append(rng.choice(_FUZZ_UNICODE))
        elif kind < 0.87:  # long runs: spaces, tabs, newlines, one digit, any digits
            run = rng.choice([" ", "\t", "\n", "0", "7", "0123456789"])
            pieces.append("".join(rng.choice(run) for _ in range(rng.randint(2, 40))))
        else:
            pieces.append("".join(_random_char(rng) for _ in range(rng.randint(1, 3))))
    text = "".join(pieces)
    form = rng.random()
    return unicodedata.normalize("NFD" if form < 0.1 else "NFC", text) if form < 0.2 else text


def _fuzz_texts(seed: int, n: int = FUZZ_CASES) -> list[str]:
    rng = random.Random(seed)
    return [_fuzz_text(rng) for _ in range(n)]


def _spellable(tokenizer: Tokenizer) -> frozenset[int]:
    """The bytes with a token of their own. SmolLM2 lacks 21 (0x04, 0x06, 0xf1, ...); encoding
    drops them, as llama.cpp and transformers do: no text holding them can round-trip."""
    return frozenset(p[0] for p in tokenizer.pieces if len(p) == 1)


def _spelt_only(text: str, spellable: frozenset[int]) -> str:
    return "".join(c for c in text if set(c.encode()) <= spellable)


def test_bpe_ids_match_reference_on_fuzzed_text(model_tokenizers):
    """Random code mixed with odd Unicode (combining marks, ZWJ emoji, RTL, BOM, NUL, lone \\r,
    NFD, private use, astral): the reference's ids, whose bytes are the text's, less those the
    vocabulary cannot spell."""
    tok, reference = model_tokenizers
    spellable = _spellable(tok)
    for text in _fuzz_texts(seed=1):
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert not set(ids) & tok.special_ids, text
        spelt = bytes(b for b in text.encode() if b in spellable)
        assert b"".join(tok.pieces[i] for i in ids) == spelt, text


def test_bpe_round_trips_fuzzed_text(model_tokenizers):
    """decode(encode(text)) is text, and encode_special reads only special texts as ids."""
    tok, _ = model_tokenizers
    rng, spellable = random.Random(2), _spellable(tok)
    specials = sorted(tok.special)
    for text in _fuzz_texts(seed=2):
        text = _spelt_only(text, spellable)
        assert tok.decode(tok.encode(text)) == text, text
        with_special = text[: len(text) // 2] + rng.choice(specials) + text[len(text) // 2 :]
        ids = tok.encode_special(with_special)
        assert tok.decode(ids) == with_special, with_special
        assert tok.has_special_text(with_special) and set(ids) & tok.special_ids, with_special
        if not tok.has_special_text(text):
            assert tok.encode_special(text) == tok.encode(text), text


def test_stream_decoder_yields_fuzzed_text_a_whole_character_at_a_time(model_tokenizers):
    """Ids pushed one at a time, after skipping a prefix that ends between two characters
    (token healing's): each push shows exactly the whole characters its bytes complete, never
    part of one, and the pushes and the flush make up the rest of the text."""
    tok, _ = model_tokenizers
    rng, spellable = random.Random(3), _spellable(tok)
    for text in _fuzz_texts(seed=3):
        text = _spelt_only(text, spellable)
        data = text.encode()
        skip = len(text[: rng.randint(0, len(text))].encode())
        stream = tok.streamer(skip=data[:skip])
        pushed, shown = 0, skip
        for i in tok.encode(text):
            pushed += len(tok.pieces[i])
            complete = pushed
            while complete < len(data) and data[complete] & 0xC0 == 0x80:  # a continuation
                complete -= 1
            piece = stream.push(i)
            assert piece.encode() == data[shown : max(shown, complete)], (text, skip, i)
            shown = max(shown, complete)
        assert shown == len(data) and stream.flush() == "", (text, skip)


def test_consistent_tokens_equal_a_pass_over_the_vocabulary_when_fuzzed(model_tokenizers):
    """Bytes cut from fuzzed text at any byte (so often within a character) or random ones:
    the bisecting lookup finds every token that fits, and only those."""
    tok, _ = model_tokenizers
    rng = random.Random(4)
    for text in _fuzz_texts(seed=4, n=25):
        data = text.encode()
        start = rng.randrange(len(data))
        required = data[start : start + rng.randint(1, 12)]
        if rng.random() < 0.2:
            required = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        got = tok.consistent_tokens(required).tolist()
        assert got == _brute_force_consistent(tok, required), required
