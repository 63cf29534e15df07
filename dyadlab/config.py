"""All configuration comes from environment variables with safe defaults.

One table, `VARS`, declares every variable once: its name, the Settings
attribute it fills, how it is parsed, its default and what it means. The
table builds `Settings.from_env`, writes a child process's environment
(`Settings.to_env`) and generates docs/configuration.md
(`python -m dyadlab.config --markdown`; a test keeps that file current).
The services' addresses come from the service registry (dyadlab.services).

Rules the table cannot say on its own (checked in `from_env`): both halves of
a TLS pair or neither; DYADLAB_TLS_CLIENT_AUTH=require needs a CA and a server
certificate; DYADLAB_INSECURE excludes DYADLAB_TLS_CERT; an S3 endpoint needs
both keys. A secret (DYADLAB_S3_*_KEY) comes from the variable or from the
file its _FILE twin names, never both; a child gets the file, never the value.
Credentials are never logged (``Settings.__repr__`` hides them).

The TorchServe that `dyadlab up` starts listens on one loopback host only
(all DYADLAB_TORCHSERVE_* addresses on 127.0.0.1, localhost or ::1; its
management API must not be reachable from outside); a synth service talking
to a TorchServe elsewhere only needs DYADLAB_TORCHSERVE_GRPC and the key file.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dyadlab import services


class ConfigError(ValueError):
    pass


#: the exported synth model `dyadlab up` serves unless DYADLAB_SYNTH_MODEL says otherwise
DEFAULT_SYNTH_MODEL = Path(__file__).resolve().parents[1] / "models" / "synth" / "synth-128-mask.pt"


# -- parsers: (variable name, raw text) -> value -------------------------------------------
def _str(name: str, raw: str) -> str:
    return raw


def _bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true or false)")


def _int_at_least(minimum: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            v = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer") from None
        if v < minimum:
            raise ConfigError(f"{name}={v} must be >= {minimum}")
        return v

    return parse


def _number_above_zero(name: str, raw: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not v > 0:
        raise ConfigError(f"{name}={raw!r} must be > 0")
    return v


def _choice(*choices: str, lower: bool = True) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        v = raw.lower() if lower else raw.upper()
        if v not in choices:
            raise ConfigError(f"{name}={raw!r}: use {', '.join(choices[:-1])} or {choices[-1]}")
        return v

    return parse


def _path(name: str, raw: str) -> Path | None:
    return Path(raw).expanduser() if raw else None


def _addr(name: str, raw: str) -> str:
    host, _, port = raw.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}={raw!r} is not host:port")
    return raw


_INSECURE = {
    "": "",
    "0": "",
    "false": "",
    "no": "",
    "off": "",
    "1": "loopback",
    "true": "loopback",
    "yes": "loopback",
    "on": "loopback",
    "loopback": "loopback",
    "any": "any",
}


def _insecure(name: str, raw: str) -> str:
    try:
        return _INSECURE[raw.lower()]
    except KeyError:
        raise ConfigError(f"{name}={raw!r}: use 1 (plaintext on loopback only) or any") from None


# -- writers: value -> raw text (a child's environment) ---------------------------------------
def _text(v: Any) -> str:
    if isinstance(v, float):
        return format(v, "g")
    return "" if v is None else str(v)


def _onoff(v: bool) -> str:
    return "on" if v else "off"


def _truefalse(v: bool) -> str:
    return "true" if v else "false"


@dataclasses.dataclass(frozen=True)
class Var:
    """One environment variable."""

    name: str
    field: str
    doc: str
    #: the raw default; a callable gets the values parsed so far (a default that derives from another)
    default: str | Callable[[dict[str, Any]], str] = ""
    parse: Callable[[str, str], Any] = _str
    show: Callable[[Any], str] = _text
    #: the default as the docs say it, where the raw default is computed
    doc_default: str = ""
    #: other names accepted for it (the first set one wins, after `name`)
    aliases: tuple[str, ...] = ()
    #: a secret: its value, or the content of the file NAME_FILE names (Settings.<field>_file)
    secret: bool = False
    section: str = "core"

    def default_text(self) -> str:
        if self.doc_default:
            return self.doc_default
        return self.default if isinstance(self.default, str) else ""


def _service_vars() -> list[Var]:
    return [
        Var(
            s.addr_env,
            s.addr_field,
            f"where the {s.name} service listens / is reached",
            s.default_addr,
            _addr,
        )
        for s in services.SERVICES
    ]


VARS: tuple[Var, ...] = (
    Var(
        "DYADLAB_HOME",
        "home",
        "local state: store, run files, logs",
        lambda _: str(Path.home() / ".local/share/dyadlab"),
        lambda n, r: Path(r).expanduser(),
        doc_default="~/.local/share/dyadlab",
    ),
    Var(
        "DYADLAB_STORE_DIR",
        "store_dir",
        "local-directory object store (the embedded default)",
        lambda v: str(v["home"] / "store"),
        lambda n, r: Path(r).expanduser(),
        doc_default="$DYADLAB_HOME/store",
    ),
    Var(
        "DYADLAB_S3_ENDPOINT",
        "s3_endpoint",
        "host:port of an S3-compatible store (MinIO, Swift s3api, ...); unset = the local directory",
    ),
    Var(
        "DYADLAB_S3_ACCESS_KEY",
        "s3_access_key",
        "S3 access key (or DYADLAB_S3_ACCESS_KEY_FILE: a file holding it)",
        secret=True,
    ),
    Var(
        "DYADLAB_S3_SECRET_KEY",
        "s3_secret_key",
        "S3 secret key (or DYADLAB_S3_SECRET_KEY_FILE: a file holding it)",
        secret=True,
    ),
    Var(
        "DYADLAB_S3_SSE",
        "s3_sse",
        "server-side encryption (SSE-S3) of every object: auto (if the store "
        "supports it), on (refuse to store unencrypted), off",
        "auto",
        _choice("auto", "on", "off"),
    ),
    Var("DYADLAB_S3_SECURE", "s3_secure", "https to the S3 endpoint", "true", _bool, _truefalse),
    Var("DYADLAB_S3_REGION", "s3_region", "S3 region", "us-east-1"),
    Var("DYADLAB_BUCKET", "bucket", "bucket for everything", "dyadlab"),
    Var("DYADLAB_BIND", "bind", "address services listen on", "127.0.0.1"),
    *_service_vars(),
    Var(
        "DYADLAB_METRICS_PORT",
        "metrics_port",
        "Prometheus port of a service; 0 = off (`dyadlab up` gives each its registry port)",
        "0",
        _int_at_least(0),
    ),
    Var(
        "DYADLAB_LOG_LEVEL",
        "log_level",
        "log level",
        "INFO",
        _choice("DEBUG", "INFO", "WARNING", "ERROR", lower=False),
    ),
    Var(
        "DYADLAB_WORKERS",
        "workers",
        "worker processes for frame processing",
        lambda _: str(os.cpu_count() or 1),
        _int_at_least(1),
        doc_default="number of CPUs",
    ),
    Var(
        "DYADLAB_MAX_VIDEO_BYTES",
        "max_video_bytes",
        "larger videos are refused",
        str(4 << 30),
        _int_at_least(1),
        doc_default="4 GiB",
    ),
    Var(
        "DYADLAB_RPC_TIMEOUT_S",
        "rpc_timeout_s",
        "deadline of long calls made by clients; also every call that names none",
        "3600",
        lambda n, r: float(_int_at_least(1)(n, r)),
        lambda v: str(int(v)),
    ),
    # synth and its TorchServe
    Var(
        "DYADLAB_SYNTH_MODEL",
        "synth_model",
        "exported synth model `dyadlab up` serves (missing: no TorchServe)",
        str(DEFAULT_SYNTH_MODEL),
        lambda n, r: Path(r).expanduser(),
        doc_default="<repo>/models/synth/synth-128-mask.pt",
        section="synth",
    ),
    Var(
        "DYADLAB_SYNTH_TS_MODEL",
        "synth_ts_model",
        "the TorchServe model name synth calls",
        "synth",
        section="synth",
    ),
    Var(
        "DYADLAB_TORCHSERVE",
        "torchserve",
        "`up` starts TorchServe: auto (if java, torchserve and the model exist) or off",
        "auto",
        _choice("auto", "off"),
        section="synth",
    ),
    Var(
        "DYADLAB_TORCHSERVE_GRPC",
        "torchserve_grpc",
        "TorchServe gRPC inference API (what the synth service calls)",
        "127.0.0.1:7070",
        _addr,
        aliases=("DYADLAB_TORCHSERVE_ADDR",),
        section="synth",
    ),
    Var(
        "DYADLAB_TORCHSERVE_GRPC_MANAGEMENT",
        "torchserve_grpc_management",
        "TorchServe gRPC management API (loopback only)",
        "127.0.0.1:7071",
        _addr,
        section="synth",
    ),
    Var(
        "DYADLAB_TORCHSERVE_HTTP",
        "torchserve_http",
        "TorchServe REST inference API",
        "127.0.0.1:7080",
        _addr,
        section="synth",
    ),
    Var(
        "DYADLAB_TORCHSERVE_MANAGEMENT",
        "torchserve_management",
        "TorchServe REST management API (loopback only)",
        "127.0.0.1:7081",
        _addr,
        section="synth",
    ),
    Var(
        "DYADLAB_TORCHSERVE_METRICS",
        "torchserve_metrics",
        "TorchServe Prometheus metrics",
        "127.0.0.1:7082",
        _addr,
        section="synth",
    ),
    Var(
        "DYADLAB_TORCHSERVE_KEY_FILE",
        "torchserve_key_file",
        "TorchServe's token file (0600; the synth service reads the inference key from it; `up` sets it)",
        parse=_path,
        doc_default="$DYADLAB_HOME/torchserve/key_file.json",
        section="synth",
    ),
    Var(
        "DYADLAB_SYNTH_WORKERS",
        "synth_workers",
        "TorchServe workers for the synth model",
        "1",
        _int_at_least(1),
        section="synth",
    ),
    Var(
        "DYADLAB_SYNTH_THREADS",
        "synth_threads",
        "torch threads per worker (2: a 128 px face costs two generator passes, which want both cores of a small machine)",
        "2",
        _int_at_least(1),
        section="synth",
    ),
    Var(
        "DYADLAB_SYNTH_BATCH",
        "synth_batch",
        "TorchServe batch size for synth",
        "8",
        _int_at_least(1),
        section="synth",
    ),
    Var(
        "DYADLAB_SYNTH_BATCH_DELAY_MS",
        "synth_batch_delay_ms",
        "longest wait to fill a batch",
        "20",
        _int_at_least(0),
        section="synth",
    ),
    Var(
        "DYADLAB_SYNTH_PREDICT_TIMEOUT_S",
        "synth_predict_timeout_s",
        "deadline of one TorchServe prediction",
        "30",
        _number_above_zero,
        section="synth",
    ),
    Var(
        "DYADLAB_SYNTH_PROBE_S",
        "synth_probe_s",
        "synth's TorchServe health probe interval",
        "5",
        _number_above_zero,
        section="synth",
    ),
    Var(
        "DYADLAB_SYNTH_CONCURRENCY",
        "synth_concurrency",
        "predictions synth keeps in flight per call",
        "4",
        _int_at_least(1),
        section="synth",
    ),
    # security (dyadlab/security, docs/security.md)
    Var(
        "DYADLAB_TLS_CERT",
        "tls_cert",
        "PEM certificate chain of a service (also its client certificate); unset: local development TLS",
        parse=_path,
        section="security",
    ),
    Var("DYADLAB_TLS_KEY", "tls_key", "PEM key of DYADLAB_TLS_CERT", parse=_path, section="security"),
    Var(
        "DYADLAB_TLS_CA",
        "tls_ca",
        "PEM CA bundle: verifies servers (clients) and client certificates (servers); unset: system roots",
        parse=_path,
        section="security",
    ),
    Var(
        "DYADLAB_TLS_CLIENT_AUTH",
        "tls_client_auth",
        "`require`: mutual TLS, a client certificate signed by DYADLAB_TLS_CA is required",
        "none",
        _choice("none", "require"),
        section="security",
    ),
    Var(
        "DYADLAB_TLS_CLIENT_CERT",
        "tls_client_cert",
        "certificate a client presents (mutual TLS); unset: DYADLAB_TLS_CERT",
        parse=_path,
        section="security",
    ),
    Var(
        "DYADLAB_TLS_CLIENT_KEY",
        "tls_client_key",
        "key of DYADLAB_TLS_CLIENT_CERT",
        parse=_path,
        section="security",
    ),
    Var(
        "DYADLAB_TLS_SERVER_NAME",
        "tls_server_name",
        "name to verify in server certificates instead of the address's host",
        section="security",
    ),
    Var(
        "DYADLAB_INSECURE",
        "insecure",
        "plaintext gRPC: `1` on loopback only (development); `any` also on "
        "other addresses (only inside a network that encrypts)",
        "",
        _insecure,
        lambda v: {"": "", "loopback": "1", "any": "any"}[v],
        section="security",
    ),
    Var(
        "DYADLAB_LOCAL_DIR",
        "local_dir",
        "per-user local CA, loopback certificate and tokens (generated; used when no TLS is configured)",
        parse=_path,
        doc_default="~/.config/dyadlab/local",
        section="security",
    ),
    Var(
        "DYADLAB_AUTH",
        "auth",
        "`off`: no authentication or authorization (development only)",
        "on",
        _bool,
        _onoff,
        section="security",
    ),
    Var(
        "DYADLAB_AUTH_TOKENS",
        "auth_tokens",
        "access file of a server: `TOKEN-or-sha256:HEX ROLE [NAME]` / "
        "`cert:IDENTITY ROLE [NAME]` lines; unset: the local tokens",
        parse=_path,
        section="security",
    ),
    Var(
        "DYADLAB_TOKEN_FILE",
        "token_file",
        "file holding the bearer token a client (or a service calling "
        "another) sends; unset: the local user token on loopback",
        parse=_path,
        section="security",
    ),
    Var(
        "DYADLAB_AUDIT_LOG",
        "audit_log",
        "audit log: a file (JSON lines, 0600, appended) or `stderr`",
        doc_default="stderr",
        section="security",
    ),
    Var(
        "DYADLAB_HEALTH_PORT",
        "health_port",
        "extra plaintext port serving only grpc.health.v1 (probes that cannot do TLS, e.g. kubelet); 0 = off",
        "0",
        _int_at_least(0),
        section="security",
    ),
)

BY_NAME: dict[str, Var] = {v.name: v for v in VARS}
_BY_FIELD: dict[str, Var] = {v.field: v for v in VARS}


def _default(field: str) -> Any:
    """A Settings field's default, from the table (fields with a computed default have none)."""
    v = _BY_FIELD[field]
    assert isinstance(v.default, str), field
    return v.parse(v.name, v.default)


