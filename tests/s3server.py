"""A real S3 server for tests: OpenStack Swift with its s3api middleware on loopback.

Four Swift servers (proxy, account, container, object; `workers = 0`, so one
process each) run from their own venv (``make test`` builds .cache/swift-venv,
so eventlet & co. never touch the project venv) on free loopback ports, with
all state in a fresh temporary directory. ``stop()`` kills each server's
process group and deletes the directory; a server whose parent (the test
process) dies gets SIGTERM from the kernel (PR_SET_PDEATHSIG), so a killed
test run does not leave servers behind either.

    with SwiftS3Server() as s3:
        Minio(s3.endpoint, s3.access_key, s3.secret_key, secure=False)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWIFT_VENV = Path(os.environ.get("DYADLAB_SWIFT_VENV", ROOT / ".cache" / "swift-venv"))
ACCESS_KEY = "test:tester"  # tempauth user "tester" in account "test"
SECRET_KEY = "testing"
REGION = "us-east-1"
_SERVERS = ("account", "container", "object", "proxy")


class SwiftUnavailable(RuntimeError):
    """Swift cannot run here (venv missing, no xattrs); the message says why."""


def swift_python() -> Path:
    py = SWIFT_VENV / "bin" / "python"
    if not (SWIFT_VENV / ".stamp").exists() or not py.exists():
        raise SwiftUnavailable(
            f"no Swift venv at {SWIFT_VENV}: run `make test` (it builds the venv) "
            "to run the tests against a real S3 server"
        )
    return py


def _supports_user_xattrs(d: Path) -> bool:
    """Swift's object server keeps metadata in user.* xattrs (tmpfs may lack them)."""
    try:
        fd, probe = tempfile.mkstemp(dir=d, prefix=".xattr-probe-")
    except OSError:
        return False
    try:
        os.setxattr(probe, "user.dyadlab", b"1")
        return os.getxattr(probe, "user.dyadlab") == b"1"
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)


def _state_parent() -> Path:
    candidates = [os.environ.get("DYADLAB_SWIFT_TMPDIR"), tempfile.gettempdir(), ROOT / ".cache"]
    for c in filter(None, candidates):
        d = Path(c)
        d.mkdir(parents=True, exist_ok=True)
        if _supports_user_xattrs(d):
            return d
    raise SwiftUnavailable(
        f"none of {[c for c in candidates if c]} supports user xattrs, which Swift's "
        "object server needs; set DYADLAB_SWIFT_TMPDIR to a directory that does (ext4, xfs)"
    )


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):  # all open at once, so the n ports are distinct
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# Builds the three rings (one device each) in one process of the Swift venv.
_RING_SCRIPT = """
import sys
from swift.common.ring import RingBuilder
etc = sys.argv[1]
for arg in sys.argv[2:]:
    name, port = arg.split("=")
    b = RingBuilder(6, 1, 1)
    b.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1",
               "port": int(port), "device": "d1", "weight": 100})
    b.rebalance()
    b.get_ring().save(f"{etc}/{name}.ring.gz")
"""

