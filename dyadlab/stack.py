"""The local stack: every service as its own process on loopback.

`dyadlab up` starts it in the background and records it in
$DYADLAB_HOME/run/stack.json; commands use a running stack, or start an
embedded one (free ports, same store) for their own duration.

TorchServe (synth's model server) is part of `dyadlab up`: the exported model
DYADLAB_SYNTH_MODEL is packed into a .mar (services.synth.archive.build),
published to the object store under synth/archives/<name>-<sha12>.mar, fetched
from there into $DYADLAB_HOME/torchserve/model-store (TorchServe loads nothing
else) and served with token auth on, every listener on loopback
(DYADLAB_TORCHSERVE_* addresses), allowed_urls limited to that model store and
Prometheus metrics. The services get DYADLAB_TORCHSERVE_GRPC and
DYADLAB_TORCHSERVE_KEY_FILE (the path of TorchServe's 0600 key_file.json: the
synth service reads the inference key from it; the key itself is never put in
an environment or a log). Without java, the torchserve package or the model
file, or with DYADLAB_TORCHSERVE=off, TorchServe is skipped with a note, the
services get DYADLAB_TORCHSERVE=off and synth reports NOT_SERVING. Embedded
stacks skip it unless asked (start(..., torchserve=True): free ports, a
temporary working directory).

Security (docs/security.md): with no TLS configured, the services listen with
TLS on loopback using the per-user local development credentials
(dyadlab.security.ensure_local: a name-constrained local CA, a loopback
certificate, tokens), which `start` makes before the first service starts;
the services call each other with the local *service* token
(DYADLAB_TOKEN_FILE), the CLI with the local *user* token. Every service
appends its audit lines to DYADLAB_AUDIT_LOG ($DYADLAB_HOME/logs/audit.jsonl
unless set). Readiness and status use the gRPC health service over the same
TLS channels (health needs no token).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dyadlab import client, security
from dyadlab.config import Settings

#: name -> (module to run, env var with its address, gRPC service name, metrics port)
SERVICES = {
    "extractor": ("services.extractor", "DYADLAB_EXTRACTOR_ADDR", "dyadlab.v1.Extractor", 9461),
    "smiles": ("services.smiles", "DYADLAB_SMILES_ADDR", "dyadlab.v1.Smiles", 9462),
    "stats": ("services.stats", "DYADLAB_STATS_ADDR", "dyadlab.v1.Stats", 9463),
}
READY_TIMEOUT_S = 180.0


def _has_module(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


# -- synth hook ------------------------------------------------------------------------
# The synth gRPC service (services/synth/server.py, written separately) joins the
# stack when its module exists. It is OPTIONAL: it may report NOT_SERVING (no
# TorchServe / no model) without making the stack unhealthy. Its process gets
# DYADLAB_SYNTH_ADDR, DYADLAB_TORCHSERVE_GRPC (and its alias DYADLAB_TORCHSERVE_ADDR),
# DYADLAB_TORCHSERVE_KEY_FILE and DYADLAB_SYNTH_TS_MODEL (the TorchServe model
# name, "synth"), or DYADLAB_TORCHSERVE=off when TorchServe is not running.
SYNTH_SERVICE = ("services.synth.server", "DYADLAB_SYNTH_ADDR", "dyadlab.v1.Synth", 9464)
if _has_module(SYNTH_SERVICE[0]):
    SERVICES["synth"] = SYNTH_SERVICE
#: services whose NOT_SERVING does not make the stack unhealthy
OPTIONAL = frozenset({"synth"})
#: the TorchServe model name synth's archive is registered under
SYNTH_TS_MODEL = "synth"


class StackError(RuntimeError):
    """The stack (or its TorchServe) could not be started."""


@dataclasses.dataclass
class Stack:
    addrs: dict[str, str]
    pids: dict[str, int]
    logs: dict[str, str]
    embedded: bool = False
    #: the running TorchServe: workdir, pid, grpc (inference addr), key_file, model,
    #: archive (store key), temporary (workdir to delete at stop); None = not started
    torchserve: dict | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    #: each service process's start time (psutil create_time): a recorded pid is
    #: signalled only while it still names the process that was started
    started: dict[str, float] = dataclasses.field(default_factory=dict)

    def running(self, name: str) -> bool:
        return _alive(self.pids[name], self.started.get(name))

    def env(self) -> dict[str, str]:
        env = {SERVICES[n][1]: a for n, a in self.addrs.items() if n in SERVICES}
        if self.torchserve:
            env["DYADLAB_TORCHSERVE_GRPC"] = self.torchserve["grpc"]
            env["DYADLAB_TORCHSERVE_KEY_FILE"] = self.torchserve["key_file"]
        return env


def state_file(settings: Settings) -> Path:
    return settings.run_dir / "stack.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: services this process started, by pid: their exit status stays readable and a
#: pid the kernel has handed to another process is never signalled (pid_max can
#: be 32768, and a test session starts thousands of processes).
_children: dict[int, subprocess.Popen] = {}


def exit_status(pid: int) -> str | None:
    """None while a service this process started runs; else how it ended
    ("exit 1", "killed by SIGKILL"); "unknown" for a pid not started here."""
    p = _children.get(pid)
    if p is None:
        return None if _alive(pid) else "unknown"
    rc = p.poll()
    if rc is None:
        return None
    return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"


def _alive(pid: int, started: float | None = None) -> bool:
    """pid runs (and, given its recorded start time, is still that process)."""
    p = _children.get(pid)
    if p is not None:
        return p.poll() is None
    import psutil
    try:
        proc = psutil.Process(pid)
        return (proc.status() != psutil.STATUS_ZOMBIE
                and (started is None or abs(proc.create_time() - started) < 0.01))
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return started is None


def _create_time(pid: int) -> float | None:
    import psutil
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def recorded(settings: Settings) -> Stack | None:
    """The stack `dyadlab up` recorded, if any of its processes still runs."""
    try:
        data = json.loads(state_file(settings).read_text())
        st = Stack(data["addrs"], data["pids"], data.get("logs", {}),
                   torchserve=data.get("torchserve"), notes=data.get("notes", []),
                   started=data.get("started", {}))
    except (OSError, ValueError, KeyError):
        return None
    ts_alive = bool(st.torchserve) and _torchserve_alive(st.torchserve)
    return st if ts_alive or any(st.running(n) for n in st.pids) else None


def healthy(addrs: dict[str, str], settings: Settings | None = None) -> bool:
    """Every required service SERVING; an optional one (synth) may be
    NOT_SERVING or absent (a stack deployed without it)."""
    for n, a in addrs.items():
        if n not in SERVICES:
            continue
        state = client.health_status(a, SERVICES[n][2], settings=settings)
        if state != "SERVING" and not (n in OPTIONAL and state in ("NOT_SERVING", "UNREACHABLE")):
            return False
    return True


def configured_addrs(settings: Settings) -> dict[str, str]:
    addrs = {"extractor": settings.extractor_addr, "smiles": settings.smiles_addr,
             "stats": settings.stats_addr}
    if "synth" in SERVICES:
        addrs["synth"] = settings.synth_addr
    return addrs


# -- TorchServe ------------------------------------------------------------------------
def _torchserve_alive(info: dict) -> bool:
    from dyadlab.torchserve import _is_torchserve
    return bool(info.get("pid")) and _is_torchserve(int(info["pid"]))


def _port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def torchserve_host(settings: Settings) -> str:
    """The one loopback host every listener of the stack's TorchServe uses."""
    hosts = {a.rpartition(":")[0] for a in settings.torchserve_addrs().values()}
    if len(hosts) != 1 or next(iter(hosts)) not in LOOPBACK:
        raise StackError("`dyadlab up` runs TorchServe on loopback only: every DYADLAB_TORCHSERVE_* "
                         f"address must be on one of {LOOPBACK[:3]}, got {sorted(hosts)}")
    return next(iter(hosts)).strip("[]")


