"""codelm's own C kernels (kernels_x86.c), compiled on first use by the machine's C compiler.

torch has no fast int8/int4 path on x86 CPUs without bf16 hardware, so these are built here,
for this CPU (-march=native), and cached by a hash of the source, compiler and CPU. Without a
compiler, or on a CPU without AVX2, they are simply not candidates: the torch kernels remain.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels_x86.c")
_ABI = 28
_FLAGS = ("-O3", "-fopenmp", "-fPIC", "-std=c11")
_LINK_FLAGS = ("-shared", "-fopenmp")
# kernels_x86.c's parts (its PARTS comment): compiled at once, one object each, then linked.
_PARTS = (1, 2, 3)
_ARCH = ("-march=native",)
# CODELM_NATIVE_SANITIZE=1 (`make sanitize`): built with AddressSanitizer and UBSan (and its
# float-to-int overflow check, which `undefined` leaves out), every report fatal. Only a
# process that preloads their runtimes can load that build.
_SANITIZE = (
    "-fsanitize=address,undefined,float-cast-overflow",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
)
_COMPILE_TIMEOUT_S = 120
UNUSED_DAYS = 30  # a library no process opened for this long is removed at the next build

_loaded: ctypes.CDLL | str | None = None
_arch = _ARCH  # what library() builds for (limit_to_avx2 narrows it)
_lock = threading.Lock()  # held while the library is built and loaded


def library(build_dir: Path | None = None) -> ctypes.CDLL | str:
    """The loaded kernel library, or why there is none. The first call builds (4-5 s on 2
    cores) or reuses a build under `build_dir` (None: a temporary folder, removed once
    loaded); later calls return the same result wherever they ask, waiting for a build that
    prepare() started."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load(build_dir, _arch)
            if isinstance(_loaded, str):
                logger.info("native int8/int4 kernels unavailable: %s", _loaded)
        return _loaded


def prepare(build_dir: Path) -> threading.Thread | None:
    """Start library(build_dir) in a background thread and return it (None where the library
    is loaded or being loaded already): the engine calls this before it reads a model, so a
    first build overlaps the reading (the compiler runs in its own process), and the build
    lands in the cache even where only attention and norms use it (--quant fp32)."""
    if _loaded is not None or _lock.locked():
        return None
    thread = threading.Thread(
        target=library, args=(build_dir,), name="codelm-native-build", daemon=True
    )
    thread.start()
    return thread


def loaded() -> ctypes.CDLL | None:
    """The library where an earlier library() call loaded it, else None; for work that has a
    plain fallback and should not decide where the library is built."""
    return _loaded if isinstance(_loaded, ctypes.CDLL) else None


def limit_to_avx2() -> None:
    """Build the kernels for AVX2 alone (-march=haswell) instead of this CPU, so this process
    runs codelm's own code as an AVX2-only CPU would (dispatch.limit_to_avx2 says why). Before
    the first library() call only: a loaded build cannot be swapped under its kernels."""
    global _arch
    with _lock:
        if _loaded is not None:
            raise RuntimeError("the native kernels are already loaded")
        _arch = ("-march=haswell",)


def build_key() -> str:
    """Identifies the loaded build (source, compiler, flags, CPU); "" before or without one:
    timings of another build must not rank this one."""
    return getattr(_loaded, "codelm_build_key", "")


