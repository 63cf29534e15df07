"""A local TorchServe (0.12.0) for dyadlab: config, start, readiness, stop, gRPC client.

One `TorchServe` is one server in its own working directory:

    ts = TorchServe(workdir, model_store, {"synth": "synth.mar"})
    ts.start()                     # returns once every model has a READY worker
    ts.predict("synth", {"data": b"..."})
    ts.stop()                      # java and its Python workers are gone

The modules:

* :mod:`.process` -- the server: `TorchServe` (config.properties, start,
  readiness, stop, attach), `Ports`, `Keys`, the pid and state files, its
  working directory and its isolation from other TorchServes;
* :mod:`.client`  -- the gRPC inference API with token auth: `InferenceClient`,
  `predict`, `ping`, `auth_metadata`;
* :mod:`.archive` -- model archives: `build_mar` (torch-model-archiver).

Import the names from here (``from dyadlab import torchserve as T``).
(`dyadlab.torchserve_grpc` is the generated gRPC code, a separate package.)
"""

from __future__ import annotations

from .archive import build_mar
from .client import InferenceClient, auth_metadata, ping, predict
from .process import (
    CONFIG_FILE,
    DEFAULT_TOKEN_EXPIRATION_MIN,
    KEY_FILE,
    LOG_FILE,
    PID_FILE,
    START_TIMEOUT_S,
    STATE_FILE,
    TS_NAMESPACE,
    Keys,
    Ports,
    TorchServe,
    TorchServeError,
    _is_torchserve,
    file_url_regex,
    free_port,
    java_available,
    port_free,
)

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_TOKEN_EXPIRATION_MIN",
    "KEY_FILE",
    "LOG_FILE",
    "PID_FILE",
    "START_TIMEOUT_S",
    "STATE_FILE",
    "TS_NAMESPACE",
    "InferenceClient",
    "Keys",
    "Ports",
    "TorchServe",
    "TorchServeError",
    "_is_torchserve",
    "auth_metadata",
    "build_mar",
    "file_url_regex",
    "free_port",
    "java_available",
    "ping",
    "port_free",
    "predict",
]
