"""All configuration comes from environment variables with safe defaults.

| variable                  | default                         | meaning |
|---------------------------|---------------------------------|---------|
| DYADLAB_HOME              | ~/.local/share/dyadlab          | local state: store, run files, logs |
| DYADLAB_STORE_DIR         | $DYADLAB_HOME/store             | local-directory object store (the embedded default) |
| DYADLAB_S3_ENDPOINT       | (unset = local directory)       | host:port of an S3-compatible store (MinIO, Swift s3api, ...) |
| DYADLAB_S3_ACCESS_KEY     |                                 | S3 access key (or DYADLAB_S3_ACCESS_KEY_FILE: a file holding it) |
| DYADLAB_S3_SECRET_KEY     |                                 | S3 secret key (or DYADLAB_S3_SECRET_KEY_FILE: a file holding it) |
| DYADLAB_S3_SSE            | auto                            | server-side encryption (SSE-S3) of every object: auto (if the store supports it), on (refuse to store unencrypted), off |
| DYADLAB_S3_SECURE         | true                            | https to the S3 endpoint |
| DYADLAB_S3_REGION         | us-east-1                       | S3 region |
| DYADLAB_BUCKET            | dyadlab                         | bucket for everything |
| DYADLAB_BIND              | 127.0.0.1                       | address services listen on |
| DYADLAB_EXTRACTOR_ADDR    | 127.0.0.1:50061                 | where the extractor listens / is reached |
| DYADLAB_SMILES_ADDR       | 127.0.0.1:50062                 | where the smiles service listens / is reached |
| DYADLAB_STATS_ADDR        | 127.0.0.1:50063                 | where the stats service listens / is reached |
| DYADLAB_METRICS_PORT      | 0 (per-service default in `up`) | Prometheus port of a service; 0 = off |
| DYADLAB_LOG_LEVEL         | INFO                            | log level |
| DYADLAB_WORKERS           | number of CPUs                  | worker processes for frame processing |
| DYADLAB_MAX_VIDEO_BYTES   | 4 GiB                           | larger videos are refused |
| DYADLAB_RPC_TIMEOUT_S     | 3600                            | deadline of long calls made by clients; also every call that names none |
| DYADLAB_SYNTH_ADDR        | 127.0.0.1:50064                 | where the synth service listens / is reached |
| DYADLAB_SYNTH_MODEL       | <repo>/models/synth/synth-64.pt | exported synth model `dyadlab up` serves (missing: no TorchServe) |
| DYADLAB_TORCHSERVE        | auto                            | `up` starts TorchServe: auto (if java, torchserve and the model exist) or off |
| DYADLAB_TORCHSERVE_GRPC   | 127.0.0.1:7070                  | TorchServe gRPC inference API (what the synth service calls; DYADLAB_TORCHSERVE_ADDR is an alias) |
| DYADLAB_TORCHSERVE_GRPC_MANAGEMENT | 127.0.0.1:7071         | TorchServe gRPC management API (loopback only) |
| DYADLAB_TORCHSERVE_HTTP   | 127.0.0.1:7080                  | TorchServe REST inference API |
| DYADLAB_TORCHSERVE_MANAGEMENT | 127.0.0.1:7081              | TorchServe REST management API (loopback only) |
| DYADLAB_TORCHSERVE_METRICS | 127.0.0.1:7082                 | TorchServe Prometheus metrics |
| DYADLAB_TORCHSERVE_KEY_FILE | $DYADLAB_HOME/torchserve/key_file.json | TorchServe's token file (0600; the synth service reads the inference key from it; `up` sets it) |
| DYADLAB_SYNTH_WORKERS     | 1                               | TorchServe workers for the synth model |
| DYADLAB_SYNTH_THREADS     | 1                               | torch threads per worker |
| DYADLAB_SYNTH_BATCH       | 8                               | TorchServe batch size for synth |
| DYADLAB_SYNTH_BATCH_DELAY_MS | 20                           | longest wait to fill a batch |
| DYADLAB_SYNTH_PREDICT_TIMEOUT_S | 30                        | deadline of one TorchServe prediction (read by services/synth/server.py) |
| DYADLAB_SYNTH_PROBE_S     | 5                               | synth's TorchServe health probe interval (idem) |
| DYADLAB_SYNTH_CONCURRENCY | 4                               | predictions synth keeps in flight per call (idem) |

Security (dyadlab/security.py, docs/security.md):

| variable                  | default                         | meaning |
|---------------------------|---------------------------------|---------|
| DYADLAB_TLS_CERT / _KEY   | (unset: local development TLS)  | PEM certificate chain and key of a service (also its client certificate) |
| DYADLAB_TLS_CA            | (unset: system roots)           | PEM CA bundle: verifies servers (clients) and client certificates (servers) |
| DYADLAB_TLS_CLIENT_AUTH   | none                            | `require`: mutual TLS, a client certificate signed by DYADLAB_TLS_CA is required |
| DYADLAB_TLS_CLIENT_CERT / _KEY | (DYADLAB_TLS_CERT / _KEY)  | certificate a client presents (mutual TLS) |
| DYADLAB_TLS_SERVER_NAME   |                                 | name to verify in server certificates instead of the address's host |
| DYADLAB_INSECURE          | (unset)                         | plaintext gRPC: `1` on loopback only (development); `any` also on other addresses (only inside a network that encrypts) |
| DYADLAB_LOCAL_DIR         | ~/.config/dyadlab/local         | per-user local CA, loopback certificate and tokens (generated; used when no TLS is configured) |
| DYADLAB_AUTH              | on                              | `off`: no authentication or authorization (development only) |
| DYADLAB_AUTH_TOKENS       | (local tokens)                  | access file of a server: `TOKEN-or-sha256:HEX ROLE [NAME]` / `cert:IDENTITY ROLE [NAME]` lines |
| DYADLAB_TOKEN_FILE        | (local user token on loopback)  | file holding the bearer token a client (or a service calling another) sends |
| DYADLAB_AUDIT_LOG         | stderr                          | audit log: a file (JSON lines, 0600, appended) or `stderr` |
| DYADLAB_HEALTH_PORT       | 0 (off)                         | extra plaintext port serving only grpc.health.v1 (probes that cannot do TLS, e.g. kubelet) |

The TorchServe that `dyadlab up` starts listens on one loopback host only
(all DYADLAB_TORCHSERVE_* addresses on 127.0.0.1, localhost or ::1; its
management API must not be reachable from outside); a synth service talking
to a TorchServe elsewhere only needs DYADLAB_TORCHSERVE_GRPC and the key file.

Credentials are never logged (``Settings.__repr__`` hides them).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping


class ConfigError(ValueError):
    pass


#: the exported synth model `dyadlab up` serves unless DYADLAB_SYNTH_MODEL says otherwise
DEFAULT_SYNTH_MODEL = Path(__file__).resolve().parents[1] / "models" / "synth" / "synth-64.pt"


def _bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true or false)")


def _secret(env_get, name: str) -> tuple[str, Path | None]:
    """NAME's value, or the content of the file NAME_FILE names (never both)."""
    value, file = env_get(name), env_get(name + "_FILE")
    if value and file:
        raise ConfigError(f"set {name} or {name}_FILE, not both")
    if not file:
        return value, None
    path = Path(file).expanduser()
    try:
        return path.read_text().strip(), path
    except OSError as e:
        raise ConfigError(f"{name}_FILE={file}: cannot read it ({e.strerror})") from None