# Runs a Swift server so that the kernel sends it SIGTERM when its parent dies.
_LAUNCH_SCRIPT = """
import ctypes, os, sys
ctypes.CDLL(None, use_errno=True).prctl(1, 15)   # PR_SET_PDEATHSIG, SIGTERM
if os.getppid() != int(sys.argv[1]):             # parent already gone
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""

_PROXY_PIPELINE = (
    "catch_errors gatekeeper healthcheck proxy-logging listing_formats "
    "s3api tempauth copy slo dlo proxy-logging proxy-server"
)


class SwiftS3Server:
    def __init__(self, start_timeout_s: float = 60.0, encryption: bool = False):
        """`encryption`: Swift's keymaster + encryption middleware, so s3api
        accepts server-side encryption (SSE-S3) and objects are encrypted on disk."""
        self.start_timeout_s = start_timeout_s
        self.encryption = encryption
        self.dir: Path | None = None
        self.port = 0
        self.procs: dict[str, subprocess.Popen] = {}
        self.start_seconds = 0.0

    # -- what a client needs -----------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    access_key = ACCESS_KEY
    secret_key = SECRET_KEY
    region = REGION
    secure = False

    # -- lifecycle ------------------------------------------------------------
    def __enter__(self) -> SwiftS3Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> SwiftS3Server:
        py = swift_python()
        parent = _state_parent()
        _sweep_stale(parent)
        t0 = time.monotonic()
        for attempt in range(1, attempts + 1):
            self.dir = Path(tempfile.mkdtemp(prefix=f"dyadlab-swift-{os.getpid()}-", dir=parent))
            try:
                self._start_once(py)
                self.start_seconds = time.monotonic() - t0
                return self
            except _PortTaken:  # another process took a port we picked: new ports
                self.stop()
                if attempt == attempts:
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        from dyadlab.stack import wait_unreaped

        for p in self.procs.values():
            if p.returncode is None:  # not reaped: its pid (= group id) is still ours
                _killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            if p.returncode is not None:
                continue
            try:
                wait_unreaped(p, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _killpg(p.pid, signal.SIGKILL)  # stragglers, and anything they spawned
            p.wait()
        self.procs.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # -- internals ------------------------------------------------------------
    def _start_once(self, py: Path) -> None:
        d = self.dir
        assert d is not None
        etc, devices, logs = d / "etc", d / "srv", d / "logs"
        for sub in (etc, devices / "d1", logs):
            sub.mkdir(parents=True)
        ports = dict(zip(_SERVERS, _free_ports(len(_SERVERS))))
        self.port = ports["proxy"]
        user = _user()
        (etc / "swift.conf").write_text(
            "[swift-hash]\nswift_hash_path_suffix = dyadlab-test-suffix\n"
            "[storage-policy:0]\nname = Policy-0\ndefault = yes\n"
        )

        def common(name: str) -> str:
            return (
                f"[DEFAULT]\nbind_ip = 127.0.0.1\nbind_port = {ports[name]}\nbind_timeout = 2\n"
                f"swift_dir = {etc}\nworkers = 0\nuser = {user}\nlog_name = {name}\n"
            )

        for n in ("account", "container", "object"):
            (etc / f"{n}-server.conf").write_text(
                common(n) + f"devices = {devices}\nmount_check = false\n"
                f"[pipeline:main]\npipeline = {n}-server\n"
                f"[app:{n}-server]\nuse = egg:swift#{n}\n"
            )
        pipeline, crypto = _PROXY_PIPELINE, ""
        if self.encryption:
            import base64

            pipeline = pipeline.replace(
                " proxy-logging proxy-server", " keymaster encryption proxy-logging proxy-server"
            )
            crypto = (
                "[filter:keymaster]\nuse = egg:swift#keymaster\nencryption_root_secret = "
                f"{base64.b64encode(os.urandom(32)).decode()}\n"
                "[filter:encryption]\nuse = egg:swift#encryption\n"
            )
        (etc / "proxy-server.conf").write_text(
            common("proxy") + f"[pipeline:main]\npipeline = {pipeline}\n"
            "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n"
            f"[filter:s3api]\nuse = egg:swift#s3api\nlocation = {REGION}\n"
            f"[filter:tempauth]\nuse = egg:swift#tempauth\nuser_test_tester = {SECRET_KEY} .admin\n"
            + "".join(
                f"[filter:{f}]\nuse = egg:swift#{f.replace('-', '_')}\n"
                for f in (
                    "catch_errors",
                    "gatekeeper",
                    "healthcheck",
                    "proxy-logging",
                    "listing_formats",
                    "copy",
                    "slo",
                    "dlo",
                )
            )
            + crypto
        )
        subprocess.run(
            [
                str(py),
                "-c",
                _RING_SCRIPT,
                str(etc),
                *(f"{n}={ports[n]}" for n in ("account", "container", "object")),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for n in _SERVERS:
            exe = py.parent / f"swift-{n}-server"
            with open(logs / f"{n}.log", "wb") as log:
                self.procs[n] = subprocess.Popen(
                    [
                        str(py),
                        "-c",
                        _LAUNCH_SCRIPT,
                        str(os.getpid()),
                        str(exe),
                        str(etc / f"{n}-server.conf"),
                        "-v",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=d,
                )
        self._wait_ready()

    def _check_alive(self) -> None:
        for n, p in self.procs.items():
            if p.poll() is not None:
                log = self._log_tail(n)
                if "Could not bind" in log or "Address already in use" in log:
                    raise _PortTaken(log)
                raise RuntimeError(f"swift-{n}-server exited with {p.returncode}:\n{log}")

    def _log_tail(self, name: str, n: int = 40) -> str:
        try:
            lines = (self.dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _wait_ready(self) -> None:
        """Ready = the proxy's healthcheck answers AND a real S3 round trip works
        (which needs the account, container and object servers too)."""
        deadline = time.monotonic() + self.start_timeout_s
        last: BaseException | None = None
        healthy = False
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if not healthy:
                    with urllib.request.urlopen(f"http://{self.endpoint}/healthcheck", timeout=2) as r:
                        healthy = r.status == 200 and r.read() == b"OK"
                if healthy:
                    self._s3_round_trip()
                    return
            except Exception as e:  # noqa: BLE001 - not up yet; keep the last reason
                last = e
            time.sleep(0.1)
        self._check_alive()
        logs = "\n".join(f"--- {n}.log\n{self._log_tail(n, 10)}" for n in _SERVERS)
        raise TimeoutError(
            f"Swift s3api not ready after {self.start_timeout_s:.0f} s (last error: {last!r})\n{logs}"
        )

    def _s3_round_trip(self) -> None:
        import io

        import urllib3
        from minio import Minio

        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=2, read=10), retries=urllib3.Retry(total=0)
        )
        c = Minio(
            self.endpoint,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            secure=False,
            region=REGION,
            http_client=http,
        )
        bucket = f"ready-{uuid.uuid4().hex[:12]}"
        c.make_bucket(bucket)
        c.put_object(bucket, "probe", io.BytesIO(b"ready"), 5)
        r = c.get_object(bucket, "probe")
        try:
            body = r.read()
        finally:
            r.close()
            r.release_conn()
        if body != b"ready":
            raise RuntimeError(f"S3 probe read back {body!r}")
        c.remove_object(bucket, "probe")
        c.remove_bucket(bucket)
        http.clear()


class _PortTaken(RuntimeError):
    pass


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _sweep_stale(parent: Path) -> None:
    """Delete state dirs of test processes that died without stopping their server."""
    for d in parent.glob("dyadlab-swift-*-*"):
        pid = d.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":  # manual use: python tests/s3server.py  (Ctrl-C stops)
    with SwiftS3Server() as s:
        print(
            f"S3 at http://{s.endpoint} access={s.access_key} secret={s.secret_key} "
            f"(up in {s.start_seconds:.1f} s, state in {s.dir})",
            flush=True,
        )
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    sys.exit(0)
