"""Server bootstrap shared by every service.

`serve()` gives each service the same skeleton, modelled on grpc/grpc's
examples/python: a `grpc.aio` server with the standard health service
(NOT_SERVING until the service says it is ready, e.g. models loaded), server
reflection, Prometheus metrics per RPC, JSON logs, and graceful shutdown on
SIGTERM/SIGINT (health flips to NOT_SERVING first so load balancers drain).

Security (dyadlab/security/): the port is TLS (mutual TLS on request), or
plaintext only where DYADLAB_INSECURE allows it; every call is authenticated
and authorized by role, except health and reflection; every call but health
checks gets a line in the audit log. DYADLAB_HEALTH_PORT adds a plaintext
port that serves nothing but grpc.health.v1 (probes that cannot speak TLS).

Servicer methods wrap themselves in `@status_errors` so that known failures
become precise gRPC statuses with a message a person can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc
import prometheus_client as prom
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dyadlab import frames, interceptors, security, storage
from dyadlab.client import MAX_MESSAGE_BYTES
from dyadlab.config import Settings
from dyadlab.v1 import common_pb2

log = logging.getLogger("dyadlab.rpc")

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # Connections are recycled every 5 min (GOAWAY; in-flight calls get up to an
    # hour to finish), so clients re-resolve DNS and reach new replicas.
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 3_600_000),
]

RPCS = prom.Counter("dyadlab_rpc_total", "RPCs handled", ["method", "code"])
RPC_SECONDS = prom.Histogram(
    "dyadlab_rpc_seconds",
    "RPC wall time",
    ["method"],
    buckets=(0.005, 0.02, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
)


class Service(Protocol):
    #: fully-qualified gRPC service name, e.g. "dyadlab.v1.Extractor"
    name: str

    def register(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None:
        """Load models, start pools; the service is SERVING once this returns."""

    async def stop(self) -> None: ...

    # Optional: a service whose readiness can change while it runs (e.g. synth,
    # which is only SERVING while TorchServe answers) defines
    #     def bind_health(self, set_serving: Callable[[bool], Awaitable[None]]) -> None
    # `serve` then hands it a setter before start() and leaves the status to it.


class UserError(Exception):
    """A failure caused by the request; carries the status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, UserError):
        return exc.code, str(exc)
    if isinstance(exc, (frames.TableError, storage.InvalidKey)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, storage.NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, storage.Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, storage.StoreError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the service log"


def object_size(store: storage.ObjectStore, ref, field: str, noun: str | None = None) -> int:
    """Check the object a request names (an ObjectRef in field `field`) and
    return its size: INVALID_ARGUMENT when the reference is empty, its key
    malformed or its bucket not this service's; NOT_FOUND when there is no
    such object ("no <noun> at key ...")."""
    if not ref.key:
        raise UserError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}.key is empty")
    storage.validate_key(ref.key)
    if ref.bucket and ref.bucket != store.bucket:
        raise UserError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field}: bucket {ref.bucket!r} is not this service's bucket {store.bucket!r}",
        )
    size = store.size(ref.key)
    if size is None:
        raise UserError(grpc.StatusCode.NOT_FOUND, f"no {noun or field} at key {ref.key!r}")
    return size