def _path(raw: str) -> Path | None:
    return Path(raw).expanduser() if raw else None


def _security_from_env(s: "Settings", g) -> "Settings":
    insecure_raw = g("DYADLAB_INSECURE").lower()
    if insecure_raw in ("", "0", "false", "no", "off"):
        insecure = ""
    elif insecure_raw in ("1", "true", "yes", "on", "loopback"):
        insecure = "loopback"
    elif insecure_raw == "any":
        insecure = "any"
    else:
        raise ConfigError(f"DYADLAB_INSECURE={insecure_raw!r}: use 1 (plaintext on loopback only) or any")
    client_auth = g("DYADLAB_TLS_CLIENT_AUTH", "none").lower() or "none"
    if client_auth not in ("none", "require"):
        raise ConfigError(f"DYADLAB_TLS_CLIENT_AUTH={client_auth!r}: use none or require")
    s = dataclasses.replace(
        s,
        tls_cert=_path(g("DYADLAB_TLS_CERT")), tls_key=_path(g("DYADLAB_TLS_KEY")),
        tls_ca=_path(g("DYADLAB_TLS_CA")), tls_client_auth=client_auth,
        tls_client_cert=_path(g("DYADLAB_TLS_CLIENT_CERT")),
        tls_client_key=_path(g("DYADLAB_TLS_CLIENT_KEY")),
        tls_server_name=g("DYADLAB_TLS_SERVER_NAME"), insecure=insecure,
        local_dir=_path(g("DYADLAB_LOCAL_DIR")),
        auth=_bool("DYADLAB_AUTH", g("DYADLAB_AUTH", "on")),
        auth_tokens=_path(g("DYADLAB_AUTH_TOKENS")), token_file=_path(g("DYADLAB_TOKEN_FILE")),
        audit_log=g("DYADLAB_AUDIT_LOG"),
        health_port=_int("DYADLAB_HEALTH_PORT", g("DYADLAB_HEALTH_PORT", "0")),
    )
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError("set both DYADLAB_TLS_CERT and DYADLAB_TLS_KEY (or neither)")
    if bool(s.tls_client_cert) != bool(s.tls_client_key):
        raise ConfigError("set both DYADLAB_TLS_CLIENT_CERT and DYADLAB_TLS_CLIENT_KEY (or neither)")
    if s.tls_client_auth == "require" and not (s.tls_ca and s.tls_cert):
        raise ConfigError("DYADLAB_TLS_CLIENT_AUTH=require needs DYADLAB_TLS_CA (to verify client "
                          "certificates) and the server's DYADLAB_TLS_CERT / DYADLAB_TLS_KEY")
    if s.insecure and s.tls_cert:
        raise ConfigError("DYADLAB_INSECURE and DYADLAB_TLS_CERT contradict each other: unset one")
    return s