def torchserve_ports(settings: Settings):
    from dyadlab.torchserve import Ports
    a = settings.torchserve_addrs()
    return Ports(_port(a["inference"]), _port(a["management"]), _port(a["metrics"]),
                 _port(a["grpc_inference"]), _port(a["grpc_management"]))


def torchserve_unavailable(settings: Settings) -> str | None:
    """Why `up` cannot start TorchServe here (None: it can)."""
    from dyadlab import torchserve as T
    if settings.torchserve == "off":
        return "TorchServe is off (DYADLAB_TORCHSERVE=off)"
    if not _has_module("ts") or not _has_module("model_archiver"):
        return "TorchServe is not installed (pip install torchserve torch-model-archiver pyyaml)"
    if not T.java_available():
        return "java not found (TorchServe needs a JDK 11+; set JAVA_HOME)"
    if not Path(settings.synth_model).is_file():
        return (f"no synth model at {settings.synth_model} (train one: python -m services.synth.train "
                f"... --export {settings.synth_model}, or set DYADLAB_SYNTH_MODEL)")
    return None


def prepare_torchserve(settings: Settings, model_store: Path, say=lambda msg: None) -> tuple[str, Path]:
    """Build synth's archive from DYADLAB_SYNTH_MODEL, publish it to the object
    store, fetch it into `model_store` (the only place TorchServe loads from;
    older archives there are removed). -> (store key, local .mar)."""
    from dyadlab.storage import open_store
    from services.synth import archive
    store = open_store(settings)
    with tempfile.TemporaryDirectory(prefix="synth-build-") as tmp:
        try:
            mar = archive.build(settings.synth_model, tmp, SYNTH_TS_MODEL,
                                batch_size=settings.synth_batch,
                                max_batch_delay_ms=settings.synth_batch_delay_ms,
                                workers=settings.synth_workers, threads=settings.synth_threads)
        except (ValueError, OSError) as e:
            raise StackError(f"cannot package the synth model {settings.synth_model}: {e} "
                             "(DYADLAB_TORCHSERVE=off starts the stack without TorchServe)") from e
        key = archive.publish(store, mar)
    model_store.mkdir(parents=True, exist_ok=True)
    local = archive.fetch(store, key, model_store)
    for old in model_store.glob("*.mar"):
        if old != local:
            old.unlink(missing_ok=True)
    say(f"synth model {settings.synth_model.name} -> store {key}")
    return key, local


