"""Tokenizers: HF `tokenizers` (tokenizer.json, or byte-level BPE rebuilt from GGUF vocab + merges)
and `sentencepiece` (tokenizer.model), behind one interface, plus a streaming detokenizer.

Document text is always encoded as plain text: a file that contains "<|endoftext|>" gets those
characters, not the special token. Special tokens enter prompts by id (prompt.py), or as text
only in a prompt a client lays out itself (`encode_special`).
"""

from __future__ import annotations

import bisect
import codecs
import json
import logging
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

# GGUF `tokenizer.ggml.pre` -> the split regexes llama.cpp applies before byte-level BPE
# (llama-vocab.cpp). The StarCoder family splits digits one by one.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_CODER_SPLITS = (
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}",
)
GGUF_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt-2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "refact": (r"\p{N}", _GPT2_SPLIT),
    "codeshell": (r"\p{N}", _GPT2_SPLIT),
    "qwen2": (_QWEN2_SPLIT,),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "deepseek-coder": _DEEPSEEK_CODER_SPLITS,
}

# GGUF token types (llama.cpp): 3 = control, 4 = user defined, 5 = unused (rows that pad the
# vocabulary: Qwen2.5's [PAD151665]...[PAD151935], untrained). A user-defined token is one the
# model's tokenizer.json adds without marking it special (Qwen's "<tool_call>"): text holding
# it is read as that token, by llama.cpp, transformers and tokenizer.json alike.
_CONTROL_TYPE = 3
_USER_DEFINED_TYPE = 4
_UNUSED_TYPE = 5


@cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in of each byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: b for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = 256 + n
            n += 1
    return {chr(c): b for b, c in mapping.items()}


