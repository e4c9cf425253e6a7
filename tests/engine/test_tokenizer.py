"""Tokenizers: ids equal the reference tokenizer's on real files; decoding round-trips exactly."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from codelm.daemon.engine.tokenizer import (
    StreamDecoder,
    Tokenizer,
    _byte_decoder,
    _byte_piece,
    _byte_table,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
REAL_FILES = ["json/decoder.py", "textwrap.py", "argparse.py", "dataclasses.py", "html/entities.py"]
ODD_TEXT = "naïve = 'café'  # 中文注释 🎉\r\n\tif x == 12345:\n\t\treturn '\\u00e9'   \n"


@pytest.fixture(scope="module")
def reference(default_model_path):
    """transformers' tokenizer from the same GGUF, pre-tokenized as SmolLM2's tokenizer.json is.

    transformers maps GGUF pre-tokenizer "smollm" to GPT-2's regex alone, but SmolLM2's own
    tokenizer.json (and llama.cpp) split digits one by one first; we follow the model's own.
    """
    ref = transformers.AutoTokenizer.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name
    )
    pre = tokenizers.pre_tokenizers
    ref.backend_tokenizer.pre_tokenizer = pre.Sequence(
        [pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return ref


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


def test_byte_level_pieces_map_each_stand_in_to_its_byte_and_others_to_a_space():
    stand_ins = {b: c for c, b in _byte_decoder().items()}
    table = _byte_table()
    every_byte = "".join(stand_ins[b] for b in range(256))
    assert _byte_piece(every_byte, table) == bytes(range(256))
    # Characters that stand for no byte, below 256 (a real space, a soft hyphen) and above.
    assert _byte_piece("a b\u00ad€😀" + stand_ins[0], table) == b"a b   \x00"
