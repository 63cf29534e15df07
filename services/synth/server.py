"""The synth service: avLandmarkGAN served from TorchServe.

    Transform  a face photo + target VA -> the aligned face moved to that VA (PNG) + landmarks
    Matrix     a face photo + valence/arousal grids -> an avImage matrix (PNG)
    Transfer   a real dyad video + a novel parent face + a novel infant face -> an MP4 in
               which the novel faces follow the real partners' per-frame VA

This process does no deep learning itself. Its modules, one job each:

    server.py   this file: the gRPC servicer, health, `main`
                (`python -m services.synth` or `python -m services.synth.server`)
    service.py  what the three RPCs do (blocking; run here in threads), its knobs, statuses
                and store keys
    backend.py  the TorchServe adapter: predictions from model "synth" (handler contract in
                ``handler.py``: mode "transform" / "judge"), probes, the model's crop size
    images.py   image decoding/encoding; faces found with the shared still-image detector
                (`dyadlab.face.still`) and aligned with `landmarks.align_face`
    checks.py   checks of the requests' simple fields (VA, model name)

The real dyad's landmarks come from the extractor service over gRPC (its
progress relayed to the caller of Transfer).

Health. SERVING only while TorchServe answers a real prediction: `start`
makes one (a judge prediction on a grey crop), and a monitor repeats it every
DYADLAB_SYNTH_PROBE_S seconds (default 5) and flips the health status both
ways; a failed prediction during a call flips it to NOT_SERVING at once.
(`bind_health` receives the setter from `dyadlab.rpc.serve`, which then
leaves the status to this service.)

Settings: DYADLAB_SYNTH_ADDR, DYADLAB_TORCHSERVE_GRPC (alias
DYADLAB_TORCHSERVE_ADDR), DYADLAB_TORCHSERVE_KEY_FILE (TorchServe's
key_file.json, re-read after PERMISSION_DENIED: a restarted TorchServe has new
keys) and DYADLAB_TORCHSERVE=off (no TorchServe in this stack: NOT_SERVING,
calls FAILED_PRECONDITION) come from `dyadlab.config`; `dyadlab up` sets
DYADLAB_SYNTH_TS_MODEL, the TorchServe model name (default "synth"). The
service's own knobs (DYADLAB_SYNTH_*) are listed in ``service.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable

import grpc

from dyadlab import client, rpc
from dyadlab.config import Settings
from dyadlab.messages import ROLE_NAME
from dyadlab.v1 import extractor_pb2, extractor_pb2_grpc, synth_pb2, synth_pb2_grpc
from services.synth.service import Synth

log = logging.getLogger("dyadlab.synth")


class SynthService:
    """The rpc.Service: the servicer, the extractor channel and the health
    monitor around a `Synth` (the RPCs' work)."""

    name = "dyadlab.v1.Synth"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.channel: grpc.aio.Channel | None = None
        self._health: Callable[[bool], Awaitable[None]] | None = None  # bind_health's setter
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: asyncio.Task | None = None
        self._serving: bool | None = None
        self._wake = asyncio.Event()
        self.synth = Synth(settings, on_down=self._mark_down)

    def register(self, server: grpc.aio.Server) -> None:
        synth_pb2_grpc.add_SynthServicer_to_server(_Servicer(self), server)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.channel = client.aio_channel(self.settings.extractor_addr, self.settings)
        why = await asyncio.to_thread(self.synth.model.probe, self.synth.default_model)
        self._monitor = asyncio.create_task(self._watch(first=why))

    def bind_health(self, set_serving) -> None:
        """rpc.serve's hook: synth sets its own health from TorchServe probes."""
        self._health = set_serving

    async def _set(self, why: str | None) -> None:
        """SERVING when `why` is None (a prediction succeeded), else NOT_SERVING."""
        ok = why is None
        assert self._health is not None  # rpc.serve binds it before start()
        await self._health(ok)
        if ok != self._serving:
            log.info(
                "torchserve " + ("answers: SERVING" if ok else "not usable: NOT_SERVING"),
                extra={"addr": self.synth.ts_addr, **({} if why is None else {"reason": why[:300]})},
            )
        self._serving = ok

    async def _watch(self, first: str | None) -> None:
        why = first
        while True:
            await self._set(why)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.synth.probe_s)
            why = await asyncio.to_thread(self.synth.model.probe, self.synth.default_model)

    def _mark_down(self) -> None:
        """Called from worker threads when TorchServe fails: re-probe now."""
        if self._loop is not None and self._monitor is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        if self.channel is not None:
            await self.channel.close()
        self.synth.close()


class _Servicer(synth_pb2_grpc.SynthServicer):
    def __init__(self, svc: SynthService):
        self.svc = svc

    @rpc.status_errors
    async def Transform(self, request, context):
        return await asyncio.to_thread(self.svc.synth.transform, request)

    @rpc.status_errors
    async def Matrix(self, request, context):
        return await asyncio.to_thread(self.svc.synth.matrix, request)

    @rpc.status_errors
    async def Transfer(self, request, context):
        svc, synth = self.svc, self.svc.synth
        t0 = time.perf_counter()
        yield synth_pb2.TransferEvent(progress=rpc.progress("faces", 0, 2, "finding the novel faces"))
        inp = await asyncio.to_thread(synth.transfer_inputs, request)
        yield synth_pb2.TransferEvent(progress=rpc.progress("faces", 2, 2, ""))
        opts = extractor_pb2.ExtractOptions()
        opts.CopyFrom(request.extract)
        opts.skip_speech = True  # only the faces are needed
        stub = extractor_pb2_grpc.ExtractorStub(svc.channel)
        call = stub.Extract(
            extractor_pb2.ExtractRequest(video=request.video, options=opts),
            timeout=rpc.downstream_timeout(context, svc.settings.rpc_timeout_s),
        )
        async for kind, value in rpc.relay_progress(call, "extract", peer="extractor"):
            if kind == "progress":
                yield synth_pb2.TransferEvent(progress=rpc.progress(*value))
            else:
                extract = value
        notes = [
            f"real face {f.face_id} ({ROLE_NAME.get(f.role, 'role unknown')}): tracked in "
            f"{f.frames_tracked} of {extract.video.frames} frames"
            for f in extract.faces
        ]
        cancelled = threading.Event()

        def report_or_stop(report):
            def r(stage, done, total, message=""):
                if cancelled.is_set():
                    raise rpc.Cancelled("the Transfer's caller went away; work stopped")
                report(stage, done, total, message)

            return r

        try:
            async for kind, value in rpc.progress_stream(
                lambda report: synth.run_transfer(request, inp, extract, notes, report_or_stop(report))
            ):
                if kind == "progress":
                    yield synth_pb2.TransferEvent(progress=rpc.progress(*value))
                else:
                    value.seconds = time.perf_counter() - t0
                    yield synth_pb2.TransferEvent(result=value)
        finally:
            cancelled.set()  # the caller went away (or we are done): the worker stops at its next step


def main() -> None:
    rpc.run(SynthService, lambda s: s.synth_addr)


if __name__ == "__main__":
    main()