@dataclass(slots=True)
class Tokenizer:
    """Text <-> ids for one model. `special` maps special-token text to its id."""

    backend: Any
    kind: str  # "bpe" | "sentencepiece"
    special: dict[str, int]
    bos_id: int | None
    eos_ids: frozenset[int]
    add_bos: bool
    pieces: list[bytes]  # id -> the bytes that token stands for (special tokens: their text)
    consistent_cache: dict[bytes, torch.Tensor] = field(default_factory=dict)
    special_ids: frozenset[int] = field(init=False)  # the ids of `special`
    # The ordinary tokens' pieces in byte order, and their ids (consistent_tokens' index).
    _keys: list[bytes] = field(init=False)
    _order: list[int] = field(init=False)
    # Splits text at special-token texts, longest first (None: the tokenizer has none).
    _special_split: re.Pattern[str] | None = field(init=False)

    def __post_init__(self) -> None:
        self.special_ids = frozenset(self.special.values())
        texts = sorted((t for t in self.special if t), key=len, reverse=True)
        self._special_split = (
            re.compile("(" + "|".join(map(re.escape, texts)) + ")") if texts else None
        )
        # At load, not on the first healed request: ~0.1 s for Qwen's 151k tokens.
        pieces = self.pieces
        self._order = [i for i, p in enumerate(pieces) if p and i not in self.special_ids]
        self._order.sort(key=pieces.__getitem__)
        self._keys = [pieces[i] for i in self._order]

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return _encode_without_dummy_prefix(self.backend, self.pieces, text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def has_special_text(self, text: str) -> bool:
        """Whether `text` holds the text of a special token (encode_special reads it so)."""
        return self._special_split is not None and self._special_split.search(text) is not None

    def encode_special(self, text: str) -> list[int]:
        """`encode`, except that each special-token text in `text` becomes that token's id, as
        llama.cpp's server reads a completion prompt. Never for document text."""
        if self._special_split is None:
            return self.encode(text)
        ids: list[int] = []
        # re.split with one group: the text between special texts at even places, them at odd.
        for i, part in enumerate(self._special_split.split(text)):
            if i % 2:
                ids.append(self.special[part])
            elif part:
                ids.extend(self.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    def token_id(self, text: str) -> int | None:
        return self.special.get(text)

    def streamer(self, skip: bytes = b"") -> StreamDecoder:
        return StreamDecoder(self.pieces, skip)

    def consistent_tokens(self, required: bytes) -> torch.Tensor:
        """Ids, ascending, of the tokens that `fits(id, required)`. Those that start with
        `required` are one run of the pieces in byte order, and those that are a proper prefix
        of it are looked up one length at a time: no pass over the vocabulary, which took
        ~175 ms for each new `required` on Qwen's 151k tokens, on a request's path."""
        ids = self.consistent_cache.get(required)
        if ids is None:
            keys, order = self._keys, self._order
            end = _successor(required)
            lo = bisect.bisect_left(keys, required)
            hi = len(keys) if end is None else bisect.bisect_left(keys, end)
            found = set(order[lo:hi])
            for n in range(1, len(required)):
                prefix = required[:n]
                at = bisect.bisect_left(keys, prefix)
                while at < len(keys) and keys[at] == prefix:
                    found.add(order[at])
                    at += 1
            ids = torch.tensor(sorted(found), dtype=torch.long)
            if len(self.consistent_cache) > 256:
                self.consistent_cache.clear()
            self.consistent_cache[required] = ids
        return ids

    def fits(self, token: int, required: bytes) -> bool:
        """Whether `token` is an ordinary token whose bytes start with `required` or are a
        prefix of it (one that can begin spelling `required`)."""
        piece = self.pieces[token]
        if not piece or token in self.special_ids:
            return False
        return piece.startswith(required) or required.startswith(piece)


# Encoded in front of a prompt part and dropped again, so sentencepiece's dummy prefix ("▁",
# a space) lands on it rather than on the part (as transformers' non-legacy Llama tokenizer).
_ANCHOR = "<unk>"


def _encode_without_dummy_prefix(backend: Any, pieces: list[bytes], text: str) -> list[int]:
    """Prompt parts are encoded one by one; each must not gain a leading space."""
    anchor = backend.encode(_ANCHOR)
    ids = backend.encode(_ANCHOR + text)
    if ids[: len(anchor)] == anchor:
        rest = ids[len(anchor) :]
        if b"".join(pieces[i] for i in rest) == text.encode():
            return rest
    return backend.encode(text)  # the anchor merged with the text: keep the plain encoding


class StreamDecoder:
    """Turns token ids into text pieces as they come, never splitting a UTF-8 character.

    The first `skip` bytes are dropped: text the prompt already holds (token healing).
    """

    def __init__(self, pieces: list[bytes], skip: bytes = b"") -> None:
        self._pieces = pieces
        self._skip = len(skip)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        data = self._pieces[token_id]
        if self._skip:
            dropped = min(self._skip, len(data))
            data, self._skip = data[dropped:], self._skip - dropped
        return self._decoder.decode(data)

    def flush(self) -> str:
        """End of output: bytes of an unfinished character are dropped, never shown as U+FFFD."""
        self._decoder.reset()
        return ""


def _byte_table() -> dict[int, str]:
    """str.translate's table from byte-level BPE text to latin-1 text of the same bytes: each
    stand-in character to the character of its byte's code, and the other characters below
    256 to a space (as _byte_piece takes those from 256 up)."""
    decoder = _byte_decoder()
    table = {ord(c): chr(b) for c, b in decoder.items()}
    table.update({i: " " for i in range(256) if chr(i) not in decoder})
    return table


def _byte_piece(token: str, to_latin1: dict[int, str]) -> bytes:
    """A byte-level BPE token's bytes, a space for each character that stands for no byte:
    one translate per token (0.05 s for a 151k vocabulary, against 0.46 s a character at a
    time)."""
    text = token.translate(to_latin1)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:  # characters from 256 up that stand for no byte
        return bytes(ord(c) if ord(c) < 256 else 32 for c in text)


def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelLoadError(
            f"GGUF tokenizer {model!r} is not supported yet (supported: gpt2 byte-level BPE); "
            "use the model's Hugging Face folder instead"
        )
    from tokenizers import AddedToken, Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = HFTokenizer(models.BPE(vocab, merges, ignore_merges=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    splits = GGUF_PRE_SPLITS.get(pre)
    if splits is None:
        logger.warning("unknown GGUF pre-tokenizer %r; using GPT-2's splitting", pre)
        splits = GGUF_PRE_SPLITS["default"]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    kinds = list(zip(tokens, types, strict=True))
    user_defined = [tok for tok, kind in kinds if kind == _USER_DEFINED_TYPE]
    backend.add_tokens([AddedToken(tok, special=False, normalized=False) for tok in user_defined])
    special = {tok: i for i, (tok, kind) in enumerate(kinds) if kind == _CONTROL_TYPE}
    special_ids = set(special.values())
    to_latin1 = _byte_table()
    pieces = [_byte_piece(tok, to_latin1) for tok in tokens]
    for i in special_ids:
        pieces[i] = tokens[i].encode()
    # An unused token spells nothing, as llama.cpp decodes it: token healing never picks one
    # (a healed `[` could have gone on as `PAD151665]`), and one decoded shows nothing.
    for i, kind in enumerate(types):
        if kind == _UNUSED_TYPE:
            pieces[i] = b""
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    return Tokenizer(
        backend=backend,
        kind="bpe",
        special=special,
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_ids=frozenset(i for i in (eos, eot) if i is not None),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        pieces=pieces,
    )


def tokenizer_from_folder(path: Path, config: dict[str, Any]) -> Tokenizer:
    settings = _read_json(path / "tokenizer_config.json")
    if (path / "tokenizer.json").exists():
        return _hf_tokenizer(path / "tokenizer.json", settings, config)
    if (path / "tokenizer.model").exists():
        return _sentencepiece_tokenizer(path / "tokenizer.model", settings, config)
    raise ModelLoadError(f"{path} has neither tokenizer.json nor tokenizer.model")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON ({exc})") from exc


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _hf_tokenizer(file: Path, settings: dict, config: dict) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer.from_file(str(file))
    # Encode document text literally; special tokens are inserted by id.
    backend.encode_special_tokens = True
    special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    pieces = _hf_pieces(backend, vocab_size, special)
    eos_ids = _eos_ids(config, settings, backend.token_to_id)
    bos = _token_text(settings.get("bos_token"))
    return Tokenizer(
        backend=backend,
        kind="bpe",
        special=special,
        bos_id=backend.token_to_id(bos) if bos else config.get("bos_token_id"),
        eos_ids=eos_ids,
        add_bos=bool(settings.get("add_bos_token", False)),
        pieces=pieces,
    )


def _hf_pieces(backend: Any, vocab_size: int, special: dict[str, int]) -> list[bytes]:
    to_latin1 = _byte_table()
    special_ids = set(special.values())
    byte_level = "ByteLevel" in json.dumps(backend.decoder.__getstate__(), default=str)
    pieces = []
    for i in range(vocab_size):
        tok = backend.id_to_token(i) or ""
        if i in special_ids or not byte_level:
            pieces.append(_sentencepiece_piece_bytes(tok) if not byte_level else tok.encode())
        else:
            pieces.append(_byte_piece(tok, to_latin1))
    return pieces


def _sentencepiece_piece_bytes(piece: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("▁", " ").encode()


def _eos_ids(config: dict, settings: dict, lookup: Any) -> frozenset[int]:
    ids = config.get("eos_token_id")
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    eos = _token_text(settings.get("eos_token"))
    if eos and lookup(eos) is not None:
        ids.add(lookup(eos))
    return frozenset(ids)


def _sentencepiece_tokenizer(file: Path, settings: dict, config: dict) -> Tokenizer:
    import sentencepiece as spm

    backend = spm.SentencePieceProcessor(model_file=str(file))
    size = backend.get_piece_size()
    special = {
        backend.id_to_piece(i): i
        for i in range(size)
        if backend.is_control(i) or backend.is_unknown(i) or _is_user_defined(backend, i)
    }
    pieces = []
    for i in range(size):
        piece = backend.id_to_piece(i)
        pieces.append(
            piece.encode() if i in special.values() else _sentencepiece_piece_bytes(piece)
        )
    eos_ids = _eos_ids(config, settings, lambda t: backend.piece_to_id(t))
    if backend.eos_id() >= 0:
        eos_ids = eos_ids | {backend.eos_id()}
    return Tokenizer(
        backend=backend,
        kind="sentencepiece",
        special=special,
        bos_id=backend.bos_id() if backend.bos_id() >= 0 else None,
        eos_ids=frozenset(eos_ids),
        add_bos=bool(settings.get("add_bos_token", True)),
        pieces=pieces,
    )


def _is_user_defined(backend: Any, i: int) -> bool:
    # sentencepiece exposes no is_user_defined; user-defined pieces (FIM markers) are the
    # angle-bracketed ones that are neither bytes nor ordinary pieces.
    piece = backend.id_to_piece(i)
    return piece.startswith(("<", "▁<")) and piece.endswith(">") and not backend.is_byte(i)


def _successor(prefix: bytes) -> bytes | None:
    """The least byte string above every string that starts with `prefix` (None: none is)."""
    stem = prefix.rstrip(b"\xff")
    return stem[:-1] + bytes([stem[-1] + 1]) if stem else None
