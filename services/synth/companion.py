"""TorchServe for the synth service, as the local stack runs it.

The service registry (dyadlab.services) names this module as synth's
companion: `dyadlab up` (and an embedded stack that needs synth SERVING)
starts it before the services and stops it after them, through the
interface dyadlab.stack.Companion describes.

The exported model DYADLAB_SYNTH_MODEL is packed into a .mar
(services.synth.archive.build), published to the object store under
synth/archives/<name>-<sha12>.mar, fetched from there into the model store
(TorchServe loads nothing else) and served with token auth on, every
listener on loopback (DYADLAB_TORCHSERVE_* addresses; an embedded stack uses
free ports and a temporary working directory), allowed_urls limited to that
model store, and Prometheus metrics. The services get DYADLAB_TORCHSERVE_GRPC
and DYADLAB_TORCHSERVE_KEY_FILE (the path of TorchServe's 0600 key_file.json:
synth reads the inference key from it; the key itself is never put in an
environment or a log). Without java, the torchserve package or the model
file, or with DYADLAB_TORCHSERVE=off, TorchServe is skipped with a note, the
services get DYADLAB_TORCHSERVE=off and synth reports NOT_SERVING.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from dyadlab import torchserve as T
from dyadlab.config import Settings

#: the stack's TorchServe listens on one of these hosts only
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
#: what the stack's TorchServe is called in `dyadlab status`
NAME = "torchserve"


class CompanionError(RuntimeError):
    """TorchServe could not be started (dyadlab.stack turns it into a StackError)."""


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def _port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def host(settings: Settings) -> str:
    """The one loopback host every listener of the stack's TorchServe uses."""
    hosts = {a.rpartition(":")[0] for a in settings.torchserve_addrs().values()}
    if len(hosts) != 1 or next(iter(hosts)) not in LOOPBACK:
        raise CompanionError(
            "`dyadlab up` runs TorchServe on loopback only: every DYADLAB_TORCHSERVE_* "
            f"address must be on one of {LOOPBACK[:3]}, got {sorted(hosts)}"
        )
    return next(iter(hosts)).strip("[]")


def ports(settings: Settings) -> T.Ports:
    a = settings.torchserve_addrs()
    return T.Ports(
        _port(a["inference"]),
        _port(a["management"]),
        _port(a["metrics"]),
        _port(a["grpc_inference"]),
        _port(a["grpc_management"]),
    )


def unavailable(settings: Settings) -> str | None:
    """Why the stack cannot start TorchServe here (None: it can)."""
    if settings.torchserve == "off":
        return "TorchServe is off (DYADLAB_TORCHSERVE=off)"
    if not _has_module("ts") or not _has_module("model_archiver"):
        return "TorchServe is not installed (pip install torchserve torch-model-archiver pyyaml)"
    if not T.java_available():
        return "java not found (TorchServe needs a JDK 11+; set JAVA_HOME)"
    if not Path(settings.synth_model).is_file():
        return (
            f"no synth model at {settings.synth_model} (train one: python -m services.synth.train "
            f"... --export {settings.synth_model}, or set DYADLAB_SYNTH_MODEL)"
        )
    return None


def prepare(
    settings: Settings, model_store: Path, say: Callable[[str], None] = lambda m: None
) -> tuple[str, Path]:
    """Build synth's archive from DYADLAB_SYNTH_MODEL, publish it to the object
    store, fetch it into `model_store` (the only place TorchServe loads from;
    older archives there are removed). -> (store key, local .mar)."""
    from dyadlab.storage import open_store
    from services.synth import archive

    store = open_store(settings)
    with tempfile.TemporaryDirectory(prefix="synth-build-") as tmp:
        try:
            mar = archive.build(
                settings.synth_model,
                tmp,
                settings.synth_ts_model,
                batch_size=settings.synth_batch,
                max_batch_delay_ms=settings.synth_batch_delay_ms,
                workers=settings.synth_workers,
                threads=settings.synth_threads,
            )
        except (ValueError, OSError) as e:
            raise CompanionError(
                f"cannot package the synth model {settings.synth_model}: {e} "
                "(DYADLAB_TORCHSERVE=off starts the stack without TorchServe)"
            ) from e
        key = archive.publish(store, mar)
    model_store.mkdir(parents=True, exist_ok=True)
    local = archive.fetch(store, key, model_store)
    for old in model_store.glob("*.mar"):
        if old != local:
            old.unlink(missing_ok=True)
    say(f"synth model {settings.synth_model.name} -> store {key}")
    return key, local


