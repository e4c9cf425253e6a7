"""`codelm-lsp`: the language server on stdio. Logs go to a file, never to stdout."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from . import __version__
from .settings import LspSettings, runtime_home

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def default_log_file() -> Path | None:
    """$CODELM_HOME/log/lsp.log, else the platformdirs user log dir; None where there is no
    home folder to find (no HOME, a user id with no passwd entry): the log goes to stderr."""
    home = runtime_home()
    if home:
        return Path(home).expanduser() / "log" / "lsp.log"
    import platformdirs

    try:
        return Path(platformdirs.user_log_dir("codelm")) / "lsp.log"
    except RuntimeError:
        return None


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="codelm-lsp", description="codelm language server (stdio)"
    )
    parser.add_argument(
        "--stdio", action="store_true", help="accepted for editors; stdio is the only transport"
    )
    parser.add_argument("--log-file", type=Path, default=None, help="default: the user log dir")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="-v: DEBUG (INFO by default)"
    )
    parser.add_argument("--version", action="version", version=f"codelm-lsp {__version__}")
    return parser.parse_args(argv)


def _setup_logging(log_file: Path | None, verbosity: int) -> None:
    level = logging.DEBUG if verbosity >= 1 else logging.INFO
    handler: logging.Handler = logging.StreamHandler()  # stderr: still never stdout
    try:
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(log_file, encoding="utf-8")
    except OSError:
        pass
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("codelm").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _setup_logging(args.log_file or default_log_file(), args.verbose)
    from .server import LogMessageHandler, build_server

    server = build_server(LspSettings())
    forward = LogMessageHandler(server)
    forward.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.getLogger("codelm").addHandler(forward)
    logger.info("codelm-lsp %d starting", os.getpid())
    server.start_io()
    logger.info("codelm-lsp %d stopped", os.getpid())
    return 0 if server.shutdown_requested else 1
