"""One local TorchServe process tree: config.properties, start, readiness, stop.

What the working directory holds: config.properties (written here),
torchserve.log (stdout/stderr of the server), logs/ (TorchServe's own logs, it
writes them to its cwd), key_file.json (the tokens, while it runs) and
torchserve.json (ports, pid, temp dir: lets another process `attach` and stop it).

Isolation. The `torchserve` CLI keeps ONE pid file per machine,
tempfile.gettempdir()/.model_server.pid, and refuses to start while it names a
live server; the frontend puts its worker sockets (.ts.sock.<port>) in
java.io.tmpdir, which the CLI takes from $TEMP. Each instance therefore runs
its CLI calls with its own TMPDIR/TEMP/TMP, so it neither sees nor stops a
user's TorchServe, nor clashes with its worker sockets.

Auth: token authorization stays on unless asked otherwise (see
:mod:`dyadlab.torchserve.client`); the keys are read from key_file.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from .client import InferenceClient, ping, predict

#: what `torchserve --start` puts in the java command line (its pid-file check too)
TS_NAMESPACE = "org.pytorch.serve.ModelServer"
PID_FILE = ".model_server.pid"
KEY_FILE = "key_file.json"
STATE_FILE = "torchserve.json"
LOG_FILE = "torchserve.log"
CONFIG_FILE = "config.properties"
START_TIMEOUT_S = 120.0
#: TorchServe's keys expire after token_expiration_min (its default: 60): too short
#: for `dyadlab up`. The keys are new random ones at every start, the file is 0600
#: and every address is loopback, so a long lifetime is the default here.
DEFAULT_TOKEN_EXPIRATION_MIN = 365 * 24 * 60
#: the longest tmp dir path that keeps <tmp>/.ts.sock.<port> under the 107-byte AF_UNIX limit
_MAX_TMP_LEN = 80
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
#: env vars that would override our config or log location (see TorchServe's configuration docs)
_OVERRIDING_ENV = ("TS_CONFIG_FILE", "LOG_LOCATION", "METRICS_LOCATION")


class TorchServeError(RuntimeError):
    """TorchServe did not start, did not get ready, or did not stop."""


def java_available() -> str | None:
    """Path of the java that `torchserve` will use ($JAVA_HOME/bin/java or PATH), or None."""
    home = os.environ.get("JAVA_HOME")
    if home:
        java = Path(home) / "bin" / "java"
        return str(java) if os.access(java, os.X_OK) else None
    return shutil.which("java")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _script(name: str) -> str:
    """A console script of this venv (next to sys.executable), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise TorchServeError(f"{name} not found (pip install torchserve torch-model-archiver)")
    return found


# -- config.properties ----------------------------------------------------------------
def _prop(value: object) -> str:
    """A value for java.util.Properties.load (ISO-8859-1, backslash escapes)."""
    s = str(value)
    if "\n" in s or "\r" in s:
        raise ValueError(f"newline in a config value: {s!r}")
    out = []
    for ch in s.replace("\\", "\\\\"):
        if 0x20 <= ord(ch) < 0x7F:
            out.append(ch)
        else:  # \uXXXX, as UTF-16 code units
            b = ch.encode("utf-16-be")
            out += [f"\\u{int.from_bytes(b[i : i + 2], 'big'):04x}" for i in range(0, len(b), 2)]
    return "".join(out)


def file_url_regex(directory: str | os.PathLike) -> str:
    """allowed_urls entry (a Java regex) matching file:// URLs below `directory` only."""
    d = str(Path(directory).resolve())
    if "\\E" in d or "," in d:
        raise ValueError(f"cannot express {d!r} in allowed_urls")
    return f"file://\\Q{d}\\E/.*"


@dataclasses.dataclass
class Ports:
    inference: int
    management: int
    metrics: int
    grpc_inference: int
    grpc_management: int

    @classmethod
    def free(cls) -> Ports:
        """Five distinct free loopback ports."""
        socks = []
        try:
            for _ in range(5):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                socks.append(s)
            return cls(*(s.getsockname()[1] for s in socks))
        finally:
            for s in socks:
                s.close()

    @classmethod
    def defaults(cls) -> Ports:
        return cls(8080, 8081, 8082, 7070, 7071)


@dataclasses.dataclass
class Keys:
    inference: str
    management: str
    api: str