def _read_secret(env_get: Callable[[str], str], name: str) -> tuple[str, Path | None]:
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


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting; one field per row of VARS (defaults from there)."""

    home: Path
    store_dir: Path
    s3_endpoint: str = ""
    s3_access_key: str = dataclasses.field(default="", repr=False)
    s3_secret_key: str = dataclasses.field(default="", repr=False)
    s3_access_key_file: Path | None = None  # where the keys came from (passed on, not the keys)
    s3_secret_key_file: Path | None = None
    s3_sse: str = _default("s3_sse")
    s3_secure: bool = _default("s3_secure")
    s3_region: str = _default("s3_region")
    bucket: str = _default("bucket")
    bind: str = _default("bind")
    extractor_addr: str = _default("extractor_addr")
    smiles_addr: str = _default("smiles_addr")
    stats_addr: str = _default("stats_addr")
    synth_addr: str = _default("synth_addr")
    metrics_port: int = _default("metrics_port")
    log_level: str = _default("log_level")
    workers: int = 1
    max_video_bytes: int = _default("max_video_bytes")
    rpc_timeout_s: float = _default("rpc_timeout_s")
    # synth / TorchServe
    synth_model: Path = DEFAULT_SYNTH_MODEL
    synth_ts_model: str = _default("synth_ts_model")
    torchserve: str = _default("torchserve")
    torchserve_grpc: str = _default("torchserve_grpc")
    torchserve_grpc_management: str = _default("torchserve_grpc_management")
    torchserve_http: str = _default("torchserve_http")
    torchserve_management: str = _default("torchserve_management")
    torchserve_metrics: str = _default("torchserve_metrics")
    torchserve_key_file: Path | None = None  # None: $DYADLAB_HOME/torchserve/key_file.json
    synth_workers: int = _default("synth_workers")
    synth_threads: int = _default("synth_threads")
    synth_batch: int = _default("synth_batch")
    synth_batch_delay_ms: int = _default("synth_batch_delay_ms")
    synth_predict_timeout_s: float = _default("synth_predict_timeout_s")
    synth_probe_s: float = _default("synth_probe_s")
    synth_concurrency: int = _default("synth_concurrency")
    # security (dyadlab/security)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_client_auth: str = _default("tls_client_auth")
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None
    tls_server_name: str = ""
    insecure: str = ""  # "" | "loopback" | "any"
    local_dir: Path | None = None  # None: ~/.config/dyadlab/local
    auth: bool = _default("auth")
    auth_tokens: Path | None = None
    token_file: Path | None = None
    audit_log: str = ""  # "": stderr
    health_port: int = _default("health_port")

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
        return {
            "grpc_inference": self.torchserve_grpc,
            "grpc_management": self.torchserve_grpc_management,
            "inference": self.torchserve_http,
            "management": self.torchserve_management,
            "metrics": self.torchserve_metrics,
        }

    def addr(self, service: str) -> str:
        """The address of a service of the registry (dyadlab.services)."""
        return getattr(self, services.get(service).addr_field)

    def addrs(self) -> dict[str, str]:
        """Every registered service's configured address."""
        return {s.name: getattr(self, s.addr_field) for s in services.SERVICES}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        g = lambda k: env.get(k, "").strip()  # noqa: E731
        values: dict[str, Any] = {}
        for v in VARS:
            if v.secret:
                values[v.field], values[v.field + "_file"] = _read_secret(g, v.name)
                continue
            raw = next((g(n) for n in (v.name, *v.aliases) if g(n)), "")
            if not raw:
                raw = v.default(values) if callable(v.default) else v.default
            values[v.field] = v.parse(v.name, raw)
        s = cls(**values)
        _check(s)
        return s

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process
        (a secret read from a file is passed on as that file, never as a value)."""
        env = {}
        for v in VARS:
            if v.secret:
                file = getattr(self, v.field + "_file")
                env[v.name], env[v.name + "_FILE"] = ("", str(file)) if file else (getattr(self, v.field), "")
            else:
                env[v.name] = v.show(getattr(self, v.field))
        return env

    def security_env(self) -> dict[str, str]:
        """The security settings as environment (file paths and modes, never a secret)."""
        env = self.to_env()
        return {v.name: env[v.name] for v in VARS if v.section == "security"}

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


def _check(s: Settings) -> None:
    """The rules that tie several variables together."""
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError("set both DYADLAB_TLS_CERT and DYADLAB_TLS_KEY (or neither)")
    if bool(s.tls_client_cert) != bool(s.tls_client_key):
        raise ConfigError("set both DYADLAB_TLS_CLIENT_CERT and DYADLAB_TLS_CLIENT_KEY (or neither)")
    if s.tls_client_auth == "require" and not (s.tls_ca and s.tls_cert):
        raise ConfigError(
            "DYADLAB_TLS_CLIENT_AUTH=require needs DYADLAB_TLS_CA (to verify client "
            "certificates) and the server's DYADLAB_TLS_CERT / DYADLAB_TLS_KEY"
        )
    if s.insecure and s.tls_cert:
        raise ConfigError("DYADLAB_INSECURE and DYADLAB_TLS_CERT contradict each other: unset one")
    if s.uses_s3 and not (s.s3_access_key and s.s3_secret_key):
        raise ConfigError(
            "DYADLAB_S3_ENDPOINT is set but DYADLAB_S3_ACCESS_KEY / "
            "DYADLAB_S3_SECRET_KEY (or their _FILE variants) are not"
        )


_SECTIONS = {
    "core": "Store, services, limits",
    "synth": "Synth and its TorchServe",
    "security": "Security (docs/security.md)",
}


def markdown() -> str:
    """docs/configuration.md: the table, by section."""
    out = [
        "# Configuration",
        "",
        "Every setting is an environment variable. This file is generated from the table in",
        "`dyadlab/config.py` (`python -m dyadlab.config --markdown > docs/configuration.md`);",
        "a test fails when it is out of date. Service addresses and ports come from the",
        "service registry, `dyadlab/services.py`.",
        "",
    ]
    for section, title in _SECTIONS.items():
        out += [f"## {title}", "", "| variable | default | meaning |", "|---|---|---|"]
        for v in VARS:
            if v.section != section:
                continue
            name = f"`{v.name}`" + "".join(f" (alias `{a}`)" for a in v.aliases)
            if v.secret:
                name += f" / `{v.name}_FILE`"
            default = v.default_text()
            out.append(f"| {name} | {f'`{default}`' if default else '(unset)'} | {v.doc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m dyadlab.config --markdown")
    sys.stdout.write(markdown())
