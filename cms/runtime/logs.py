"""Structured logs: one JSON object per line on stderr (or a file).

Log calls pass facts as ``extra={"fields": {...}}``. Nothing secret is ever a
field: callers log identities, labels, PSD ids, counts and outcomes, never key
material, PINs, random values or APDU data of secured commands.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from cms.runtime.files import private_file


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # Exception type and message only: a traceback can carry locals.
            entry["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(entry, default=str, separators=(",", ":"))


def setup_logging(service: str, level: str = "info", file: Path | None = None) -> None:
    """Log JSON lines to stderr, or appended to ``file`` (owner-only: 0600, new directories
    0700, whatever the umask; see ``cms.runtime.files``)."""
    handler: logging.Handler
    if file is not None:
        # Created (or tightened) here, so the handler only ever appends to a private file.
        private_file(file)
        handler = logging.FileHandler(file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's own logger is chatty at info; keep warnings.
    logging.getLogger("grpc").setLevel(logging.WARNING)


def fields(**kw: object) -> dict[str, dict[str, object]]:
    """``log.info("msg", extra=fields(a=1))``"""
    return {"fields": kw}