def _normalize_models(load_models: Mapping[str, str] | Sequence[str] | str) -> tuple[str, list[str]]:
    """-> (load_models value, model names to wait for)."""
    if isinstance(load_models, str):
        if load_models.lower() in ("all", "none", ""):
            return load_models, []
        load_models = load_models.split(",")
    if isinstance(load_models, Mapping):
        items = list(load_models.items())
    else:
        items = []
        for entry in load_models:
            name, sep, mar = entry.partition("=")
            items.append((name, mar) if sep else (Path(entry).name.split(".")[0], entry))
    for name, mar in items:
        if not _MODEL_NAME.match(name) or "," in mar or "=" in mar:
            raise ValueError(f"invalid load_models entry {name}={mar}")
    return ",".join(f"{n}={m}" for n, m in items), [n for n, _ in items]


# -- the server ---------------------------------------------------------------------
class TorchServe:
    """One local TorchServe process tree, owned by this object (see module doc)."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        model_store: str | os.PathLike,
        load_models: Mapping[str, str] | Sequence[str] | str = (),
        *,
        ports: Ports | None = None,
        host: str = "127.0.0.1",
        token_auth: bool = True,
        token_expiration_min: float | None = DEFAULT_TOKEN_EXPIRATION_MIN,
        workers_per_model: int = 1,
        response_timeout_s: int | None = None,
        vmargs: str | None = None,
        extra_config: Mapping[str, object] | None = None,
        wait_for: Sequence[str] | None = None,
    ):
        self.workdir = Path(workdir).resolve()
        self.model_store = Path(model_store).resolve()
        self.load_models, names = _normalize_models(load_models)
        if self.load_models.lower() == "all":
            names = sorted(p.stem for p in self.model_store.glob("*.mar"))
        self.models: list[str] = list(wait_for) if wait_for is not None else names
        self.ports = ports or Ports.free()
        self.host = host
        self.token_auth = token_auth
        self.token_expiration_min = token_expiration_min
        self.workers_per_model = workers_per_model
        self.response_timeout_s = response_timeout_s
        self.vmargs = vmargs
        self.extra_config = dict(extra_config or {})
        self.tmp_dir: Path | None = None
        self.pid: int | None = None
        self._keys: Keys | None = None
        self.started_at: float | None = None

    # addresses
    @property
    def inference_url(self) -> str:
        return f"http://{self.host}:{self.ports.inference}"

    @property
    def management_url(self) -> str:
        return f"http://{self.host}:{self.ports.management}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}"

    @property
    def grpc_inference_addr(self) -> str:
        return f"{self.host}:{self.ports.grpc_inference}"

    @property
    def grpc_management_addr(self) -> str:
        return f"{self.host}:{self.ports.grpc_management}"

    @property
    def config_path(self) -> Path:
        return self.workdir / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        return self.workdir / LOG_FILE

    @property
    def key_file(self) -> Path:
        return self.workdir / KEY_FILE

    def config(self) -> dict[str, object]:
        """config.properties as a dict (the keys of TorchServe's configuration docs)."""
        h, p = self.host, self.ports
        cfg: dict[str, object] = {
            "inference_address": f"http://{h}:{p.inference}",
            "management_address": f"http://{h}:{p.management}",
            "metrics_address": f"http://{h}:{p.metrics}",
            "grpc_inference_address": h,
            "grpc_inference_port": p.grpc_inference,
            "grpc_management_address": h,
            "grpc_management_port": p.grpc_management,
            "enable_grpc_ssl": "false",
            "metrics_mode": "prometheus",
            "model_store": self.model_store,
            "load_models": self.load_models or "none",
            "default_workers_per_model": self.workers_per_model,
            "disable_token_authorization": "false" if self.token_auth else "true",
            # models come only from the store: no URL downloads, no register/delete API
            "allowed_urls": file_url_regex(self.model_store),
            "enable_model_api": "false",
            "enable_envvars_config": "false",
            "install_py_dep_per_model": "false",
        }
        if self.token_expiration_min is not None:
            cfg["token_expiration_min"] = self.token_expiration_min
        if self.response_timeout_s is not None:
            cfg["default_response_timeout"] = self.response_timeout_s
        if self.vmargs:
            cfg["vmargs"] = self.vmargs
        cfg.update(self.extra_config)
        return cfg

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = ["# written by dyadlab.torchserve"]
        lines += [f"{k}={_prop(v)}" for k, v in self.config().items()]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="latin-1")
        return self.config_path

    def _env(self) -> dict[str, str]:
        assert self.tmp_dir is not None
        env = {k: v for k, v in os.environ.items() if k not in _OVERRIDING_ENV}
        for var in ("TMPDIR", "TEMP", "TMP"):
            env[var] = str(self.tmp_dir)
        return env

    def _make_tmp_dir(self) -> Path:
        tmp = self.workdir / "tmp"
        if len(str(tmp)) > _MAX_TMP_LEN:  # socket paths would be too long
            tmp = Path(tempfile.mkdtemp(prefix="dyadlab-ts-"))
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    def _save_state(self) -> None:
        state = {
            "pid": self.pid,
            "tmp_dir": str(self.tmp_dir),
            "ports": dataclasses.asdict(self.ports),
            "host": self.host,
            "model_store": str(self.model_store),
            "load_models": self.load_models,
            "models": self.models,
            "token_auth": self.token_auth,
        }
        (self.workdir / STATE_FILE).write_text(json.dumps(state, indent=1))

    @classmethod
    def attach(cls, workdir: str | os.PathLike) -> TorchServe:
        """The instance another process started in `workdir` (to query or stop it)."""
        state = json.loads((Path(workdir) / STATE_FILE).read_text())
        ts = cls(
            workdir,
            state["model_store"],
            state["load_models"],
            ports=Ports(**state["ports"]),
            host=state["host"],
            token_auth=state["token_auth"],
            wait_for=state["models"],
        )
        ts.pid, ts.tmp_dir = state["pid"], Path(state["tmp_dir"])
        return ts

    # lifecycle
    def start(self, timeout: float = START_TIMEOUT_S, wait: bool = True) -> TorchServe:
        """Write the config, start TorchServe and (wait=True) return once ready."""
        if self.pid is not None and _is_torchserve(self.pid):
            raise TorchServeError(f"already running (pid {self.pid})")
        if not java_available():
            raise TorchServeError("java not found (TorchServe needs a JDK 11+; set JAVA_HOME)")
        if not self.model_store.is_dir():
            raise TorchServeError(f"model store {self.model_store} is not a directory")
        busy = [p for p in dataclasses.astuple(self.ports) if not port_free(p, self.host)]
        if busy:
            raise TorchServeError(f"ports in use: {busy}")
        self.write_config()
        self.tmp_dir = self._make_tmp_dir()
        self.key_file.unlink(missing_ok=True)
        self._keys = None
        self.started_at = time.monotonic()
        cmd = [
            _script("torchserve"),
            "--start",
            "--ncs",
            "--ts-config",
            str(self.config_path),
            "--model-store",
            str(self.model_store),
        ]
        with open(self.log_path, "ab") as log:
            # the CLI starts java (inheriting this log as stdout/stderr) and returns
            proc = subprocess.run(
                cmd,
                cwd=self.workdir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=60,
            )
        pid_file = self.tmp_dir / PID_FILE
        if proc.returncode != 0 or not pid_file.is_file():
            raise TorchServeError(f"torchserve --start failed ({proc.returncode}):\n{self.log_tail()}")
        self.pid = int(pid_file.read_text().split()[0])
        self._save_state()
        if wait:
            try:
                self.wait_ready(timeout=timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def running(self) -> bool:
        return self.pid is not None and _is_torchserve(self.pid)

    def keys(self, timeout: float = 0.0) -> Keys:
        """The tokens from key_file.json (waits up to `timeout` for the file)."""
        if self._keys is not None:
            return self._keys
        deadline = time.monotonic() + timeout
        while True:
            try:
                k = json.loads(self.key_file.read_text())
                self._keys = Keys(k["inference"]["key"], k["management"]["key"], k["API"]["key"])
                return self._keys
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                if time.monotonic() >= deadline:
                    raise TorchServeError(f"no usable {self.key_file}") from None
                time.sleep(0.05)

    @property
    def inference_key(self) -> str | None:
        return self.keys().inference if self.token_auth else None

    @property
    def management_key(self) -> str | None:
        return self.keys().management if self.token_auth else None

    def _get(self, url: str, key: str | None, timeout: float = 5.0) -> tuple[int, bytes]:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def model_status(self, name: str) -> list[dict]:
        """GET /models/{name} on the management API: one dict per version
        ([] while the model is not registered yet)."""
        code, body = self._get(f"{self.management_url}/models/{name}", self.management_key)
        if code == 404:
            return []
        if code != 200:
            raise TorchServeError(f"GET /models/{name}: HTTP {code} {body[:300]!r}")
        return json.loads(body)

    def ready_workers(self, name: str) -> int:
        return sum(
            1 for v in self.model_status(name) for w in v.get("workers", []) if w.get("status") == "READY"
        )

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> float:
        """Until every awaited model has a READY worker; returns the seconds since start."""
        deadline = time.monotonic() + timeout
        if self.token_auth:
            self.keys(timeout=timeout)
        pending = list(self.models)
        while True:
            if not self.running():
                raise TorchServeError(f"TorchServe exited during startup:\n{self.log_tail()}")
            try:
                pending = [m for m in pending if self.ready_workers(m) == 0]
                if not pending:
                    if not self.models:  # nothing to wait for: the server answers
                        self._check_ping()
                    break
            except (OSError, TorchServeError, grpc.RpcError):
                pass  # not listening yet
            if time.monotonic() >= deadline:
                raise TorchServeError(
                    f"not ready after {timeout:.0f} s (waiting for {pending}):\n{self.log_tail()}"
                )
            time.sleep(0.1)
        return time.monotonic() - (self.started_at or time.monotonic())

    def _check_ping(self) -> None:
        ping(self.grpc_inference_addr, self.inference_key, timeout=2.0)

    def client(self) -> InferenceClient:
        return InferenceClient(self.grpc_inference_addr, self.inference_key)

    def ping(self, timeout: float = 10.0) -> str:
        return ping(self.grpc_inference_addr, self.inference_key, timeout)

    def predict(
        self, model: str, inputs: Mapping[str, bytes], timeout: float = 60.0, version: str = ""
    ) -> bytes:
        return predict(self.grpc_inference_addr, self.inference_key, model, inputs, timeout, version)

    def metrics(self, timeout: float = 5.0) -> str:
        """Prometheus text from the metrics API."""
        code, body = self._get(f"{self.metrics_url}/metrics", self.inference_key, timeout)
        if code != 200:
            raise TorchServeError(f"GET /metrics: HTTP {code} {body[:300]!r}")
        return body.decode()

    def processes(self) -> list:
        """psutil.Process of java and every descendant (the Python workers)."""
        import psutil

        if self.pid is None or not _is_torchserve(self.pid):
            return []
        try:
            parent = psutil.Process(self.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.Error:
            return []

    def stop(self, timeout: float = 60.0) -> None:
        """`torchserve --stop` (this instance's pid file only), then make sure java
        and all its workers are gone (SIGKILL after `timeout`)."""
        import psutil

        procs = self.processes()
        # `torchserve --stop` SIGTERMs whatever pid its pid file names, unchecked:
        # after java died (pid file left behind) that pid may be another process.
        if self.tmp_dir is not None and _pid_file_is_live(self.tmp_dir / PID_FILE):
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                with open(self.log_path, "ab") as log:
                    subprocess.run(
                        [_script("torchserve"), "--stop", "--foreground"],
                        cwd=self.workdir,
                        env=self._env(),
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        timeout=timeout + 10,
                    )
        _gone, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        _gone, alive = psutil.wait_procs(alive, timeout=10)
        if alive:
            raise TorchServeError(f"processes survived stop: {[p.pid for p in alive]}")
        self.pid = None
        self._keys = None
        self.key_file.unlink(missing_ok=True)
        if self.tmp_dir is not None and self.tmp_dir.name.startswith("dyadlab-ts-"):
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        (self.workdir / STATE_FILE).unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        """The end of torchserve.log and of logs/model_log.log (worker errors land there)."""
        out = []
        for path in (self.log_path, self.workdir / "logs" / "model_log.log"):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out) or "(no logs)"

    def __enter__(self) -> TorchServe:
        return self.start() if not self.running() else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _pid_file_is_live(path: Path) -> bool:
    """The pid file exists and names a live TorchServe frontend."""
    try:
        return _is_torchserve(int(path.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return False


def _is_torchserve(pid: int) -> bool:
    """pid is a live TorchServe frontend (the same check as the torchserve CLI)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and TS_NAMESPACE in p.cmdline()
    except psutil.Error:
        return False