def status_errors(fn):
    """Turn exceptions raised by a servicer method into precise gRPC statuses."""

    async def _abort(exc, context):
        code, msg = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("unhandled error in %s", fn.__qualname__)
        else:
            log.info("request refused", extra={"rpc": fn.__name__, "code": code.name})
        await context.abort(code, msg)

    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def gen(self, request, context):
            try:
                async for item in fn(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 — mapped to a status
                await _abort(exc, context)

        return gen

    @functools.wraps(fn)
    async def unary(self, request, context):
        try:
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(exc, context)

    return unary


Report = Callable[[str, int, int, str], None]


def progress(stage: str, done: int, total: int, message: str = "") -> common_pb2.Progress:
    """The API's Progress message (what a Report's arguments become on the wire)."""
    return common_pb2.Progress(stage=stage, done=done, total=total, message=message)


def downstream_timeout(context, default_s: float) -> float:
    """The deadline for a call made on behalf of `context`'s caller: what is
    left of the caller's own deadline (no point working on after it has given
    up), at most `default_s`."""
    left = None
    try:
        left = context.time_remaining()
    except Exception:  # noqa: BLE001 — no deadline information
        pass
    return default_s if left is None else max(0.001, min(default_s, left))


class Cancelled(Exception):
    """Raised by a progress `report` once the call it reports to has ended (the
    client's deadline passed, or it cancelled): the work stops there."""


async def progress_stream(work: Callable[[Report], object]):
    """Run blocking `work(report)` in a thread; yield ("progress", (stage, done,
    total, message)) for each report as it happens, then ("result", value).

    `report` may be called from any thread. An exception in `work` propagates
    after the progress that preceded it has been yielded.

    When the call ends early (deadline, cancel), the work is not abandoned to
    run on: its next `report` raises Cancelled, and this generator waits for
    the thread to unwind before it finishes. So a caller holding a per-job lock
    around it keeps the lock until the work has really stopped, and clients
    that give up cannot pile up invisible work (each retry starting another
    copy of the same extraction).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def report(stage: str, done: int, total: int, message: str = "") -> None:
        if cancel.is_set():
            raise Cancelled("the call ended; work stopped")
        loop.call_soon_threadsafe(queue.put_nowait, (stage, int(done), int(total), message))

    task = asyncio.ensure_future(asyncio.to_thread(work, report))
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            try:
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                yield "progress", getter.result()
                continue
            while not queue.empty():
                yield "progress", queue.get_nowait()
            break
        yield "result", task.result()
    finally:
        if not task.done():
            cancel.set()
            log.info("call ended early; stopping its work")
            try:
                await asyncio.shield(task)
            except BaseException:  # noqa: BLE001 — Cancelled, or the work's own error: the call is gone
                pass


class _MetricsInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not (handler.unary_unary or handler.unary_stream):
            return handler
        method = details.method
        return interceptors.wrap_handler(handler, lambda request, context: _Timing(method, context))


class _Timing:
    """One call's count (by status) and wall time (interceptors.CallHooks)."""

    def __init__(self, method: str, context):
        self.method, self.context = method, context
        self.t0, self.raised = time.perf_counter(), False

    async def enter(self) -> None:
        pass

    def failed(self, exc: BaseException) -> None:
        self.raised = True

    def done(self) -> None:
        code = self.context.code() if hasattr(self.context, "code") else None
        name = code.name if isinstance(code, grpc.StatusCode) else ("UNKNOWN" if self.raised else "OK")
        RPCS.labels(self.method, name).inc()
        RPC_SECONDS.labels(self.method).observe(time.perf_counter() - self.t0)


async def _advertise_store(settings: Settings, health_servicer) -> None:
    """Advertise which store this service uses: the health name
    dyadlab.services.store_health_name(id) answers SERVING. Retried until the
    store answers (a store that is down must not delay the start)."""
    from dyadlab.services import store_health_name

    while True:
        try:
            sid = await asyncio.to_thread(lambda: storage.store_id(storage.open_store(settings)))
        except Exception as e:  # noqa: BLE001 — the store is not reachable yet
            log.info("store identity not known yet", extra={"error": type(e).__name__})
            await asyncio.sleep(5.0)
            continue
        await health_servicer.set(store_health_name(sid), health_pb2.HealthCheckResponse.SERVING)
        return


async def serve(
    service: Service,
    settings: Settings,
    addr: str,
    grace_s: float = 10.0,
    started: Callable[[int], Awaitable[None] | None] | None = None,
    stop_event: asyncio.Event | None = None,
) -> None:
    """Run `service` on `addr` until SIGTERM/SIGINT (or `stop_event` is set)."""
    sec = security.server_security(settings, security.host_of(addr), service.name.rsplit(".", 1)[-1].lower())
    server = grpc.aio.server(interceptors=[_MetricsInterceptor(), sec.interceptor()], options=SERVER_OPTIONS)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", service.name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def set_serving(ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", service.name):
            await health_servicer.set(name, status)

    self_managed = hasattr(service, "bind_health")
    if self_managed:
        getattr(service, "bind_health")(set_serving)  # noqa: B009 - the optional method (see Service)
    service.register(server)
    reflection.enable_server_reflection((service.name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = (
        server.add_secure_port(addr, sec.credentials)
        if sec.credentials is not None
        else server.add_insecure_port(addr)
    )
    if port == 0:
        raise OSError(f"cannot listen on {addr}")
    probe_server = None
    if settings.health_port:  # plaintext, health only: for probes without TLS
        probe_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probe_server)
        if probe_server.add_insecure_port(f"{settings.bind}:{settings.health_port}") == 0:
            raise OSError(f"cannot listen on {settings.bind}:{settings.health_port}")
        await probe_server.start()
    await server.start()
    if settings.metrics_port:
        prom.start_http_server(settings.metrics_port, addr=settings.bind)
    log.info(
        "listening",
        extra={
            "port": port,
            "metrics_port": settings.metrics_port,
            "transport": sec.transport,
            "auth": "off" if sec.access is None else "on",
            "health_port": settings.health_port,
        },
    )

    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (in-process tests): stop_event is used instead

    advertise = asyncio.ensure_future(_advertise_store(settings, health_servicer))
    try:
        t0 = time.perf_counter()
        with contextlib.suppress(asyncio.TimeoutError):  # known before SERVING, unless the store is down
            await asyncio.wait_for(asyncio.shield(advertise), 2.0)
        await service.start()
        if not self_managed:
            await set_serving(True)
        log.info("serving", extra={"startup_s": round(time.perf_counter() - t0, 3)})
        if started is not None:
            r = started(port)
            if inspect.isawaitable(r):
                await r
        await stop.wait()
        log.info("shutting down", extra={"grace_s": grace_s})
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace_s)
    finally:
        advertise.cancel()
        await service.stop()
        await server.stop(0)
        if probe_server is not None:
            await probe_server.stop(0)
    log.info("stopped")


