"""All configuration comes from environment variables with safe defaults.

| variable                  | default                         | meaning |
|---------------------------|---------------------------------|---------|
| DYADLAB_HOME              | ~/.local/share/dyadlab          | local state: store, run files, logs |
| DYADLAB_STORE_DIR         | $DYADLAB_HOME/store             | local-directory object store (the embedded default) |
| DYADLAB_S3_ENDPOINT       | (unset = local directory)       | host:port of an S3-compatible store (MinIO, Swift s3api, ...) |
| DYADLAB_S3_ACCESS_KEY     |                                 | S3 access key |
| DYADLAB_S3_SECRET_KEY     |                                 | S3 secret key |
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
| DYADLAB_RPC_TIMEOUT_S     | 3600                            | deadline of long calls made by clients |

Credentials are never logged (``Settings.__repr__`` hides them).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping


class ConfigError(ValueError):
    pass


def _bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true or false)")


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

    @property
    def uses_s3(self) -> bool:
        return bool(self.s3_endpoint)

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        g = lambda k, d="": env.get(k, d).strip()  # noqa: E731
        home = Path(g("DYADLAB_HOME") or Path.home() / ".local/share/dyadlab").expanduser()
        s = cls(
            home=home,
            store_dir=Path(g("DYADLAB_STORE_DIR") or home / "store").expanduser(),
            s3_endpoint=g("DYADLAB_S3_ENDPOINT"),
            s3_access_key=g("DYADLAB_S3_ACCESS_KEY"),
            s3_secret_key=g("DYADLAB_S3_SECRET_KEY"),
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
        if s.uses_s3 and not (s.s3_access_key and s.s3_secret_key):
            raise ConfigError("DYADLAB_S3_ENDPOINT is set but DYADLAB_S3_ACCESS_KEY / "
                              "DYADLAB_S3_SECRET_KEY are not")
        if s.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"DYADLAB_LOG_LEVEL={s.log_level!r}: use DEBUG, INFO, WARNING or ERROR")
        return s

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        return {
            "DYADLAB_HOME": str(self.home), "DYADLAB_STORE_DIR": str(self.store_dir),
            "DYADLAB_S3_ENDPOINT": self.s3_endpoint, "DYADLAB_S3_ACCESS_KEY": self.s3_access_key,
            "DYADLAB_S3_SECRET_KEY": self.s3_secret_key,
            "DYADLAB_S3_SECURE": "true" if self.s3_secure else "false",
            "DYADLAB_S3_REGION": self.s3_region, "DYADLAB_BUCKET": self.bucket,
            "DYADLAB_BIND": self.bind, "DYADLAB_EXTRACTOR_ADDR": self.extractor_addr,
            "DYADLAB_SMILES_ADDR": self.smiles_addr, "DYADLAB_STATS_ADDR": self.stats_addr,
            "DYADLAB_LOG_LEVEL": self.log_level,
            "DYADLAB_WORKERS": str(self.workers), "DYADLAB_MAX_VIDEO_BYTES": str(self.max_video_bytes),
            "DYADLAB_RPC_TIMEOUT_S": str(int(self.rpc_timeout_s)),
        }

    def port_of(self, addr: str) -> int:
        try:
            return int(addr.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            raise ConfigError(f"address {addr!r} is not host:port") from None
