"""An S3 endpoint on 0.0.0.0:9000 from OpenStack Swift (proxy + s3api + tempauth,
one account, one container and one object server; data in /data).

Credentials from the environment, the names the dyadlab services use:
DYADLAB_S3_ACCESS_KEY must be "account:user" (tempauth's form, e.g.
"dyadlab:ci"), DYADLAB_S3_SECRET_KEY is that user's key. SIGTERM stops every
server; the process exits when any of them dies.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path("/opt/swift/bin")
ETC = Path(os.environ.get("SWIFT_ETC", "/tmp/swift"))
DEVICES = Path(os.environ.get("SWIFT_DEVICES", "/data"))  # the volume MinIO uses
PORTS = {"account": 6202, "container": 6201, "object": 6200, "proxy": 9000}
PIPELINE = (
    "catch_errors gatekeeper healthcheck proxy-logging listing_formats "
    "s3api tempauth copy slo dlo proxy-logging proxy-server"
)


def configure() -> None:
    access, secret = os.environ["DYADLAB_S3_ACCESS_KEY"], os.environ["DYADLAB_S3_SECRET_KEY"]
    account, sep, user = access.partition(":")
    if not (sep and account and user and secret):
        sys.exit("DYADLAB_S3_ACCESS_KEY must be account:user and DYADLAB_S3_SECRET_KEY set")
    region = os.environ.get("DYADLAB_S3_REGION", "us-east-1")
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    ETC.mkdir(parents=True, exist_ok=True)
    (DEVICES / "d1").mkdir(parents=True, exist_ok=True)
    (ETC / "swift.conf").write_text(
        "[swift-hash]\nswift_hash_path_suffix = dyadlab-ci\n"
        "[storage-policy:0]\nname = Policy-0\ndefault = yes\n"
    )

    def common(name: str, ip: str = "127.0.0.1") -> str:
        return (
            f"[DEFAULT]\nbind_ip = {ip}\nbind_port = {PORTS[name]}\nswift_dir = {ETC}\n"
            f"workers = 0\nuser = {me}\nlog_name = {name}\nlog_level = WARNING\n"
        )

    for n in ("account", "container", "object"):
        (ETC / f"{n}-server.conf").write_text(
            common(n) + f"devices = {DEVICES}\nmount_check = false\n"
            f"[pipeline:main]\npipeline = {n}-server\n[app:{n}-server]\nuse = egg:swift#{n}\n"
        )
    (ETC / "proxy-server.conf").write_text(
        common("proxy", "0.0.0.0") + f"[pipeline:main]\npipeline = {PIPELINE}\n"
        "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n"
        f"[filter:s3api]\nuse = egg:swift#s3api\nlocation = {region}\n"
        f"[filter:tempauth]\nuse = egg:swift#tempauth\nuser_{account}_{user} = {secret} .admin\n"
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
    )
    from swift.common.ring import RingBuilder

    for n in ("account", "container", "object"):
        b = RingBuilder(6, 1, 1)
        b.add_dev(
            {
                "id": 0,
                "region": 1,
                "zone": 1,
                "ip": "127.0.0.1",
                "port": PORTS[n],
                "device": "d1",
                "weight": 100,
            }
        )
        b.rebalance()
        b.get_ring().save(str(ETC / f"{n}.ring.gz"))


def main() -> int:
    configure()
    procs = [
        subprocess.Popen([str(BIN / f"swift-{n}-server"), str(ETC / f"{n}-server.conf")])
        for n in ("account", "container", "object", "proxy")
    ]
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"swift-s3: S3 on 0.0.0.0:{PORTS['proxy']}", flush=True)
    while not stopping and all(p.poll() is None for p in procs):
        time.sleep(0.5)
    stop()
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
