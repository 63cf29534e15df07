"""TorchServe model archives (.mar) from `torch-model-archiver`."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .process import _MODEL_NAME, TorchServeError, _script


def build_mar(
    name: str,
    version: str,
    serialized_file: str | os.PathLike | None,
    handler: str | os.PathLike,
    extra_files: Sequence[str | os.PathLike] = (),
    export_dir: str | os.PathLike = ".",
    *,
    model_file: str | os.PathLike | None = None,
    requirements_file: str | os.PathLike | None = None,
    config_file: str | os.PathLike | None = None,
    force: bool = True,
) -> Path:
    """Package a model with `torch-model-archiver`; returns export_dir/<name>.mar.

    handler: a handler .py file (module-level `handle(data, context)` or one
    class with initialize/handle) or the name of a TorchServe default handler.
    config_file: a model-config.yaml (batchSize, responseTimeout, ...)."""
    if not _MODEL_NAME.match(name):
        raise ValueError(f"invalid model name {name!r}")
    export = Path(export_dir)
    export.mkdir(parents=True, exist_ok=True)
    cmd = [
        _script("torch-model-archiver"),
        "--model-name",
        name,
        "--version",
        str(version),
        "--handler",
        str(handler),
        "--export-path",
        str(export),
    ]
    if serialized_file is not None:
        cmd += ["--serialized-file", str(serialized_file)]
    if extra_files:
        files = [str(f) for f in extra_files]
        if any("," in f for f in files):
            raise ValueError("extra file paths must not contain ',' (the archiver splits on it)")
        cmd += ["--extra-files", ",".join(files)]
    for flag, value in (
        ("--model-file", model_file),
        ("--requirements-file", requirements_file),
        ("--config-file", config_file),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    if force:
        cmd.append("--force")
    # The archiver stages files in $TMPDIR/<name> and deletes that directory first:
    # two builds of one name at once (tests, `dyadlab up`) would clobber each other.
    with tempfile.TemporaryDirectory(prefix="dyadlab-mar-") as tmp:
        env = {**os.environ, "TMPDIR": tmp, "TEMP": tmp, "TMP": tmp}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    mar = export / f"{name}.mar"
    if proc.returncode != 0 or not mar.is_file():
        raise TorchServeError(
            f"torch-model-archiver failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return mar
