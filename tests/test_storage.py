"""The object-store contract, run against both backends: a local directory and a
real S3 server (Swift + s3api, see tests/s3server.py)."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from dyadlab.storage import InvalidKey, LocalStore, NotFound, S3Store, StoreError, Unavailable, sha256_file


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reopen(store, request):
    """A second, independent handle on the same bucket (nothing cached in-process)."""
    if isinstance(store, LocalStore):
        return LocalStore(store.root.parent, store.bucket)
    return request.getfixturevalue("s3_store_factory")(bucket=store.bucket)


def _leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.startswith(".part-")]


# -- round trips ----------------------------------------------------------------
def test_put_get_bytes_round_trip(store, request):
    data = os.urandom(100_000)
    ref = store.put_bytes("clips/a.bin", data)
    assert (ref.bucket, ref.key, ref.size, ref.sha256) == (store.bucket, "clips/a.bin", len(data), _sha(data))
    assert store.get_bytes("clips/a.bin") == data
    assert _reopen(store, request).get_bytes("clips/a.bin") == data
    assert store.ref("clips/a.bin").size == len(data)


def test_empty_object_and_overwrite(store):
    store.put_bytes("k", b"")
    assert store.get_bytes("k") == b"" and store.size("k") == 0
    store.put_bytes("k", b"first")
    store.put_bytes("k", b"second")
    assert store.get_bytes("k") == b"second"


def test_put_get_file_round_trip(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20))
    ref = store.put_file("videos/v1.mp4", src)
    assert ref.sha256 == sha256_file(src) and ref.size == src.stat().st_size
    dest = tmp_path / "out" / "nested" / "v1.mp4"  # parents created on demand
    assert store.get_file("videos/v1.mp4", dest) == dest
    assert sha256_file(dest) == ref.sha256
    assert _leftovers(dest.parent) == []


def test_open_streams_in_chunks(store):
    data = os.urandom(300_000)
    store.put_bytes("s", data)
    with store.open("s") as f:
        parts = [f.read(65536) for _ in range(5)]
        assert f.read(65536) == b""
    assert b"".join(parts) == data


# -- atomicity ------------------------------------------------------------------
def test_get_file_of_missing_key_leaves_no_file(store, tmp_path):
    dest = tmp_path / "dl" / "x.bin"
    with pytest.raises(NotFound):
        store.get_file("no/such/key", dest)
    assert not dest.exists() and _leftovers(dest.parent) == []

    dest.write_bytes(b"previous")  # an existing file is kept whole
    with pytest.raises(NotFound):
        store.get_file("no/such/key", dest)
    assert dest.read_bytes() == b"previous" and _leftovers(dest.parent) == []


def test_get_file_source_failing_midway_leaves_no_partial_file(store, tmp_path, monkeypatch):
    store.put_bytes("big", os.urandom(5 << 20))
    real_open = store.open

    class Breaks(io.RawIOBase):  # delivers 1 MiB, then the connection "drops"
        def __init__(self, inner):
            self.inner, self.n = inner, 0

        def readable(self):
            return True

        def readinto(self, b):
            if self.n >= 1 << 20:
                raise Unavailable("connection dropped")
            data = self.inner.read(min(len(b), (1 << 20) - self.n))
            b[: len(data)] = data
            self.n += len(data)
            return len(data)

        def close(self):
            self.inner.close()
            super().close()

    monkeypatch.setattr(store, "open", lambda key: Breaks(real_open(key)))
    dest = tmp_path / "dl.bin"
    with pytest.raises(Unavailable):
        store.get_file("big", dest)
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_short_stream_publishes_nothing(store):
    with pytest.raises(StoreError) as e:
        store.put_stream("short", io.BytesIO(b"abc"), 10)
    assert "3" in str(e.value) and "10" in str(e.value)  # says what was short
    assert not isinstance(e.value, Unavailable)  # the caller's fault, not the server's
    assert not store.exists("short") and "short" not in list(store.list())


# -- metadata, listing, delete ----------------------------------------------------
def test_size_and_exists(store):
    store.put_bytes("a/b.txt", b"12345")
    assert store.size("a/b.txt") == 5 and store.exists("a/b.txt")
    assert store.size("a/c.txt") is None and not store.exists("a/c.txt")
    assert not store.exists("a")  # a "directory" is no object


def test_list_with_prefix(store):
    keys = ["a/1", "a/2", "a/b/3", "a-b", "ab", "b/1"]
    for k in keys:
        store.put_bytes(k, k.encode())
    assert list(store.list()) == sorted(keys)  # S3 order: by key, as bytes
    assert list(store.list("a/")) == ["a/1", "a/2", "a/b/3"]
    assert list(store.list("a")) == ["a-b", "a/1", "a/2", "a/b/3", "ab"]
    assert list(store.list("a/b/")) == ["a/b/3"]
    assert list(store.list("zzz")) == []


def test_delete(store):
    store.put_bytes("d/1", b"x")
    store.put_bytes("d/2", b"y")
    store.delete("d/1")
    assert not store.exists("d/1") and list(store.list("d/")) == ["d/2"]
    with pytest.raises(NotFound):
        store.get_bytes("d/1")
    store.delete("d/1")  # deleting twice is fine
    assert store.get_bytes("d/2") == b"y"


def test_missing_key_raises_not_found(store):
    for op in (store.get_bytes, store.open, store.ref):
        with pytest.raises(NotFound, match="no/such"):
            op("no/such")
    assert issubclass(NotFound, StoreError)


BAD_KEYS = [
    "",
    "../x",
    "a/../b",
    "a/./b",
    ".",
    "/abs",
    "a\\b",
    "a//b",
    "a/",
    "a\x00b",
    "a\nb",
    "tab\there",
    "del\x7f",
    "x" * 1025,
]


class _Tripwire:
    def __getattr__(self, name):
        raise AssertionError(f"network call {name!r} made for an invalid key")


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_invalid_keys_rejected_before_any_io(store, key, tmp_path):
    if isinstance(store, S3Store):
        store.client = _Tripwire()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    ops = [
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.size(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.open(key),
        lambda: store.ref(key),
        lambda: store.put_stream(key, io.BytesIO(b"x"), 1),
    ]
    for op in ops:
        with pytest.raises(InvalidKey):
            op()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert issubclass(InvalidKey, ValueError) and issubclass(InvalidKey, StoreError)


def test_large_object_crosses_multipart_threshold(store, tmp_path):
    src = tmp_path / "big.bin"
    size = 70 << 20  # > 64 MiB part size: 2 parts on S3
    with open(src, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    ref = store.put_file("large/big.bin", src)
    assert store.size("large/big.bin") == size
    if isinstance(store, S3Store):  # really a multipart upload
        assert store.client.stat_object(store.bucket, "large/big.bin").etag.endswith("-2")
    out = store.get_file("large/big.bin", tmp_path / "back.bin")
    assert sha256_file(out) == ref.sha256 == sha256_file(src)


# -- S3 only: failures of the server or of its configuration ------------------------
@pytest.mark.parametrize("access,secret", [("test:tester", "wrong-secret"), ("test:nobody", "testing")])
def test_s3_wrong_credentials(s3_store_factory, access, secret):
    bad = s3_store_factory(access_key=access, secret_key=secret)
    for op in (
        lambda: bad.put_bytes("k", b"x"),
        lambda: bad.get_bytes("k"),
        lambda: bad.size("k"),
        lambda: list(bad.list()),
    ):
        with pytest.raises(StoreError, match="credentials") as e:
            op()
        assert not isinstance(e.value, (NotFound, Unavailable))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_unreachable_endpoint_fails_fast():
    store = S3Store(f"127.0.0.1:{_closed_port()}", "a", "b", "bucket", secure=False)
    for op in (
        lambda: store.put_bytes("k", b"x"),
        lambda: store.get_bytes("k"),
        lambda: store.size("k"),
        lambda: list(store.list()),
    ):
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="unreachable"):
            op()
        assert time.monotonic() - t0 < 20  # a hang guard, not a benchmark


def test_s3_silent_endpoint_times_out():
    with socket.socket() as srv:  # accepts connections, never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        store = S3Store(f"127.0.0.1:{srv.getsockname()[1]}", "a", "b", "bucket", secure=False, timeout_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            store.get_bytes("k")
        assert time.monotonic() - t0 < 20


def test_s3_endpoint_that_is_not_s3_gives_store_error():
    class NotS3(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            body = b"<html>not here</html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_HEAD = do_DELETE = _answer

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotS3)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        store = S3Store(f"127.0.0.1:{httpd.server_address[1]}", "a", "b", "bucket", secure=False)
        with pytest.raises(StoreError):
            store.put_bytes("k", b"x")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_s3_listing_a_vanished_bucket_is_a_store_error(s3_store_factory):
    store = s3_store_factory()
    store.put_bytes("k", b"x")
    store.delete("k")
    store.client.remove_bucket(store.bucket)  # gone behind the store's back
    with pytest.raises(StoreError):
        list(store.list())


def test_s3_server_stop_leaves_nothing(s3_server):
    other = type(s3_server)().start()  # a second server, own ports
    pids, state, port = [p.pid for p in other.procs.values()], other.dir, other.port
    assert port != s3_server.port and len(pids) == 4 and state.is_dir()
    store = S3Store(other.endpoint, other.access_key, other.secret_key, "lifecycle", secure=False)
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v"
    other.stop()
    for pid in pids:  # every process group is gone
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    assert not state.exists()
    with pytest.raises(ConnectionRefusedError):  # nothing listens on its port
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_s3_processes_racing_to_create_the_bucket_all_succeed(s3_store_factory):
    """Shards of a cohort start at once against an empty bucket (found by the cohort test)."""
    import concurrent.futures as cf
    import uuid

    bucket = f"race-{uuid.uuid4().hex[:12]}"
    stores = [s3_store_factory(bucket=bucket) for _ in range(6)]
    with cf.ThreadPoolExecutor(6) as ex:
        refs = list(ex.map(lambda i: stores[i].put_bytes(f"k{i}", b"x"), range(6)))
    assert [r.key for r in refs] == [f"k{i}" for i in range(6)]
    assert sorted(stores[0].list()) == [f"k{i}" for i in range(6)]