def start_torchserve(settings: Settings, *, embedded: bool = False, say=lambda msg: None):
    """Start (without waiting) the stack's TorchServe; -> (TorchServe, info) or
    (None, note) when it cannot run here."""
    from dyadlab import torchserve as T
    why = torchserve_unavailable(settings)
    if why:
        return None, f"{why}: TorchServe not started, synth reports NOT_SERVING"
    torchserve_host(settings)
    if embedded:
        settings.home.mkdir(parents=True, exist_ok=True)
        workdir, ports, temporary = Path(tempfile.mkdtemp(prefix="ts-", dir=settings.home)), T.Ports.free(), True
    else:
        workdir, ports, temporary = settings.torchserve_dir, torchserve_ports(settings), False
        if (workdir / T.STATE_FILE).exists():          # left over by a crashed `up`: ours
            with contextlib.suppress(Exception):
                T.TorchServe.attach(workdir).stop()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o700)                            # the key file lives here
    try:
        key, local = prepare_torchserve(settings, workdir / "model-store", say)
        ts = T.TorchServe(workdir, workdir / "model-store", {SYNTH_TS_MODEL: local.name},
                          ports=ports, host=torchserve_host(settings), token_auth=True,
                          workers_per_model=settings.synth_workers)
        try:
            ts.start(wait=False)
        except T.TorchServeError as e:
            raise StackError(f"TorchServe did not start: {e}\n(DYADLAB_TORCHSERVE=off starts the "
                             "stack without it)") from e
    except BaseException:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    info = {"workdir": str(workdir), "pid": ts.pid, "grpc": ts.grpc_inference_addr,
            "management": ts.management_url, "metrics": ts.metrics_url,
            "key_file": str(ts.key_file), "model": SYNTH_TS_MODEL, "archive": key,
            "temporary": temporary}
    return ts, info


