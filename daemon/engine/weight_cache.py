"""On-disk cache of quantised weights, so a model that had to be quantised at load (safetensors,
or GGUF types without an exact int4/int8 mapping) loads fast the second time.

One safetensors file per (model file, quantisation, torch version), in the user cache dir.
A file that replaces another for the same model name and quantisation (the model file, torch
or this format changed) removes the one it replaces, so upgrades leave no dead copies behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CACHE_VERSION = "3"  # bump when a format's meaning changes
_KEY_HEX = 24  # characters of the key's hash in a file name


def model_fingerprint(path: Path) -> str:
    """Identity of a model file or folder: names, sizes, mtimes and the first MiB of each file."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        with file.open("rb") as f:
            digest.update(f.read(1 << 20))
    return digest.hexdigest()


class WeightCache:
    """Quantised weights by layer name; `save` writes what `put` added since loading."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.tensors: dict[str, torch.Tensor] = {}
        self.meta: dict[str, str] = {}
        self.is_dirty = False
        self.error = ""  # why save() failed, for status
        if file.exists():
            self._load()

    @classmethod
    def for_model(cls, model_path: Path, quant: str, cache_dir: Path) -> WeightCache:
        key = f"{model_fingerprint(model_path)}:{quant}:{torch.__version__}:{CACHE_VERSION}"
        name = hashlib.sha256(key.encode()).hexdigest()[:_KEY_HEX]
        return cls(cache_dir / "weights" / f"{model_path.name}-{quant}-{name}.safetensors")

    def _load(self) -> None:
        from safetensors import safe_open

        try:
            with safe_open(self.file, framework="pt") as f:
                self.meta = dict(f.metadata() or {})
                self.tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except Exception as exc:  # (SafetensorError is no OSError) a cache is never needed
            logger.warning("ignoring unreadable weight cache %s: %s", self.file, exc)
            self.tensors, self.meta = {}, {}
            return
        self._drop_superseded()

    def get(self, name: str, asked: str):
        """The cached QuantizedWeight of layer `name` made when scheme `asked` was asked for, or
        None. (`auto` picks schemes by GGUF type, and that choice can change between versions:
        a layer cached under another choice is quantised again.)"""
        from codelm.quant.formats import from_tensors

        if self.meta.get(f"{name}.asked") != asked:
            return None
        return from_tensors(self.tensors, self.meta, prefix=f"{name}.")

    def put(self, name: str, qweight, asked: str) -> None:
        from codelm.quant.formats import to_tensors

        tensors, meta = to_tensors(qweight, prefix=f"{name}.")
        # Held in host memory until save(): a GPU keeps only the copy its kernels use.
        self.tensors.update({key: value.cpu() for key, value in tensors.items()})
        self.meta.update(meta)
        self.meta[f"{name}.asked"] = asked
        self.is_dirty = True

    def save(self) -> None:
        if not self.is_dirty:
            return
        from safetensors.torch import save_file

        partial = self.file.with_suffix(".partial")
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            save_file(self.tensors, str(partial), metadata=self.meta)
            os.replace(partial, self.file)
            logger.info("cached quantised weights in %s", self.file)
        except Exception as exc:  # read-only or full (SafetensorError): load without a cache
            logger.warning("could not write the weight cache %s: %s", self.file, exc)
            self.error = str(exc)
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
        else:
            self._drop_superseded()
        self.is_dirty = False

    def _drop_superseded(self) -> None:
        """Remove this file's predecessors: the files of the same model name and quantisation
        under another key, which no load of this version reads again."""
        stem = self.file.name.removesuffix(".safetensors")
        head = stem[:-_KEY_HEX]  # "{model name}-{quant}-", as for_model names it
        if len(stem) <= _KEY_HEX or not head.endswith("-"):
            return
        pattern = re.compile(re.escape(head) + f"[0-9a-f]{{{_KEY_HEX}}}\\.safetensors")
        removed = 0
        for path in self.file.parent.iterdir():
            if path != self.file and pattern.fullmatch(path.name):
                with contextlib.suppress(OSError):  # removed by another process meanwhile
                    size = path.stat().st_size
                    path.unlink()
                    removed += size
        if removed:
            logger.info("removed %.0f MB of superseded weight caches %s*", removed / 1e6, head)
