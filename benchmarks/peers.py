"""llama.cpp's `llama-server` as a peer for the benchmarks: start it on a free loopback port,
wait for /health, call /completion, always stop it.

Built by `make bench-peers` into .peers/bin/llama-server (`make bench-peers-avx2`: a build for
AVX2 alone in .peers/avx2/bin). When it is absent, `available()` is False and `NOT_BUILT` is the
row text the benchmarks print instead of numbers.

    with LlamaServer(model_path, cache_reuse=256) as server:
        result = server.complete(prompt_text, n_predict=16)   # stream: time to first token
        result.first_token_ms, result.total_ms, result.cached, result.prefilled

Imports nothing outside the standard library.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / ".peers" / "bin" / "llama-server"
NOT_BUILT = "not built: run make bench-peers"
# The same llama.cpp built for AVX2 alone (decode.py --isa avx2).
AVX2_BINARY = ROOT / ".peers" / "avx2" / "bin" / "llama-server"
AVX2_NOT_BUILT = "not built: run make bench-peers-avx2"
HOST = "127.0.0.1"
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 600.0


def available(binary: Path = BINARY) -> bool:
    return binary.is_file() and os.access(binary, os.X_OK)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def version(binary: Path = BINARY) -> str:
    """`llama-server --version` (build number and commit), or "" when it cannot be run."""
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = (done.stdout + done.stderr).splitlines()
    return next((line.strip() for line in lines if line.startswith("version")), "")


@dataclass
class PeerResult:
    """One /completion call, timed on the client side (loopback HTTP included)."""

    text: str = ""
    first_token_ms: float = float("nan")  # request sent -> first streamed piece with content
    total_ms: float = float("nan")  # request sent -> the final (stop) message
    cached: int = 0  # timings.cache_n: prompt tokens reused from the slot's KV
    prefilled: int = 0  # timings.prompt_n: prompt tokens evaluated for this request
    prompt_tokens: int = 0  # tokens_evaluated: the prompt's length in tokens
    generated: int = 0  # tokens_predicted
    slot: int = -1
    timings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "first_token_ms": round(self.first_token_ms, 2),
            "total_ms": round(self.total_ms, 2),
            "cached": self.cached,
            "prefilled": self.prefilled,
            "prompt_tokens": self.prompt_tokens,
            "generated": self.generated,
            "slot": self.slot,
            "timings": self.timings,
        }


class LlamaServer:
    """One llama-server process on loopback; a context manager that always stops it."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        threads: int = 2,
        ctx: int = 8192,
        cache_reuse: int = 0,
        extra: tuple[str, ...] = (),
        binary: Path = BINARY,
    ) -> None:
        self.model = Path(model)
        self.binary = binary
        self.port = 0
        self.args = ["-t", str(threads), "-c", str(ctx), "--no-webui", *extra]
        if cache_reuse:
            self.args += ["--cache-reuse", str(cache_reuse)]
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.start_s = float("nan")

    def peak_rss_mb(self) -> float:
        """The server process's peak resident memory so far, in MB; NaN if unknown."""
        return float("nan") if self.process is None else common.peak_rss_mb(self.process.pid)

    @property
    def command(self) -> list[str]:
        return [str(self.binary), "-m", str(self.model), "--host", HOST, "--port", str(self.port)]

    def describe(self) -> str:
        return "llama-server " + " ".join(self.args)

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        if not available(self.binary):
            raise FileNotFoundError(f"{self.binary}: {NOT_BUILT}")
        self.port = free_port()
        fd, log = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        self.log_path = Path(log)
        t0 = time.perf_counter()
        # As a user would run it: not with the OpenMP wait policy common.py sets for torch
        # (llama.cpp's CPU backend synchronises its threads through OpenMP too).
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        with os.fdopen(fd, "wb") as out:
            self.process = subprocess.Popen(
                self.command + self.args,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it
            )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"llama-server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _ = self._get("/health", timeout_s=2)
                if status == 200:
                    self.start_s = time.perf_counter() - t0
                    return
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"llama-server not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def log_tail(self, n: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def log_lines(self, needle: str) -> list[str]:
        """Lines of the server log containing `needle` (e.g. its slot and context set-up)."""
        if self.log_path is None or not self.log_path.exists():
            return []
        return [ln for ln in self.log_path.read_text(errors="replace").splitlines() if needle in ln]

    def complete(
        self,
        prompt: str,
        *,
        n_predict: int = 16,
        cache_prompt: bool = True,
        stream: bool = True,
        ignore_eos: bool = False,
        stop: tuple[str, ...] = (),
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> PeerResult:
        """POST /completion, greedy, ending at any of `stop` (not included in the text);
        `id_slot` is left to the server (automatic choice)."""
        body = {
            "prompt": prompt,
            "n_predict": n_predict,
            "cache_prompt": cache_prompt,
            "temperature": 0,
            "stream": stream,
            "ignore_eos": ignore_eos,
            "stop": list(stop),
        }
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout_s)
        try:
            t0 = time.perf_counter()
            conn.request(
                "POST", "/completion", json.dumps(body), {"Content-Type": "application/json"}
            )
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"llama-server /completion: {resp.status} {resp.read()[:500]!r}")
            result = PeerResult()
            if not stream:
                final = json.loads(resp.read())
                result.total_ms = result.first_token_ms = (time.perf_counter() - t0) * 1000
                return _fill(result, final, final.get("content", ""))
            pieces: list[str] = []
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = json.loads(line[5:])
                if data.get("content") and result.first_token_ms != result.first_token_ms:
                    result.first_token_ms = (time.perf_counter() - t0) * 1000
                pieces.append(data.get("content", ""))
                if data.get("stop"):
                    result.total_ms = (time.perf_counter() - t0) * 1000
                    if result.first_token_ms != result.first_token_ms:  # nothing was generated
                        result.first_token_ms = result.total_ms
                    return _fill(result, data, "".join(pieces))
            raise RuntimeError("llama-server closed the stream without a final message")
        finally:
            conn.close()

    def _get(self, path: str, timeout_s: float) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout_s)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


