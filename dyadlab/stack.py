"""The local stack: every service as its own process on loopback.

`dyadlab up` starts it in the background and records it in
$DYADLAB_HOME/run/stack.json; commands use a running stack, or start an
embedded one (free ports, same store) for their own duration.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dyadlab import client
from dyadlab.config import Settings

#: name -> (module to run, env var with its address, gRPC service name, metrics port)
SERVICES = {
    "extractor": ("services.extractor", "DYADLAB_EXTRACTOR_ADDR", "dyadlab.v1.Extractor", 9461),
    "smiles": ("services.smiles", "DYADLAB_SMILES_ADDR", "dyadlab.v1.Smiles", 9462),
    "stats": ("services.stats", "DYADLAB_STATS_ADDR", "dyadlab.v1.Stats", 9463),
}
READY_TIMEOUT_S = 180.0


@dataclasses.dataclass
class Stack:
    addrs: dict[str, str]
    pids: dict[str, int]
    logs: dict[str, str]
    embedded: bool = False

    def env(self) -> dict[str, str]:
        return {SERVICES[n][1]: a for n, a in self.addrs.items()}


def state_file(settings: Settings) -> Path:
    return settings.run_dir / "stack.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recorded(settings: Settings) -> Stack | None:
    """The stack `dyadlab up` recorded, if any of its processes still runs."""
    try:
        data = json.loads(state_file(settings).read_text())
        st = Stack(data["addrs"], data["pids"], data.get("logs", {}))
    except (OSError, ValueError, KeyError):
        return None
    return st if any(_alive(p) for p in st.pids.values()) else None


def healthy(addrs: dict[str, str]) -> bool:
    return all(client.health_status(a, SERVICES[n][2]) == "SERVING" for n, a in addrs.items())


def configured_addrs(settings: Settings) -> dict[str, str]:
    return {"extractor": settings.extractor_addr, "smiles": settings.smiles_addr,
            "stats": settings.stats_addr}


def start(settings: Settings, addrs: dict[str, str] | None = None, metrics: bool = True,
          embedded: bool = False) -> Stack:
    """Start every service as a child process and wait until all are SERVING."""
    addrs = addrs or configured_addrs(settings)
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(settings.to_env())
    env.update({SERVICES[n][1]: a for n, a in addrs.items()})
    env["PYTHONUNBUFFERED"] = "1"
    procs: dict[str, subprocess.Popen] = {}
    logs = {}
    try:
        for name, (module, _, _, mport) in SERVICES.items():
            logs[name] = str(log_dir / f"{name}.log")
            senv = dict(env, DYADLAB_METRICS_PORT=str(mport if metrics else 0))
            with open(logs[name], "ab") as out:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", module], env=senv, stdout=out,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        for name, p in procs.items():
            client.wait_ready(addrs[name], READY_TIMEOUT_S, SERVICES[name][2],
                              alive=lambda p=p: p.poll() is None)
    except BaseException:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        raise
    st = Stack(addrs, {n: p.pid for n, p in procs.items()}, logs, embedded)
    if not embedded:
        state_file(settings).parent.mkdir(parents=True, exist_ok=True)
        state_file(settings).write_text(json.dumps(dataclasses.asdict(st), indent=2))
    return st


def stop(settings: Settings, st: Stack, timeout_s: float = 20.0) -> None:
    """SIGTERM every service (graceful: in-flight calls finish), then SIGKILL."""
    for pid in st.pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for pid in st.pids.values():
        while _alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        _reap(pid)
    if not st.embedded:
        with contextlib.suppress(FileNotFoundError):
            state_file(settings).unlink()


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


@contextlib.contextmanager
def ensure(settings: Settings, say=lambda msg: None):
    """A stack to talk to: a running one, else an embedded one for this block."""
    rec = recorded(settings)
    if rec is not None and healthy(rec.addrs):
        yield rec
        return
    addrs = configured_addrs(settings)
    if healthy(addrs):
        yield Stack(addrs, {}, {})
        return
    say("no running stack (dyadlab up); starting an embedded one for this command")
    st = start(settings, {n: f"127.0.0.1:{free_port()}" for n in SERVICES}, metrics=False,
               embedded=True)
    try:
        yield st
    finally:
        stop(settings, st)
