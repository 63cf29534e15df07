"""Checks of the synth requests' simple fields.

A request that can never succeed as sent is INVALID_ARGUMENT, with a message
that names the field (`bad`)."""

from __future__ import annotations

import math
import re

import grpc

from dyadlab import rpc
from dyadlab.v1 import synth_pb2

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def bad(msg: str) -> rpc.UserError:
    return rpc.UserError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def check_va(va: synth_pb2.VA, what: str) -> tuple[float, float]:
    v, a = float(va.valence), float(va.arousal)
    for name, x in (("valence", v), ("arousal", a)):
        if not math.isfinite(x) or not -1.0 <= x <= 1.0:
            raise bad(f"{what}.{name} = {x} is outside [-1, 1]")
    return v, a


def check_model(name: str, default: str = "synth") -> str:
    """The TorchServe model a request names; `default` (DYADLAB_SYNTH_TS_MODEL) when none."""
    if not name:
        return default
    if not _MODEL_NAME.match(name):
        raise bad(f"model name {name!r} is not valid (letters, digits, '_', '.', '-'; at most 64)")
    return name
