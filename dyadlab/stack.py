"""The local stack: every service as its own process on loopback.

`dyadlab up` starts it in the background and records it in
$DYADLAB_HOME/run/stack.json; commands use a running stack, or start an
embedded one (free ports, same store) for their own duration.

Which services there are, what each runs and where it listens comes from
the service registry (dyadlab.services). A service may name a *companion*
there: a module that starts the process the service relies on (synth:
TorchServe, services/synth/companion.py). The stack starts companions before
the services and stops them after; it knows nothing else of them. A
companion module provides

    unavailable(settings) -> str | None          why it cannot run here (None: it can)
    start(settings, *, embedded, say) -> (handle, info) | (None, note)
    wait_ready(handle, info, timeout_s) -> str   a line for the user, with the time it took
    env(info | None) -> dict[str, str]           what the services' processes get
    alive(info) -> bool;  describe(info) -> str;  stop(info)
    CompanionError                               raised by start / wait_ready

`info` is a JSON-able dict, recorded in stack.json. An embedded stack starts
the companions of the services a command needs SERVING (`ensure(serving=...)`,
e.g. synth's TorchServe for `dyadlab synth ...`); otherwise it skips them.

A stack on the configured addresses is used only when it works on this
command's store: every service advertises the store's identity (health name
dyadlab.services.store_health_name, dyadlab.rpc.serve); a stack started with
another DYADLAB_HOME or store is left alone and an embedded stack on free
ports runs this command instead (with a note saying so).

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
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

from dyadlab import client, security, services, storage
from dyadlab.config import Settings

READY_TIMEOUT_S = 180.0


def companion(name: str) -> ModuleType:
    """The companion module of service `name` (see the module docstring)."""
    mod = services.get(name).companion
    if not mod:
        raise KeyError(f"the {name} service has no companion")
    return importlib.import_module(mod)


class StackError(RuntimeError):
    """The stack (or its TorchServe) could not be started."""


@dataclasses.dataclass
class Stack:
    addrs: dict[str, str]
    pids: dict[str, int]
    logs: dict[str, str]
    embedded: bool = False
    #: the running companions, by the service they serve (synth: TorchServe's workdir,
    #: pid, grpc addr, key_file, model, archive, temporary); absent = not started
    companions: dict[str, dict] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    #: each service process's start time (psutil create_time): a recorded pid is
    #: signalled only while it still names the process that was started
    started: dict[str, float] = dataclasses.field(default_factory=dict)

    def running(self, name: str) -> bool:
        return _alive(self.pids[name], self.started.get(name))

    def env(self) -> dict[str, str]:
        """The environment a client process needs to use this stack."""
        env = {services.get(n).addr_env: a for n, a in self.addrs.items() if n in services.BY_NAME}
        for n, info in self.companions.items():
            env.update(companion(n).env(info))
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
        return proc.status() != psutil.STATUS_ZOMBIE and (
            started is None or abs(proc.create_time() - started) < 0.01
        )
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
        comps = data.get("companions")
        if comps is None and data.get("torchserve"):  # recorded before companions
            comps = {"synth": data["torchserve"]}
        st = Stack(
            data["addrs"],
            data["pids"],
            data.get("logs", {}),
            companions=comps or {},
            notes=data.get("notes", []),
            started=data.get("started", {}),
        )
    except (OSError, ValueError, KeyError):
        return None
    comp_alive = any(companion(n).alive(info) for n, info in st.companions.items())
    return st if comp_alive or any(st.running(n) for n in st.pids) else None


def healthy(addrs: dict[str, str], settings: Settings | None = None, serving: Iterable[str] = ()) -> bool:
    """Every required service SERVING; an optional one (synth) may be
    NOT_SERVING or absent (a stack deployed without it) unless it is in `serving`."""
    serving = set(serving)
    for n, a in addrs.items():
        if n not in services.BY_NAME:
            continue
        svc = services.get(n)
        state = client.health_status(a, svc.grpc_name, settings=settings)
        if state != "SERVING" and not (
            svc.optional and n not in serving and state in ("NOT_SERVING", "UNREACHABLE")
        ):
            return False
    return True


def same_store(addrs: dict[str, str], settings: Settings, store_id: str) -> bool:
    """Every service at `addrs` advertises the store `store_id` (dyadlab.rpc.serve)."""
    name = services.store_health_name(store_id)
    return all(client.health_status(a, name, settings=settings) == "SERVING" for a in addrs.values())


def configured_addrs(settings: Settings) -> dict[str, str]:
    return settings.addrs()


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
    security.server_transport(settings, settings.bind)  # refused here, not in 4 logs
    security.server_access(settings, settings.bind)
    loopback = security.is_loopback(settings.bind)
    if loopback and (not settings.tls_cert or (settings.auth and not settings.auth_tokens)):
        L = security.ensure_local(settings)
        if settings.auth and not settings.auth_tokens:
            env["DYADLAB_TOKEN_FILE"] = str(L.service_token)
    return env


def _start_companions(
    settings: Settings, names: Iterable[str], embedded: bool, say, notes: list[str], env: dict[str, str]
) -> dict[str, tuple]:
    """Start the companions of `names` (without waiting); -> {service: (handle, info)}.
    One that cannot run here is skipped with a note; every service's env says so."""
    started: dict[str, tuple] = {}
    for svc in services.SERVICES:
        if not svc.companion:
            continue
        mod = companion(svc.name)
        handle, info = None, None
        if svc.name in names:
            try:
                handle, info = mod.start(settings, embedded=embedded, say=say)
            except mod.CompanionError as e:
                raise StackError(str(e)) from e
            if handle is None:
                notes.append(info)
                say(info)
                info = None
            else:
                started[svc.name] = (handle, info)
        env.update(mod.env(info))
    return started


