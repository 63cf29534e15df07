"""TorchServe handler for synth (avLandmarkGAN): one class, `SynthHandler`.

Packed into a .mar by services/synth/archive.py, which puts this file at the
archive's top level (as ``synth_handler.py``) and the modules it needs under
``services/synth/`` beside it; TorchServe's worker runs with the unpacked
archive directory on sys.path, so ``services.synth.generate`` resolves to the
archive's copy, not to whatever else the Python environment has.

Requests. TorchServe hands `handle` a list of requests (one per client call;
several when its batching groups them: batch_size / max_batch_delay in the
archive's model-config.yaml). Each is a dict of the gRPC ``input`` map (or the
REST form fields), values bytes:

* mode ``transform`` (the default when "mode" is absent)
  - ``crop``      PNG (or anything OpenCV decodes) of an S x S RGB aligned face crop,
                  S = the model's size
  - ``landmarks`` JSON list of 136 floats ``[x_0..x_67, y_0..y_67]``, crop pixels
  - ``valence``, ``arousal``  ASCII floats in [-1, 1]
  - ``judge``     optional, "1" / "true": also the VA judge on input and output
  -> JSON ``{"image_png_b64": str, "landmarks": [136 floats, crop px],
             "colour_png_b64": str, "mask_png_b64": str,
             "judged_input": [v, a], "judged_output": [v, a]}``: the output
     crop (RGB), the target landmarks, the luma to paste (the generator's
     colour C's or the input's moved by C's change, `Synthesizer.generate`;
     grey PNG; the photo keeps its own chroma) and the blend weight m as a
     grey PNG (255 = all redrawn; ``paste.blend_weight``), which the synth
     service needs to paste the face back into the photo (``paste.py``);
     the judged fields only with judge=1
* mode ``judge``: ``crop`` only -> JSON ``{"va": [v, a]}``

All transform requests of a batch go through the networks in one forward pass,
all judge work (judge mode and judge=1) in one more.

Errors. TorchServe 0.12's gRPC frontend ignores per-request status codes
(GRPCJob.response() sends every prediction as OK; only REST honours
context.set_response_status), and an exception fails the whole batch. So:

* every request of the batch is bad (always the case for a lone bad request,
  batch of 1) -> PredictionException(message, 400): the client sees gRPC
  status INVALID_ARGUMENT (GRPCUtils maps 400 -> INVALID_ARGUMENT; REST: HTTP
  400) with the message as details;
* a bad request batched with good ones -> it alone gets a JSON body
  ``{"error": message, "code": 400}`` (status OK over gRPC, HTTP 400 over
  REST); the good ones are answered normally. A gRPC caller must therefore
  check for "error" in the reply (the synth service does, and validates its
  inputs before calling TorchServe, so this is the last line of defence);
* anything unexpected (a failing forward pass) raises: TorchServe fails the
  whole batch with 503 "Prediction failed" = gRPC UNAVAILABLE.

Every reply also carries ``"batch"``: how many requests shared its forward pass.

Threads: torch.set_num_threads(DYADLAB_SYNTH_THREADS, else the model-config's
``handler: {threads: N}``, else 1) -- one worker per core is the scaling unit.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import time
from typing import Any, Literal, cast, overload

import numpy as np

log = logging.getLogger(__name__)

MODES = ("transform", "judge")
MAX_CROP_BYTES = 8 << 20
BAD_REQUEST = 400


class SynthHandler:
    """initialize(context) loads the model; handle(data, context) answers a batch."""

    def __init__(self):
        self.synth = None
        self.initialized = False
        self.context = None

    # -- lifecycle ----------------------------------------------------------------
    def initialize(self, context) -> None:
        import torch

        from services.synth.generate import Synthesizer

        self.context = context
        props = context.system_properties
        manifest = context.manifest
        model_dir = props.get("model_dir")
        serialized = manifest["model"].get("serializedFile")
        if not serialized:
            raise RuntimeError("the archive has no serialized model file (--serialized-file)")
        path = os.path.join(model_dir, serialized)
        if not os.path.isfile(path):
            raise RuntimeError(f"model file {serialized!r} missing from the archive")
        handler_cfg = (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}
        threads = int(os.environ.get("DYADLAB_SYNTH_THREADS") or handler_cfg.get("threads") or 1)
        torch.set_num_threads(max(1, threads))
        t0 = time.perf_counter()
        self.synth = Synthesizer.load(path)
        self.initialized = True
        log.info(
            "synth model %s loaded: size %d, %d thread(s), %.2f s",
            serialized,
            self.synth.size,
            torch.get_num_threads(),
            time.perf_counter() - t0,
        )

    # -- request parsing ------------------------------------------------------------
    @overload
    @staticmethod
    def _field(req: dict, name: str, required: Literal[True] = True) -> bytes: ...
    @overload
    @staticmethod
    def _field(req: dict, name: str, required: bool) -> bytes | None: ...
    @staticmethod
    def _field(req: dict, name: str, required: bool = True) -> bytes | None:
        v = req.get(name)
        if v is None:
            if required:
                raise ValueError(f"missing field {name!r} (got {sorted(req)})")
            return None
        if isinstance(v, str):
            return v.encode()
        if isinstance(v, (bytes, bytearray, memoryview)):
            return bytes(v)
        if isinstance(v, (int, float, list)):  # REST JSON bodies arrive decoded
            return json.dumps(v).encode()
        raise ValueError(f"field {name!r}: unsupported type {type(v).__name__}")

    @staticmethod
    def _text(raw: bytes, name: str) -> str:
        try:
            return raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ValueError(f"field {name!r} must be ASCII text") from None

    def _float(self, req: dict, name: str) -> float:
        s = self._text(self._field(req, name), name)
        try:
            v = float(s)
        except ValueError:
            raise ValueError(f"field {name!r} must be a number, got {s[:40]!r}") from None
        if not math.isfinite(v) or not -1.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [-1, 1], got {v}")
        return v

    def _crop(self, req: dict) -> np.ndarray:
        import cv2

        raw = self._field(req, "crop")
        if len(raw) > MAX_CROP_BYTES:
            raise ValueError(f"crop is {len(raw)} bytes; at most {MAX_CROP_BYTES}")
        img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED) if raw else None
        if img is None:
            raise ValueError("crop is not a decodable image (send PNG bytes)")
        if img.dtype != np.uint8:
            raise ValueError(f"crop must be 8-bit, got {img.dtype}")
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        elif img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
        else:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        s = self.synth.size
        if img.shape[:2] != (s, s):
            raise ValueError(f"crop must be {s}x{s} (this model's size), got {img.shape[1]}x{img.shape[0]}")
        return img

    def _landmarks(self, req: dict) -> np.ndarray:
        raw = self._field(req, "landmarks")
        try:
            v = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ValueError("landmarks must be a JSON list of 136 numbers") from None
        if not isinstance(v, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v
        ):
            raise ValueError("landmarks must be a JSON list of 136 numbers")
        if len(v) != 136:
            raise ValueError(f"landmarks must have 136 numbers [x_0..x_67, y_0..y_67], got {len(v)}")
        a = np.asarray(v, np.float64)
        if not np.isfinite(a).all():
            raise ValueError("landmarks contain NaN or infinity")
        pts = np.stack([a[:68], a[68:]], axis=1)
        if float(np.sqrt(((pts - pts.mean(axis=0)) ** 2).sum(axis=1).mean())) <= 1e-6:
            raise ValueError("landmarks are degenerate (all points in one place)")
        return pts.astype(np.float32)

    def parse(self, req: dict) -> dict:
        """One request -> {"mode", "crop", ...}; ValueError with the reason if bad."""
        if not isinstance(req, dict):
            raise ValueError(f"a request must be a map of fields, got {type(req).__name__}")
        raw_mode = self._field(req, "mode", required=False)
        mode = self._text(raw_mode, "mode").lower() if raw_mode else "transform"
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {list(MODES)}")
        out: dict[str, Any] = {"mode": mode, "crop": self._crop(req)}
        if mode == "transform":
            out["landmarks"] = self._landmarks(req)
            out["va"] = (self._float(req, "valence"), self._float(req, "arousal"))
            j = self._field(req, "judge", required=False)
            out["judge"] = bool(j and self._text(j, "judge").lower() in ("1", "true", "yes"))
        return out

    # -- TorchServe's steps ------------------------------------------------------------
    def preprocess(self, data: list) -> tuple[list[dict | None], list[str | None]]:
        parsed: list[dict | None] = []
        errors: list[str | None] = []
        for req in data:
            try:
                parsed.append(self.parse(req))
                errors.append(None)
            except ValueError as e:
                parsed.append(None)
                errors.append(str(e))
        return parsed, errors

    def inference(self, parsed: list[dict | None]) -> list[dict | None]:
        """One transform pass over every transform request, one judge pass over
        every image to be judged."""
        syn = self.synth
        results: list[dict | None] = [None if p is None else {} for p in parsed]
        # by request index, the requests that parsed and their (same) result dicts
        reqs = {i: p for i, p in enumerate(parsed) if p is not None}
        res = {i: r for i, r in enumerate(results) if r is not None}
        tr = [i for i, p in enumerate(parsed) if p is not None and p["mode"] == "transform"]
        if tr:
            g = syn.generate(
                np.stack([reqs[i]["crop"] for i in tr]),
                np.stack([reqs[i]["landmarks"] for i in tr]),
                np.array([reqs[i]["va"] for i in tr], np.float32),
            )
            for k, i in enumerate(tr):
                res[i]["image"] = g.images[k]
                res[i]["landmarks"] = g.landmarks[k]
                res[i]["colour"] = np.clip(np.rint(g.colour[k]), 0, 255).astype(
                    np.uint8
                )  # (S, S) or (S, S, 3)
                res[i]["mask"] = np.clip(np.rint(g.mask[k] * 255), 0, 255).astype(np.uint8)
        to_judge = []  # (request index, result key, image)
        for i, p in enumerate(parsed):
            if p is None:
                continue
            if p["mode"] == "judge":
                to_judge.append((i, "va", p["crop"]))
            elif p["judge"]:
                to_judge += [(i, "judged_input", p["crop"]), (i, "judged_output", res[i]["image"])]
        if to_judge:
            va = syn.judge(np.stack([img for _, _, img in to_judge]))
            for (i, key, _), v in zip(to_judge, va):
                res[i][key] = [round(float(v[0]), 6), round(float(v[1]), 6)]
        return results

    @staticmethod
    def _png(img: np.ndarray) -> bytes:
        """PNG of an (S, S, 3) RGB or an (S, S) / (S, S, 1) grey image."""
        import cv2

        a = img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img
        ok, buf = cv2.imencode(".png", cv2.cvtColor(a, cv2.COLOR_RGB2BGR) if a.ndim == 3 else a)
        if not ok:
            raise RuntimeError("PNG encoding failed")
        return buf.tobytes()

    def postprocess(self, results: list[dict | None], errors: list[str | None]) -> list[bytes]:
        out = []
        for idx, (r, err) in enumerate(zip(results, errors)):
            if err is not None:
                if self.context is not None:
                    self.context.set_response_status(BAD_REQUEST, err, idx)
                out.append(json.dumps({"error": err, "code": BAD_REQUEST}).encode())
                continue
            assert r is not None  # a request without an error parsed: it has a result
            body: dict = {"batch": len(results)}
            if "image" in r:
                lm = r["landmarks"]
                body["image_png_b64"] = base64.b64encode(self._png(r["image"])).decode("ascii")
                body["landmarks"] = [round(float(x), 4) for x in np.concatenate([lm[:, 0], lm[:, 1]])]
                body["colour_png_b64"] = base64.b64encode(self._png(r["colour"])).decode("ascii")
                body["mask_png_b64"] = base64.b64encode(self._png(r["mask"])).decode("ascii")
            for key in ("judged_input", "judged_output", "va"):
                if key in r:
                    body[key] = r[key]
            out.append(json.dumps(body).encode())
        return out

    def handle(self, data, context) -> list[bytes] | None:
        if not self.initialized:
            self.initialize(context)
        if data is None:
            return None
        self.context = context
        parsed, errors = self.preprocess(data)
        if data and all(e is not None for e in errors):
            raise self._bad_request(cast("list[str]", errors))  # all str: checked just above
        return self.postprocess(self.inference(parsed), errors)

    @staticmethod
    def _bad_request(errors: list[str]) -> Exception:
        """One exception for a batch of only bad requests (TorchServe sends its
        message and code to every request of the batch)."""
        if len(set(errors)) == 1:
            msg = errors[0]
        else:
            msg = f"{len(errors)} bad requests in one batch: " + "; ".join(
                f"[{i}] {e}" for i, e in enumerate(errors)
            )
        try:
            from ts.utils.util import PredictionException
        except ImportError:  # outside TorchServe (unit tests)
            return ValueError(msg)
        return PredictionException(msg, BAD_REQUEST)
