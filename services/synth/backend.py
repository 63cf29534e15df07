"""synth's model backend: the synth handler in TorchServe (handler contract in
``handler.py``: mode "transform" / "judge"), called over TorchServe's gRPC
inference API.

TorchServe's key_file.json is re-read after PERMISSION_DENIED (a restarted
TorchServe has new keys); its failures become the statuses a synth caller
should see (see `Model`)."""

from __future__ import annotations

import base64
import json
import math
import re
import threading
from pathlib import Path

import grpc
import numpy as np
import prometheus_client as prom

from dyadlab import rpc
from dyadlab.torchserve import InferenceClient
from services.synth import landmarks as L
from services.synth.images import decode_png_as_is, decode_png_rgb, png

PREDICTIONS = prom.Counter("dyadlab_synth_predictions_total", "TorchServe predictions", ["mode", "outcome"])

DEFAULT_SIZE = 64  # the model's crop side until a probe says otherwise
_SIZE_IN_MESSAGE = re.compile(r"must be (\d+)x(\d+)")


class Model:
    """The synth handler in TorchServe, over its gRPC inference API.

    Every call has a deadline; failures become rpc.UserError with the status a
    caller should see (UNAVAILABLE: TorchServe not answering; FAILED_PRECONDITION:
    the model is not loaded or the key is refused)."""

    def __init__(self, addr: str, key_file: str, timeout_s: float, on_down=None, off: bool = False):
        self.addr, self.key_file, self.timeout_s, self.off = addr, key_file, timeout_s, off
        self.on_down = on_down or (lambda: None)
        self._lock = threading.Lock()
        self._client: InferenceClient | None = None
        self._sizes: dict[str, int] = {}

    def _key(self) -> str | None:
        if not self.key_file:
            return None
        try:
            return json.loads(Path(self.key_file).read_text())["inference"]["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no key yet (TorchServe starting): the call says PERMISSION_DENIED

    def _get_client(self, fresh: bool = False) -> InferenceClient:
        with self._lock:
            if fresh and self._client is not None:
                self._client.close()
                self._client = None
            if self._client is None:
                self._client = InferenceClient(self.addr, self._key())
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _error(self, e: grpc.RpcError, model: str) -> rpc.UserError:
        code, details = e.code(), (e.details() or "").strip()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self.on_down()
            what = (
                "did not answer within the deadline"
                if code == grpc.StatusCode.DEADLINE_EXCEEDED
                else "is not answering"
            )
            return rpc.UserError(
                grpc.StatusCode.UNAVAILABLE,
                f"TorchServe at {self.addr} {what} ({details[:200] or code.name}); "
                "is it running (`dyadlab up`)?",
            )
        if "not found" in details.lower() or code == grpc.StatusCode.NOT_FOUND:
            self.on_down()
            return rpc.UserError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {model!r} is not loaded in TorchServe at {self.addr}: "
                "train one (`dyadlab synth train`) and publish its archive",
            )
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            self.on_down()
            return rpc.UserError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"TorchServe at {self.addr} refused the inference key "
                f"(key file: {self.key_file or 'none configured'})",
            )
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            if _SIZE_IN_MESSAGE.search(details):
                self._sizes.pop(model, None)  # the model was replaced: learn its size again
            return rpc.UserError(
                grpc.StatusCode.INTERNAL, f"model {model!r} rejected the service's request: {details[:300]}"
            )
        if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
            # e.g. "Worker died." or a full queue: TorchServe restarts workers,
            # so the same request can succeed when retried
            return rpc.UserError(
                grpc.StatusCode.UNAVAILABLE,
                f"TorchServe is temporarily unable to predict ({code.name}: {details[:200]}); retry",
            )
        return rpc.UserError(grpc.StatusCode.INTERNAL, f"TorchServe error {code.name}: {details[:300]}")

    def predict(self, model: str, fields: dict[str, bytes], mode: str) -> dict:
        """One prediction -> the handler's JSON reply."""
        if self.off:
            raise rpc.UserError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "TorchServe is not running in this stack (DYADLAB_TORCHSERVE=off, or "
                "`dyadlab up` found no java, torchserve or synth model: see its notes "
                "and DYADLAB_SYNTH_MODEL)",
            )
        for attempt in (0, 1):
            try:
                raw = self._get_client(fresh=attempt > 0).predict(model, fields, timeout=self.timeout_s)
                break
            except grpc.RpcError as e:
                if attempt == 0 and e.code() in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                ):
                    continue  # TorchServe restarted with new keys: re-read the key file once
                PREDICTIONS.labels(mode, e.code().name).inc()
                raise self._error(e, model) from None
        PREDICTIONS.labels(mode, "OK").inc()
        try:
            out = json.loads(raw)
        except ValueError:
            raise rpc.UserError(
                grpc.StatusCode.INTERNAL, f"model {model!r} answered something that is not JSON"
            ) from None
        if not isinstance(out, dict):
            raise rpc.UserError(grpc.StatusCode.INTERNAL, f"model {model!r}: unexpected reply")
        return out

    # the handler's two modes
    def judge(self, model: str, crop: np.ndarray) -> tuple[float, float]:
        out = self.predict(model, {"mode": b"judge", "crop": png(crop)}, "judge")
        return _va_pair(out.get("va"), model)

    def transform(
        self, model: str, crop: np.ndarray, lm: np.ndarray, va: tuple[float, float], judge: bool = True
    ) -> dict:
        """-> {"image": (S, S, 3) uint8, "landmarks": (68, 2) crop px, "colour": (S, S)
        luma in [0, 255], "mask": (S, S) blend weight in [0, 1], "judged_input",
        "judged_output"} (handler.py's reply, decoded)."""
        fields = {
            "mode": b"transform",
            "crop": png(crop),
            "landmarks": json.dumps([round(float(x), 4) for x in L.to_vector(lm)]).encode(),
            "valence": repr(float(va[0])).encode(),
            "arousal": repr(float(va[1])).encode(),
        }
        if judge:
            fields["judge"] = b"1"
        out = self.predict(model, fields, "transform")
        try:
            img = decode_png_rgb(base64.b64decode(out["image_png_b64"], validate=True))
            lm_out = L.to_points(np.asarray(out["landmarks"], np.float32))
            colour = _png_field(out, "colour_png_b64")
            mask = _png_field(out, "mask_png_b64", grey=True)
            if colour is None or colour.shape[:2] != img.shape[:2]:
                raise ValueError("colour")
            if mask is None or mask.shape != img.shape[:2]:
                raise ValueError("mask")
        except (KeyError, ValueError, TypeError):
            raise rpc.UserError(
                grpc.StatusCode.INTERNAL,
                f"model {model!r}: transform reply lacks a valid image, landmarks, colour or mask",
            ) from None
        res: dict[str, np.ndarray | tuple[float, float] | None] = {
            "image": img,
            "landmarks": lm_out,
            "colour": colour.astype(np.float32),
            "mask": mask.astype(np.float32) / 255.0,
        }
        if judge:
            res["judged_input"] = _va_pair(out.get("judged_input"), model)
            res["judged_output"] = _va_pair(out.get("judged_output"), model)
        return res

    def size(self, model: str) -> int:
        """The model's crop side, learnt with one judge prediction (cached):
        the handler says "crop must be NxN" when a crop has the wrong size."""
        if model in self._sizes:
            return self._sizes[model]
        s = DEFAULT_SIZE
        for _ in range(2):
            try:
                self.judge(model, np.full((s, s, 3), 128, np.uint8))
                self._sizes[model] = s
                return s
            except rpc.UserError as e:
                m = _SIZE_IN_MESSAGE.search(str(e))
                if e.code != grpc.StatusCode.INTERNAL or not m or int(m[1]) == s:
                    raise
                s = int(m[1])
        raise rpc.UserError(grpc.StatusCode.INTERNAL, f"model {model!r}: cannot learn its crop size")

    def probe(self, model: str) -> str | None:
        """None when a real prediction succeeds, else why not."""
        try:
            known = model in self._sizes
            s = self.size(model)  # a judge prediction when the size is not known yet
            if known:
                self.judge(model, np.full((s, s, 3), 128, np.uint8))
            return None
        except rpc.UserError as e:
            return str(e)


def _png_field(out: dict, name: str, grey: bool = False) -> np.ndarray | None:
    """A base64 PNG of the reply (None when absent): (S, S) for a grey PNG,
    (S, S, 3) RGB for a colour one; `grey`: it must be grey."""
    if name not in out:
        return None
    img = decode_png_as_is(base64.b64decode(out[name], validate=True))
    if grey and img.ndim != 2:
        raise ValueError(f"{name} must be a grey PNG")
    return img


def _va_pair(v, model: str) -> tuple[float, float]:
    try:
        a, b = float(v[0]), float(v[1])
        if math.isfinite(a) and math.isfinite(b) and len(v) == 2:
            return a, b
    except (TypeError, ValueError, IndexError):
        pass
    raise rpc.UserError(grpc.StatusCode.INTERNAL, f"model {model!r}: reply lacks a valid VA pair")