def start(
    settings: Settings,
    addrs: dict[str, str] | None = None,
    metrics: bool = True,
    embedded: bool = False,
    companions: bool | Iterable[str] | None = None,
    say=_say_stderr,
) -> Stack:
    """Start every service as a child process and wait until all are SERVING
    (optional ones: until they answer). `companions`: which services' companions
    to start (True: all; None: all for `dyadlab up`, none when embedded); one
    that cannot run here is skipped with a note (Stack.notes, and `say`)."""
    addrs = addrs or configured_addrs(settings)
    if companions is None:
        companions = not embedded
    names = set(services.NAMES) if companions is True else set(companions or ())
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(settings.to_env())
    env.update(security_env(settings))
    env.update({services.get(n).addr_env: a for n, a in addrs.items() if n in services.BY_NAME})
    env["PYTHONUNBUFFERED"] = "1"
    procs: dict[str, subprocess.Popen] = {}
    logs = {}
    notes: list[str] = []
    comps: dict[str, tuple] = {}
    try:
        comps = _start_companions(settings, names, embedded, say, notes, env)
        for svc in services.SERVICES:
            if svc.name not in addrs:
                continue
            logs[svc.name] = str(log_dir / f"{svc.name}.log")
            senv = dict(env, DYADLAB_METRICS_PORT=str(svc.metrics_port if metrics else 0))
            with open(logs[svc.name], "ab") as out:
                procs[svc.name] = subprocess.Popen(
                    [sys.executable, "-m", svc.module],
                    env=senv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
                _children[procs[svc.name].pid] = procs[svc.name]
        for n, (handle, info) in comps.items():
            mod = companion(n)
            try:
                say(mod.wait_ready(handle, info, READY_TIMEOUT_S))
            except mod.CompanionError as e:
                raise StackError(str(e)) from e
        for name, p in procs.items():
            svc = services.get(name)
            if svc.optional and name not in comps:
                _wait_answering(addrs[name], svc.grpc_name, p, settings)
            else:
                client.wait_ready(
                    addrs[name], READY_TIMEOUT_S, svc.grpc_name, alive=_running(p), settings=settings
                )
    except BaseException:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
            _children.pop(p.pid, None)
        for n, (_handle, info) in comps.items():
            with contextlib.suppress(Exception):
                companion(n).stop(info)
        raise
    st = Stack(
        addrs,
        {n: p.pid for n, p in procs.items()},
        logs,
        embedded,
        {n: info for n, (_h, info) in comps.items()},
        notes,
        {n: t for n, p in procs.items() if (t := _create_time(p.pid)) is not None},
    )
    if not embedded:
        state_file(settings).parent.mkdir(parents=True, exist_ok=True)
        state_file(settings).write_text(json.dumps(dataclasses.asdict(st), indent=2))
    return st


def _running(p: subprocess.Popen) -> Callable[[], bool]:
    return lambda: p.poll() is None


def _wait_answering(addr: str, service: str, proc: subprocess.Popen, settings: Settings | None = None) -> str:
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
    raise TimeoutError(f"service at {addr} not answering after {READY_TIMEOUT_S:.0f} s (last state {state})")


def stop(settings: Settings, st: Stack, timeout_s: float = 20.0) -> None:
    """SIGTERM every service (graceful: in-flight calls finish), then SIGKILL
    its process group (stragglers: worker processes of a service that died);
    then the companions (TorchServe: java and its workers). Only processes
    that are still the ones started are signalled."""
    for name, pid in st.pids.items():
        if st.running(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for name, pid in st.pids.items():
        p = _children.pop(pid, None)
        if p is None:  # recorded by another process (`dyadlab down`)
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
    for n, info in st.companions.items():
        companion(n).stop(info)
    if not st.embedded:
        with contextlib.suppress(FileNotFoundError):
            state_file(settings).unlink()


def wait_unreaped(p: subprocess.Popen, timeout_s: float) -> None:
    """Until `p` has exited, leaving it a zombie (its pid still taken). Returns
    at once when it was reaped already (its pid may then be anyone's)."""
    deadline = time.monotonic() + timeout_s
    while p.returncode is None and os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(p.args, timeout_s)
        time.sleep(0.05)


@contextlib.contextmanager
def ensure(settings: Settings, say=lambda msg: None, serving: Iterable[str] = ()):
    """A stack to talk to, on this command's store: the recorded one (`dyadlab
    up`) or one on the configured addresses, if healthy with every service of
    `serving` SERVING; else an embedded one for this block, with the
    companions of `serving` (e.g. synth's TorchServe)."""
    serving = tuple(serving)
    sid = storage.store_id(storage.open_store(settings))
    rec = recorded(settings)
    candidates = [("the stack `dyadlab up` started", rec.addrs)] if rec is not None else []
    candidates.append(("a stack", configured_addrs(settings)))
    for what, addrs in candidates:
        if not healthy(addrs, settings, serving):
            continue
        if not same_store(addrs, settings, sid):
            where = ", ".join(f"{n} {a}" for n, a in list(addrs.items())[:1])
            say(
                f"{what} at {where} works on another store (another DYADLAB_HOME or "
                f"DYADLAB_STORE_DIR / S3 bucket than this command's {_store_words(settings)}); "
                "leaving it alone"
            )
            continue
        yield rec if rec is not None and addrs is rec.addrs else Stack(addrs, {}, {})
        return
    need = f" with {' and '.join(serving)} serving" if serving else ""
    say(f"no running stack on this store{need} (dyadlab up); starting an embedded one for this command")
    t0 = time.monotonic()
    st = start(
        settings,
        {n: f"127.0.0.1:{free_port()}" for n in services.NAMES},
        metrics=False,
        embedded=True,
        companions=serving,
        say=say,
    )
    if st.companions:
        say(f"embedded stack ready in {time.monotonic() - t0:.1f} s")
    try:
        yield st
    finally:
        stop(settings, st)


def _store_words(settings: Settings) -> str:
    return (
        f"S3 {settings.s3_endpoint}/{settings.bucket}" if settings.uses_s3 else f"store {settings.store_dir}"
    )