def run(service_factory: Callable[[Settings], Service], addr_of: Callable[[Settings], str]) -> None:
    """Entry point of a service process: settings from env, JSON logs, serve.
    A fatal signal (SIGSEGV in a C extension...) dumps every thread's Python
    stack to stderr (the service's log) before the process dies."""
    import faulthandler
    import sys

    faulthandler.enable()
    from dyadlab import log as jsonlog
    from dyadlab.config import ConfigError

    try:
        settings = Settings.from_env()
        svc = service_factory(settings)
        jsonlog.setup(svc.name.rsplit(".", 1)[-1].lower(), settings.log_level)
        addr = addr_of(settings)
        port = settings.port_of(addr)
        asyncio.run(serve(svc, settings, f"{settings.bind}:{port}"))
    except ConfigError as e:  # a configuration the service refuses: say why, exit 2
        log.error("configuration refused: %s", e)
        print(f"dyadlab: configuration refused: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


async def relay_progress(call, label: str, peer: str):
    """Relay a downstream streaming call (e.g. the extractor's Extract, whose
    events carry either a `progress` or a `result`) to this call's own caller,
    in progress_stream's terms: yield ("progress", (stage, done, total,
    message)) for each of its progress events, the stage prefixed "<label>/",
    then ("result", its result).

    A failed call passes the downstream verdict on through (bad video, missing
    key, ...): a UserError with its status and the message prefixed "<peer>: ".
    A stream that ends without a result is UNAVAILABLE."""
    result = None
    try:
        async for ev in call:
            if ev.HasField("progress"):
                p = ev.progress
                yield "progress", (f"{label}/{p.stage}", p.done, p.total, p.message)
            else:
                result = ev.result
    except grpc.aio.AioRpcError as e:
        raise UserError(e.code(), f"{peer}: {e.details()}") from None
    if result is None:
        raise UserError(grpc.StatusCode.UNAVAILABLE, f"{peer} ended without a result")
    yield "result", result
