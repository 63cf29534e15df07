"""The audit log: one JSON line per RPC on its own stream, naming objects by
shortened content hashes (never a name or path)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
from pathlib import Path

_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_AUDIT_KEYS = 50


def short_key(key: str) -> str:
    """An object key as the audit log shows it: the content hash it contains,
    shortened; otherwise a hash of the key (a key may carry a name)."""
    m = _HEX64.search(key)
    if m:
        return m.group()[:12]
    return "k:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def object_keys(msg) -> list[str]:
    """Every ObjectRef key in a request message, shortened (see short_key)."""
    out: list[str] = []

    def walk(m, depth=0):
        if depth > 16 or len(out) >= MAX_AUDIT_KEYS:
            return
        if m.DESCRIPTOR.full_name == "dyadlab.v1.ObjectRef":
            if m.key:
                out.append(short_key(m.key))
            return
        for field, value in m.ListFields():
            if field.message_type is None or (field.message_type.GetOptions().map_entry):
                continue
            if _repeated(field):
                for v in value:
                    walk(v, depth + 1)
            else:
                walk(value, depth + 1)

    with contextlib.suppress(Exception):
        walk(msg)
    return out


def _repeated(field) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 6 (label is gone in 7)
        return bool(field.is_repeated)
    return field.label == field.LABEL_REPEATED


class _AppendHandler(logging.Handler):
    """One os.write per line on an O_APPEND descriptor: lines from several
    processes sharing the file never interleave."""

    def __init__(self, path: Path):
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def emit(self, record):
        try:
            os.write(self.fd, (self.format(record) + "\n").encode())
        except Exception:  # noqa: BLE001
            self.handleError(record)

    def close(self):
        with contextlib.suppress(OSError):
            os.close(self.fd)
        super().close()


def audit_logger(dest: str, service: str) -> logging.Logger:
    """A server's audit logger: DYADLAB_AUDIT_LOG (a file) or stderr; its own
    logger (not in logging's registry, not propagated): audit lines never mix
    with the service's log, and two servers in one process keep theirs apart."""
    logger = logging.Logger(f"dyadlab.audit.{service}", logging.INFO)
    logger.propagate = False
    if dest and dest.lower() not in ("stderr", "-"):
        handler: logging.Handler = _AppendHandler(Path(dest).expanduser())
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return logger