def stop_torchserve(info: dict | None) -> None:
    """Stop the stack's TorchServe (java and workers) and forget its state."""
    if not info:
        return
    from dyadlab import torchserve as T
    workdir = Path(info["workdir"])
    try:
        ts = T.TorchServe.attach(workdir)
    except (OSError, ValueError, KeyError):
        ts = None
    if ts is not None:
        ts.stop()
    elif info.get("pid") and _torchserve_alive(info):     # state file gone: by pid
        import psutil
        with contextlib.suppress(psutil.Error):
            procs = [psutil.Process(int(info["pid"]))]
            procs += procs[0].children(recursive=True)
            for p in procs:
                p.terminate()
            _gone, alive = psutil.wait_procs(procs, timeout=30)
            for p in alive:
                p.kill()
    if info.get("temporary"):
        shutil.rmtree(workdir, ignore_errors=True)


def _say_stderr(msg: str) -> None:
    print(f"dyadlab: {msg}", file=sys.stderr, flush=True)


# -- the stack -------------------------------------------------------------------------
def audit_log_path(settings: Settings) -> str:
    return settings.audit_log or str(settings.home / "logs" / "audit.jsonl")


def security_env(settings: Settings) -> dict[str, str]:
    """What the services' processes get on top of settings.to_env(): the local
    development credentials made now (not by four processes at once) when no
    TLS is configured, the local service token when the servers use the local
    access file, and the audit log's path."""
    env = {"DYADLAB_AUDIT_LOG": audit_log_path(settings)}
    security.server_transport(settings, settings.bind)   # refused here, not in 4 logs
    security.server_access(settings, settings.bind)
    loopback = security.is_loopback(settings.bind)
    if loopback and (not settings.tls_cert or (settings.auth and not settings.auth_tokens)):
        L = security.ensure_local(settings)
        if settings.auth and not settings.auth_tokens:
            env["DYADLAB_TOKEN_FILE"] = str(L.service_token)
    return env


def start(settings: Settings, addrs: dict[str, str] | None = None, metrics: bool = True,
          embedded: bool = False, torchserve: bool | None = None, say=_say_stderr) -> Stack:
    """Start every service as a child process and wait until all are SERVING
    (optional ones: until they answer). `torchserve`: also start TorchServe with
    synth's model (None = for `dyadlab up`, i.e. when not embedded); skipped
    with a note (Stack.notes, and `say`) when it cannot run here."""
    addrs = addrs or configured_addrs(settings)
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(settings.to_env())
    env.update(security_env(settings))
    env.update({SERVICES[n][1]: a for n, a in addrs.items() if n in SERVICES})
    env["PYTHONUNBUFFERED"] = "1"
    procs: dict[str, subprocess.Popen] = {}
    logs = {}
    notes: list[str] = []
    ts, ts_info = None, None
    if torchserve is None:
        torchserve = not embedded
    try:
        if torchserve:
            ts, ts_info = start_torchserve(settings, embedded=embedded, say=say)
            if ts is None:
                notes.append(ts_info)
                say(ts_info)
                ts_info = None
        if ts is None:
            env["DYADLAB_TORCHSERVE"] = "off"
            env.pop("DYADLAB_TORCHSERVE_KEY_FILE", None)
        else:
            env.update({"DYADLAB_TORCHSERVE": "auto", "DYADLAB_TORCHSERVE_GRPC": ts_info["grpc"],
                        "DYADLAB_TORCHSERVE_ADDR": ts_info["grpc"],
                        "DYADLAB_TORCHSERVE_KEY_FILE": ts_info["key_file"],
                        "DYADLAB_SYNTH_TS_MODEL": ts_info["model"]})
        for name, (module, _, _, mport) in SERVICES.items():
            if name not in addrs:
                continue
            logs[name] = str(log_dir / f"{name}.log")
            senv = dict(env, DYADLAB_METRICS_PORT=str(mport if metrics else 0))
            with open(logs[name], "ab") as out:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", module], env=senv, stdout=out,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
                _children[procs[name].pid] = procs[name]
        if ts is not None:
            try:
                secs = ts.wait_ready(READY_TIMEOUT_S)
            except Exception as e:
                raise StackError(f"TorchServe did not get ready: {e}\n(DYADLAB_TORCHSERVE=off "
                                 "starts the stack without it)") from e
            say(f"torchserve: gRPC {ts_info['grpc']}, model {ts_info['model']} ready in {secs:.1f} s; "
                f"logs {ts_info['workdir']}/logs")
            ts_info["pid"] = ts.pid
        for name, p in procs.items():
            if name in OPTIONAL and ts is None:
                _wait_answering(addrs[name], SERVICES[name][2], p, settings)
            else:
                client.wait_ready(addrs[name], READY_TIMEOUT_S, SERVICES[name][2],
                                  alive=lambda p=p: p.poll() is None, settings=settings)
    except BaseException:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
            _children.pop(p.pid, None)
        if ts is not None:
            with contextlib.suppress(Exception):
                stop_torchserve(ts_info)
        raise
    st = Stack(addrs, {n: p.pid for n, p in procs.items()}, logs, embedded, ts_info, notes,
               {n: t for n, p in procs.items() if (t := _create_time(p.pid)) is not None})
    if not embedded:
        state_file(settings).parent.mkdir(parents=True, exist_ok=True)
        state_file(settings).write_text(json.dumps(dataclasses.asdict(st), indent=2))
    return st