def server_for(model: str, log=print) -> LlamaServer | None:
    """llama-server (not started) on `model`'s GGUF, a catalogue name or a path; None, said
    through `log`, where the model is not a GGUF."""
    from codelm.daemon.catalog import resolve_model_path

    path = resolve_model_path(model)
    if path.suffix != ".gguf":
        log(f"  {model}: llama-server needs a .gguf model; no peer row")
        return None
    return LlamaServer(path)


def prompt_for_peer(tokenizer: Any, prompt: Any) -> tuple[str, int]:
    """What llama-server gets for codelm's `prompt` (daemon/engine/prompt.Prompt): its text,
    without a BOS token (the server adds its own), with the bytes codelm heals put back so both
    continue from the cursor; and codelm's prompt length in tokens, the healed ones included."""
    ids = prompt.token_ids
    if tokenizer.add_bos and ids and ids[0] == tokenizer.bos_id:
        ids = ids[1:]
    healed = prompt.heal.decode("utf-8", errors="replace")
    return tokenizer.decode(ids) + healed, len(prompt.token_ids) + len(tokenizer.encode(healed))


def _fill(result: PeerResult, final: dict[str, Any], text: str) -> PeerResult:
    timings = final.get("timings") or {}
    result.text = text
    result.timings = timings
    result.cached = int(timings.get("cache_n", 0))
    result.prefilled = int(timings.get("prompt_n", 0))
    result.prompt_tokens = int(final.get("tokens_evaluated", 0))
    result.generated = int(final.get("tokens_predicted", timings.get("predicted_n", 0)))
    result.slot = int(final.get("id_slot", -1))
    return result