def start(settings: Settings, *, embedded: bool = False, say: Callable[[str], None] = lambda m: None):
    """Start (without waiting) the stack's TorchServe; -> (TorchServe, info) or
    (None, note) when it cannot run here."""
    why = unavailable(settings)
    if why:
        return None, f"{why}: TorchServe not started, synth reports NOT_SERVING"
    host(settings)
    if embedded:
        settings.home.mkdir(parents=True, exist_ok=True)
        workdir, ports_, temporary = (
            Path(tempfile.mkdtemp(prefix="ts-", dir=settings.home)),
            T.Ports.free(),
            True,
        )
    else:
        workdir, ports_, temporary = settings.torchserve_dir, ports(settings), False
        if (workdir / T.STATE_FILE).exists():  # left over by a crashed `up`: ours
            with contextlib.suppress(Exception):
                T.TorchServe.attach(workdir).stop()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o700)  # the key file lives here
    try:
        key, local = prepare(settings, workdir / "model-store", say)
        ts = T.TorchServe(
            workdir,
            workdir / "model-store",
            {settings.synth_ts_model: local.name},
            ports=ports_,
            host=host(settings),
            token_auth=True,
            workers_per_model=settings.synth_workers,
        )
        try:
            ts.start(wait=False)
        except T.TorchServeError as e:
            raise CompanionError(
                f"TorchServe did not start: {e}\n(DYADLAB_TORCHSERVE=off starts the stack without it)"
            ) from e
    except BaseException:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    info = {
        "workdir": str(workdir),
        "pid": ts.pid,
        "grpc": ts.grpc_inference_addr,
        "management": ts.management_url,
        "metrics": ts.metrics_url,
        "key_file": str(ts.key_file),
        "model": settings.synth_ts_model,
        "archive": key,
        "temporary": temporary,
    }
    return ts, info


def wait_ready(ts: T.TorchServe, info: dict, timeout_s: float) -> str:
    """Until TorchServe serves the model; -> a line for the user (with how long it took)."""
    try:
        secs = ts.wait_ready(timeout_s)
    except Exception as e:
        raise CompanionError(
            f"TorchServe did not get ready: {e}\n(DYADLAB_TORCHSERVE=off starts the stack without it)"
        ) from e
    info["pid"] = ts.pid
    info["ready_s"] = round(secs, 1)
    return (
        f"torchserve: gRPC {info['grpc']}, model {info['model']} ready in {secs:.1f} s; "
        f"logs {info['workdir']}/logs"
    )


def env(info: dict | None) -> dict[str, str]:
    """What the services' processes get: where TorchServe is, or that it is off."""
    if info is None:
        return {"DYADLAB_TORCHSERVE": "off", "DYADLAB_TORCHSERVE_KEY_FILE": ""}
    return {
        "DYADLAB_TORCHSERVE": "auto",
        "DYADLAB_TORCHSERVE_GRPC": info["grpc"],
        "DYADLAB_TORCHSERVE_ADDR": info["grpc"],
        "DYADLAB_TORCHSERVE_KEY_FILE": info["key_file"],
        "DYADLAB_SYNTH_TS_MODEL": info["model"],
    }


def alive(info: dict) -> bool:
    return bool(info.get("pid")) and T._is_torchserve(int(info["pid"]))


def describe(info: dict) -> str:
    """`dyadlab status`'s line."""
    return f"{NAME:10s} {info.get('grpc', '?'):22s} pid {info.get('pid', '?')}"


def stop(info: dict | None) -> None:
    """Stop the stack's TorchServe (java and workers) and forget its state."""
    if not info:
        return
    workdir = Path(info["workdir"])
    try:
        ts = T.TorchServe.attach(workdir)
    except (OSError, ValueError, KeyError):
        ts = None
    if ts is not None:
        ts.stop()
    elif info.get("pid") and alive(info):  # state file gone: by pid
        import psutil

        with contextlib.suppress(psutil.Error):
            procs = [psutil.Process(int(info["pid"]))]
            procs += procs[0].children(recursive=True)
            for p in procs:
                p.terminate()
            _gone, still = psutil.wait_procs(procs, timeout=30)
            for p in still:
                p.kill()
    if info.get("temporary"):
        shutil.rmtree(workdir, ignore_errors=True)