def _wait_answering(addr: str, service: str, proc: subprocess.Popen,
                    settings: Settings | None = None) -> str:
    """Until the service's health check answers at all (SERVING or NOT_SERVING)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    state = "UNREACHABLE"
    while time.monotonic() < deadline:
        state = client.health_status(addr, service, settings=settings)
        if state in ("SERVING", "NOT_SERVING"):
            return state
        if proc.poll() is not None:
            raise RuntimeError(f"service at {addr} exited before it was ready (last state {state})")
        time.sleep(0.1)
    raise TimeoutError(f"service at {addr} not answering after {READY_TIMEOUT_S:.0f} s "
                       f"(last state {state})")


def stop(settings: Settings, st: Stack, timeout_s: float = 20.0) -> None:
    """SIGTERM every service (graceful: in-flight calls finish), then SIGKILL
    its process group (stragglers: worker processes of a service that died);
    then TorchServe (java and its workers). Only processes that are still the
    ones started are signalled."""
    for name, pid in st.pids.items():
        if st.running(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for name, pid in st.pids.items():
        p = _children.pop(pid, None)
        if p is None:                      # recorded by another process (`dyadlab down`)
            while st.running(name) and time.monotonic() < deadline:
                time.sleep(0.05)
            if st.running(name):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            wait_unreaped(p, max(0.0, deadline - time.monotonic()))
        if p.returncode is None:
            # Not reaped yet, so the pid (= the group's id) cannot have been reused.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        p.wait()
    stop_torchserve(st.torchserve)
    if not st.embedded:
        with contextlib.suppress(FileNotFoundError):
            state_file(settings).unlink()


def wait_unreaped(p: subprocess.Popen, timeout_s: float) -> None:
    """Until `p` has exited, leaving it a zombie (its pid still taken). Returns
    at once when it was reaped already (its pid may then be anyone's)."""
    deadline = time.monotonic() + timeout_s
    while p.returncode is None and os.waitid(
            os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(p.args, timeout_s)
        time.sleep(0.05)


@contextlib.contextmanager
def ensure(settings: Settings, say=lambda msg: None, torchserve: bool = False):
    """A stack to talk to: a running one, else an embedded one for this block
    (with its own TorchServe if `torchserve`)."""
    rec = recorded(settings)
    if rec is not None and healthy(rec.addrs, settings) and (rec.torchserve or not torchserve):
        yield rec
        return
    addrs = configured_addrs(settings)
    if not torchserve and healthy(addrs, settings):
        yield Stack(addrs, {}, {})
        return
    say("no running stack (dyadlab up); starting an embedded one for this command")
    st = start(settings, {n: f"127.0.0.1:{free_port()}" for n in SERVICES}, metrics=False,
               embedded=True, torchserve=torchserve, say=say)
    try:
        yield st
    finally:
        stop(settings, st)
