"""What every `dyadlab` command shares: its error, its messages, progress
bars, uploads and table writing (dyadlab.cli and dyadlab.review.cli)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dyadlab import storage, tables
from dyadlab.messages import face_selector, object_ref
from dyadlab.v1 import common_pb2

if TYPE_CHECKING:  # imported where used: the CLI's start-up need not pay ~0.4 s for pandas
    import pandas as pd


class CliError(Exception):
    pass


def say(msg: str) -> None:
    print(f"dyadlab: {msg}", file=sys.stderr, flush=True)


# -- progress --------------------------------------------------------------------
class ProgressBar:
    """A tqdm bar per stage on a terminal; plain lines otherwise (logs, CI)."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.bar = None
        self.stage = None
        self.last_pct = -1

    def __call__(self, p: common_pb2.Progress) -> None:
        if p.stage != self.stage:
            self.close()
            self.stage = p.stage
            self.last_pct = -1
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=p.total or None,
                    desc=p.stage,
                    unit="frame" if p.total > 1 else "",
                    file=sys.stderr,
                    leave=False,
                    dynamic_ncols=True,
                )
        if self.bar is not None:
            if p.total and self.bar.total != p.total:
                self.bar.total = p.total
            self.bar.n = p.done
            self.bar.set_postfix_str(p.message, refresh=False)
            self.bar.refresh()
        elif p.total > 1:
            pct = int(100 * p.done / p.total)
            if pct // 25 != self.last_pct // 25 or p.done == p.total:
                self.last_pct = pct
                say(f"{p.stage}: {p.done}/{p.total} ({pct}%) {p.message}".rstrip())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# -- store helpers -----------------------------------------------------------------
def upload(store: storage.ObjectStore, path: Path, prefix: str) -> common_pb2.ObjectRef:
    """Put a local file under inputs/<sha256><ext> (storage.content_key); skip if already there."""
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    return object_ref(storage.put_content(store, path, prefix))


def write_table(df: pd.DataFrame, out: Path) -> None:
    fmt = "parquet" if out.suffix.lower() == ".parquet" else "csv"
    write_bytes(tables.to_bytes(df, fmt), out)


def write_bytes(data: bytes, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, out)


def stream(call, bar: ProgressBar):
    result = None
    try:
        for ev in call:
            if ev.HasField("progress"):
                bar(ev.progress)
            else:
                result = ev.result
    finally:
        bar.close()
    if result is None:
        raise CliError("the service ended the call without a result")
    return result


def face_choice(value: str | None) -> common_pb2.FaceSelector:
    """--face as the API's FaceSelector."""
    try:
        return face_selector(value)
    except ValueError:
        raise CliError(f"--face {value!r}: use adult, infant or a face_id") from None