def _int(name: str, raw: str, minimum: int = 0) -> int:
    try:
        v = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if v < minimum:
        raise ConfigError(f"{name}={v} must be >= {minimum}")
    return v


@dataclasses.dataclass(frozen=True)
class Settings:
    home: Path
    store_dir: Path
    s3_endpoint: str = ""
    s3_access_key: str = dataclasses.field(default="", repr=False)
    s3_secret_key: str = dataclasses.field(default="", repr=False)
    s3_access_key_file: Path | None = None        # where the keys came from (passed on, not the keys)
    s3_secret_key_file: Path | None = None
    s3_sse: str = "auto"
    s3_secure: bool = True
    s3_region: str = "us-east-1"
    bucket: str = "dyadlab"
    bind: str = "127.0.0.1"
    extractor_addr: str = "127.0.0.1:50061"
    smiles_addr: str = "127.0.0.1:50062"
    stats_addr: str = "127.0.0.1:50063"
    metrics_port: int = 0
    log_level: str = "INFO"
    workers: int = 1
    max_video_bytes: int = 4 << 30
    rpc_timeout_s: float = 3600.0
    # synth / TorchServe
    synth_addr: str = "127.0.0.1:50064"
    synth_model: Path = dataclasses.field(default_factory=lambda: DEFAULT_SYNTH_MODEL)
    torchserve: str = "auto"
    torchserve_grpc: str = "127.0.0.1:7070"
    torchserve_grpc_management: str = "127.0.0.1:7071"
    torchserve_http: str = "127.0.0.1:7080"
    torchserve_management: str = "127.0.0.1:7081"
    torchserve_metrics: str = "127.0.0.1:7082"
    torchserve_key_file: Path | None = None       # None: $DYADLAB_HOME/torchserve/key_file.json
    synth_workers: int = 1
    synth_threads: int = 1
    synth_batch: int = 8
    synth_batch_delay_ms: int = 20
    # security (dyadlab/security.py)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_client_auth: str = "none"
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None
    tls_server_name: str = ""
    insecure: str = ""                            # "" | "loopback" | "any"
    local_dir: Path | None = None                 # None: ~/.config/dyadlab/local
    auth: bool = True
    auth_tokens: Path | None = None
    token_file: Path | None = None
    audit_log: str = ""                           # "": stderr
    health_port: int = 0

    @property
    def uses_s3(self) -> bool:
        return bool(self.s3_endpoint)

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def torchserve_dir(self) -> Path:
        """TorchServe's working directory under `dyadlab up` (config, logs, key file)."""
        return self.home / "torchserve"

    @property
    def torchserve_key_path(self) -> Path:
        return self.torchserve_key_file or self.torchserve_dir / "key_file.json"

    @property
    def torchserve_addr(self) -> str:
        """Alias of torchserve_grpc (DYADLAB_TORCHSERVE_ADDR is accepted for DYADLAB_TORCHSERVE_GRPC)."""
        return self.torchserve_grpc

    def torchserve_addrs(self) -> dict[str, str]:
        return {"grpc_inference": self.torchserve_grpc,
                "grpc_management": self.torchserve_grpc_management,
                "inference": self.torchserve_http, "management": self.torchserve_management,
                "metrics": self.torchserve_metrics}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        g = lambda k, d="": env.get(k, d).strip()  # noqa: E731
        home = Path(g("DYADLAB_HOME") or Path.home() / ".local/share/dyadlab").expanduser()
        s = cls(
            home=home,
            store_dir=Path(g("DYADLAB_STORE_DIR") or home / "store").expanduser(),
            s3_endpoint=g("DYADLAB_S3_ENDPOINT"),
            s3_access_key=_secret(g, "DYADLAB_S3_ACCESS_KEY")[0],
            s3_secret_key=_secret(g, "DYADLAB_S3_SECRET_KEY")[0],
            s3_access_key_file=_secret(g, "DYADLAB_S3_ACCESS_KEY")[1],
            s3_secret_key_file=_secret(g, "DYADLAB_S3_SECRET_KEY")[1],
            s3_sse=g("DYADLAB_S3_SSE", "auto").lower() or "auto",
            s3_secure=_bool("DYADLAB_S3_SECURE", g("DYADLAB_S3_SECURE", "true")),
            s3_region=g("DYADLAB_S3_REGION", "us-east-1"),
            bucket=g("DYADLAB_BUCKET", "dyadlab"),
            bind=g("DYADLAB_BIND", "127.0.0.1"),
            extractor_addr=g("DYADLAB_EXTRACTOR_ADDR", "127.0.0.1:50061"),
            smiles_addr=g("DYADLAB_SMILES_ADDR", "127.0.0.1:50062"),
            stats_addr=g("DYADLAB_STATS_ADDR", "127.0.0.1:50063"),
            metrics_port=_int("DYADLAB_METRICS_PORT", g("DYADLAB_METRICS_PORT", "0")),
            log_level=g("DYADLAB_LOG_LEVEL", "INFO").upper(),
            workers=_int("DYADLAB_WORKERS", g("DYADLAB_WORKERS", str(os.cpu_count() or 1)), 1),
            max_video_bytes=_int("DYADLAB_MAX_VIDEO_BYTES", g("DYADLAB_MAX_VIDEO_BYTES", str(4 << 30)), 1),
            rpc_timeout_s=float(_int("DYADLAB_RPC_TIMEOUT_S", g("DYADLAB_RPC_TIMEOUT_S", "3600"), 1)),
        )
        s = dataclasses.replace(
            s,
            synth_addr=g("DYADLAB_SYNTH_ADDR", "127.0.0.1:50064"),
            synth_model=Path(g("DYADLAB_SYNTH_MODEL") or DEFAULT_SYNTH_MODEL).expanduser(),
            torchserve=g("DYADLAB_TORCHSERVE", "auto").lower(),
            torchserve_grpc=g("DYADLAB_TORCHSERVE_GRPC") or g("DYADLAB_TORCHSERVE_ADDR", "127.0.0.1:7070"),
            torchserve_grpc_management=g("DYADLAB_TORCHSERVE_GRPC_MANAGEMENT", "127.0.0.1:7071"),
            torchserve_http=g("DYADLAB_TORCHSERVE_HTTP", "127.0.0.1:7080"),
            torchserve_management=g("DYADLAB_TORCHSERVE_MANAGEMENT", "127.0.0.1:7081"),
            torchserve_metrics=g("DYADLAB_TORCHSERVE_METRICS", "127.0.0.1:7082"),
            torchserve_key_file=Path(g("DYADLAB_TORCHSERVE_KEY_FILE")).expanduser()
            if g("DYADLAB_TORCHSERVE_KEY_FILE") else None,
            synth_workers=_int("DYADLAB_SYNTH_WORKERS", g("DYADLAB_SYNTH_WORKERS", "1"), 1),
            synth_threads=_int("DYADLAB_SYNTH_THREADS", g("DYADLAB_SYNTH_THREADS", "1"), 1),
            synth_batch=_int("DYADLAB_SYNTH_BATCH", g("DYADLAB_SYNTH_BATCH", "8"), 1),
            synth_batch_delay_ms=_int("DYADLAB_SYNTH_BATCH_DELAY_MS",
                                      g("DYADLAB_SYNTH_BATCH_DELAY_MS", "20")),
        )
        s = _security_from_env(s, g)
        if s.torchserve not in ("auto", "off"):
            raise ConfigError(f"DYADLAB_TORCHSERVE={s.torchserve!r}: use auto or off")
        for name, addr in s.torchserve_addrs().items():
            host, _, port = addr.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"TorchServe {name} address {addr!r} is not host:port")
        if s.uses_s3 and not (s.s3_access_key and s.s3_secret_key):
            raise ConfigError("DYADLAB_S3_ENDPOINT is set but DYADLAB_S3_ACCESS_KEY / "
                              "DYADLAB_S3_SECRET_KEY (or their _FILE variants) are not")
        if s.s3_sse not in ("auto", "on", "off"):
            raise ConfigError(f"DYADLAB_S3_SSE={s.s3_sse!r}: use auto, on or off")
        if s.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"DYADLAB_LOG_LEVEL={s.log_level!r}: use DEBUG, INFO, WARNING or ERROR")
        return s

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        return {
            "DYADLAB_HOME": str(self.home), "DYADLAB_STORE_DIR": str(self.store_dir),
            "DYADLAB_S3_ENDPOINT": self.s3_endpoint,
            # a key read from a file is passed on as that file, never as a value
            **({"DYADLAB_S3_ACCESS_KEY_FILE": str(self.s3_access_key_file), "DYADLAB_S3_ACCESS_KEY": ""}
               if self.s3_access_key_file else {"DYADLAB_S3_ACCESS_KEY": self.s3_access_key,
                                                "DYADLAB_S3_ACCESS_KEY_FILE": ""}),
            **({"DYADLAB_S3_SECRET_KEY_FILE": str(self.s3_secret_key_file), "DYADLAB_S3_SECRET_KEY": ""}
               if self.s3_secret_key_file else {"DYADLAB_S3_SECRET_KEY": self.s3_secret_key,
                                                "DYADLAB_S3_SECRET_KEY_FILE": ""}),
            "DYADLAB_S3_SSE": self.s3_sse,
            "DYADLAB_S3_SECURE": "true" if self.s3_secure else "false",
            "DYADLAB_S3_REGION": self.s3_region, "DYADLAB_BUCKET": self.bucket,
            "DYADLAB_BIND": self.bind, "DYADLAB_EXTRACTOR_ADDR": self.extractor_addr,
            "DYADLAB_SMILES_ADDR": self.smiles_addr, "DYADLAB_STATS_ADDR": self.stats_addr,
            "DYADLAB_LOG_LEVEL": self.log_level,
            "DYADLAB_WORKERS": str(self.workers), "DYADLAB_MAX_VIDEO_BYTES": str(self.max_video_bytes),
            "DYADLAB_RPC_TIMEOUT_S": str(int(self.rpc_timeout_s)),
            "DYADLAB_SYNTH_ADDR": self.synth_addr, "DYADLAB_SYNTH_MODEL": str(self.synth_model),
            "DYADLAB_TORCHSERVE": self.torchserve, "DYADLAB_TORCHSERVE_GRPC": self.torchserve_grpc,
            "DYADLAB_TORCHSERVE_GRPC_MANAGEMENT": self.torchserve_grpc_management,
            "DYADLAB_TORCHSERVE_HTTP": self.torchserve_http,
            "DYADLAB_TORCHSERVE_MANAGEMENT": self.torchserve_management,
            "DYADLAB_TORCHSERVE_METRICS": self.torchserve_metrics,
            "DYADLAB_TORCHSERVE_KEY_FILE": str(self.torchserve_key_file or ""),
            "DYADLAB_SYNTH_WORKERS": str(self.synth_workers),
            "DYADLAB_SYNTH_THREADS": str(self.synth_threads),
            "DYADLAB_SYNTH_BATCH": str(self.synth_batch),
            "DYADLAB_SYNTH_BATCH_DELAY_MS": str(self.synth_batch_delay_ms),
            **self.security_env(),
        }

    def security_env(self) -> dict[str, str]:
        """The security settings as environment (file paths and modes, never a secret)."""
        p = lambda v: str(v) if v else ""  # noqa: E731
        return {
            "DYADLAB_TLS_CERT": p(self.tls_cert), "DYADLAB_TLS_KEY": p(self.tls_key),
            "DYADLAB_TLS_CA": p(self.tls_ca), "DYADLAB_TLS_CLIENT_AUTH": self.tls_client_auth,
            "DYADLAB_TLS_CLIENT_CERT": p(self.tls_client_cert),
            "DYADLAB_TLS_CLIENT_KEY": p(self.tls_client_key),
            "DYADLAB_TLS_SERVER_NAME": self.tls_server_name,
            "DYADLAB_INSECURE": {"": "", "loopback": "1", "any": "any"}[self.insecure],
            "DYADLAB_LOCAL_DIR": p(self.local_dir),
            "DYADLAB_AUTH": "on" if self.auth else "off",
            "DYADLAB_AUTH_TOKENS": p(self.auth_tokens), "DYADLAB_TOKEN_FILE": p(self.token_file),
            "DYADLAB_AUDIT_LOG": self.audit_log, "DYADLAB_HEALTH_PORT": str(self.health_port),
        }

    @property
    def local_security_dir(self) -> Path:
        """The per-user local CA, loopback certificate and tokens (dyadlab.security)."""
        if self.local_dir:
            return self.local_dir
        base = os.environ.get("XDG_CONFIG_HOME", "").strip() or Path.home() / ".config"
        return Path(base).expanduser() / "dyadlab" / "local"

    def port_of(self, addr: str) -> int:
        try:
            return int(addr.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            raise ConfigError(f"address {addr!r} is not host:port") from None
