"""The sentencepiece path (tokenizer.model): our piece table decodes as sentencepiece does."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from codelm.daemon.engine.tokenizer import tokenizer_from_folder

spm = pytest.importorskip("sentencepiece")

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A small BPE sentencepiece model trained on stdlib code, with byte fallback."""
    out = tmp_path_factory.mktemp("spm")
    corpus = out / "corpus.txt"
    corpus.write_text((STDLIB / "textwrap.py").read_text() + (STDLIB / "shlex.py").read_text())
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out / "tokenizer"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=["<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
        bos_id=1,
        eos_id=2,
        unk_id=0,
        normalization_rule_name="identity",  # code models keep whitespace as is
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return out


def test_sentencepiece_round_trips_a_real_file_like_sentencepiece(folder):
    ours = tokenizer_from_folder(folder, {})
    ref = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    text = (STDLIB / "json" / "decoder.py").read_text() + "naïve = '中文' 🎉\n"
    ids = ours.encode(text)
    # Prompt parts carry no dummy prefix (no leading "▁"): the rest is sentencepiece's own.
    assert ids[1:] == ref.encode(text)[1:]  # only the first piece loses its "▁"
    assert ours.decode(ids) == ref.decode(ids) == text


def test_sentencepiece_decodes_bytes_of_unseen_characters(folder):
    ours = tokenizer_from_folder(folder, {})
    text = "naïve = '中文' 🎉\n"
    stream = ours.streamer()
    pieces = [stream.push(i) for i in ours.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_sentencepiece_user_defined_tokens_are_special(folder):
    ours = tokenizer_from_folder(folder, {})
    assert {"<fim_prefix>", "<fim_suffix>", "<fim_middle>"} <= set(ours.special)
    assert ours.eos_ids == {2} and ours.bos_id == 1 and ours.add_bos