def _load(build_dir: Path | None, arch: tuple[str, ...] = _ARCH) -> ctypes.CDLL | str:
    """Build (or reuse) and open the library; `arch`: the target flags (tests build the
    AVX2-only variants of the kernels on a CPU that has more)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it is written for x86-64, this is {platform.machine()}"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return "no C compiler found (install gcc, or set CC)"
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{compiler} does not run: {exc}"
    sanitize = _SANITIZE if os.environ.get("CODELM_NATIVE_SANITIZE") == "1" else ()
    flags, link_flags = (*_FLAGS, *arch, *sanitize), (*_LINK_FLAGS, *sanitize)
    key = hashlib.sha256(
        "\0".join(
            (SOURCE.read_text(), compiler, version, " ".join((*flags, *link_flags)), _cpu_id())
        ).encode()
    ).hexdigest()[:16]
    name = f"kernels-{key}.so"
    if build_dir is not None:
        if (Path(build_dir) / name).exists() or _writable(Path(build_dir)):
            return _build_and_open(compiler, flags, link_flags, Path(build_dir) / name, key)
        logger.warning(
            "cannot write to %s: the native kernels are built in a temporary folder, at each start",
            build_dir,
        )
    with tempfile.TemporaryDirectory(prefix="codelm-kernels-") as tmp:
        return _build_and_open(compiler, flags, link_flags, Path(tmp) / name, key)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _build_and_open(
    compiler: str, flags: tuple[str, ...], link_flags: tuple[str, ...], path: Path, key: str
) -> ctypes.CDLL | str:
    if path.exists():
        with contextlib.suppress(OSError):  # in use: kept by _drop_unused
            os.utime(path)
    else:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            failed = _compile(compiler, flags, link_flags, tmp)
            if failed is not None:
                tmp.unlink(missing_ok=True)
                return f"compiling {SOURCE.name} failed: {failed}"
            os.replace(tmp, path)  # atomic: a concurrent process sees no half-written library
        except (OSError, subprocess.SubprocessError) as exc:  # e.g. a read-only cache dir
            return f"compiling {SOURCE.name} into {path.parent} failed: {exc}"
        logger.info("built native kernels %s", path)
        _drop_unused(path.parent)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        return f"loading {path} failed: {exc}"
    if lib.codelm_kernels_abi() != _ABI:
        return f"{path} has another ABI version"
    p, i64, i32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int
    lib.codelm_q8_linear.argtypes = (p, i64, i64, p, p, i64, i64, i32, i64, p, c_int)
    lib.codelm_q4_linear.argtypes = (p, i64, i64, p, p, p, i64, i64, i64, p, c_int)
    lib.codelm_q5_linear.argtypes = (p, i64, i64, p, p, i64, i64, i64, p, c_int)
    lib.codelm_q8_linear.restype = lib.codelm_q4_linear.restype = c_int
    lib.codelm_q5_linear.restype = lib.codelm_pack_q5.restype = c_int
    lib.codelm_pack_q5.argtypes = (p, i64, i64, p, c_int)
    lib.codelm_unpack_gguf_int8.argtypes = (p, i64, c_int, p, p, c_int)
    lib.codelm_q5_rows.argtypes = (p, p, i64, i64, i64, p, i64, p, c_int)
    lib.codelm_q5_rows.restype = c_int
    lib.codelm_unpack_gguf_int8.restype = c_int
    lib.codelm_q8_swiglu.argtypes = (p, i64, i64, p, p, i64, i64, i32, p, c_int)
    lib.codelm_q4_swiglu.argtypes = (p, i64, i64, p, p, p, i64, i64, p, c_int)
    lib.codelm_q5_swiglu.argtypes = (p, i64, i64, p, p, i64, i64, p, c_int)
    lib.codelm_q8_swiglu.restype = lib.codelm_q4_swiglu.restype = c_int
    lib.codelm_q5_swiglu.restype = c_int
    lib.codelm_pack_shortlist.argtypes = (p, p, i64, i64, i64, ctypes.c_float, p, p, c_int)
    lib.codelm_pack_shortlist.restype = c_int
    lib.codelm_shortlist.argtypes = (p, ctypes.c_float, p, p, i64, i64, p)
    lib.codelm_shortlist.restype = i64
    lib.codelm_decode_step.argtypes = (p, p, p, p, p, i64, i64, p, p, c_int, c_int)
    lib.codelm_decode_step.restype = c_int
    lib.codelm_tiles_linear.argtypes = (p, i64, i64, p, i32, p, p, i64, i64, p, c_int)
    lib.codelm_tiles_swiglu.argtypes = (p, i64, i64, p, i32, p, p, i64, p, c_int)
    lib.codelm_tiles_linear.restype = lib.codelm_tiles_swiglu.restype = c_int
    lib.codelm_tile_bytes.argtypes = (p, i64, i64, p, p, c_int)
    lib.codelm_tile_bytes.restype = c_int
    lib.codelm_sub_tiles_linear.argtypes = (p, i64, i64, p, p, p, p, p, i64, p, c_int)
    lib.codelm_sub_tiles_linear.restype = c_int
    lib.codelm_swiglu.argtypes = (p, i64, i64, p, c_int)
    lib.codelm_swiglu.restype = None
    lib.codelm_attention.argtypes = (p, i64, i64, p, p, *(i64,) * 6, c_int, p, c_int)
    lib.codelm_attention.restype = c_int
    f32 = ctypes.c_float
    lib.codelm_rms_norm.argtypes = (p, i64, i64, p, f32, p, c_int)
    lib.codelm_rotate_heads.argtypes = (p, i64, i64, i64, i64, p, p, c_int)
    lib.codelm_rms_norm.restype = lib.codelm_rotate_heads.restype = None
    lib.codelm_build_key = key
    return lib


def _drop_unused(folder: Path, days: float = UNUSED_DAYS) -> None:
    """Remove the libraries in `folder` no process has opened for `days`: each new version of
    this file, compiler or CPU builds one, and an older one is never opened again."""
    cutoff = time.time() - days * 86400
    for old in folder.glob("kernels-*.so"):
        with contextlib.suppress(OSError):  # removed by another process meanwhile
            if old.stat().st_mtime < cutoff:
                old.unlink()
                logger.info("removed the unused native kernels %s", old)


# codelm_linear's formats: how a row-major weight holds its blocks of 32.
FORMAT_Q8, FORMAT_Q4, FORMAT_Q5 = 0, 1, 2


class Linear(ctypes.Structure):
    """kernels_x86.c's codelm_linear: one native kernel's weight (zeros: int4's only), bias
    and format."""

    _fields_ = [
        ("w", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("group", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("format", ctypes.c_int64),
    ]


class Block(ctypes.Structure):
    """codelm_block: a llama-family block's norm weights and linears."""

    _fields_ = [
        ("attn_norm", ctypes.c_void_p),
        ("ffn_norm", ctypes.c_void_p),
        ("qkv", Linear),
        ("out", Linear),
        ("gate_up", Linear),
        ("down", Linear),
    ]


class Shape(ctypes.Structure):
    """codelm_shape: the sizes shared by all blocks."""

    _fields_ = [
        ("n_layers", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("n_heads", ctypes.c_int64),
        ("n_kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("ffn_dim", ctypes.c_int64),
        ("eps", ctypes.c_float),
    ]


def _compile(
    compiler: str, flags: tuple[str, ...], link_flags: tuple[str, ...], library: Path
) -> str | None:
    """Build SOURCE into `library`: its parts compiled at once, then linked. None, or the
    compiler's first error."""
    objects = [library.with_suffix(f".part{part}.o") for part in _PARTS]
    runs = [
        subprocess.Popen(
            [compiler, *flags, f"-DCODELM_PART={part}", "-c", "-o", str(obj), str(SOURCE)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for part, obj in zip(_PARTS, objects, strict=True)
    ]
    try:
        errors = [run.communicate(timeout=_COMPILE_TIMEOUT_S)[1] for run in runs]
        failed = [err for run, err in zip(runs, errors, strict=True) if run.returncode != 0]
        if failed:
            return _last_line(failed[0])
        cmd = [compiler, *link_flags, "-o", str(library), *map(str, objects), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        return None if done.returncode == 0 else _last_line(done.stderr)
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
        for obj in objects:
            obj.unlink(missing_ok=True)


def _cpu_id() -> str:
    """The CPU model and flags: a build for one CPU must not be loaded on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(lines[:2])


def _last_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if "error" in line]
    return (errors or stderr.strip().splitlines() or ["no output"])[0][:300]
