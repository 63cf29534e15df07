"""One object-store interface, two backends: a local directory (the embedded
default) and any S3-compatible server (MinIO, Swift's s3api, ...) via `minio`.

Publishing is atomic in both: the local backend writes a temporary file and
renames it into place; an S3 PUT only becomes visible once complete. A failure
therefore never leaves a half-written object under a final key.

Security: every key passes `validate_key` (no traversal, no absolute paths,
no control or invisible characters); the local backend also checks that the
resolved path stays inside its bucket directory. The S3 backend asks for
server-side encryption (SSE-S3, ``x-amz-server-side-encryption: AES256``) on
every PUT as DYADLAB_S3_SSE says: ``auto`` (default) falls back to plain PUTs,
with one log line, when the server says it does not implement SSE (Swift
without its encryption middleware, MinIO without a KMS); ``on`` refuses to
store unencrypted; ``off`` never asks. Credentials come from the environment
or from files (DYADLAB_S3_ACCESS_KEY_FILE / DYADLAB_S3_SECRET_KEY_FILE).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import urllib3

from dyadlab.config import Settings

_CHUNK = 1 << 20
log = logging.getLogger("dyadlab.storage")


class StoreError(Exception):
    """Base class; the message is safe to show to a user."""


class NotFound(StoreError):
    pass


class Unavailable(StoreError):
    pass


class InvalidKey(StoreError, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Ref:
    bucket: str
    key: str
    sha256: str = ""
    size: int = -1


_DRIVE = re.compile(r"^[A-Za-z]:")


def validate_key(key: str) -> str:
    """Reject keys that could escape the bucket or confuse a filesystem or a log:
    empty or > 1024 bytes; control characters (C0, DEL, C1), invisible format
    characters, line/paragraph separators, lone surrogates; absolute paths
    ('/x', 'C:x'), backslashes; empty, '.' or '..' segments."""
    if not isinstance(key, str) or not key:
        raise InvalidKey("object key must be 1..1024 bytes")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in key):
        raise InvalidKey("object key contains control or invisible characters")
    if len(key.encode()) > 1024:
        raise InvalidKey("object key must be 1..1024 bytes")
    if key.startswith("/") or "\\" in key or _DRIVE.match(key):
        raise InvalidKey(f"object key must be relative with '/' separators: {key!r}")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidKey(f"object key has an empty, '.' or '..' segment: {key!r}")
    return key


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class ObjectStore(abc.ABC):
    bucket: str

    @abc.abstractmethod
    def put_stream(
        self, key: str, stream: BinaryIO, size: int, content_type: str = "application/octet-stream"
    ) -> Ref: ...

    @abc.abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A readable stream of the object (caller closes it)."""

    @abc.abstractmethod
    def size(self, key: str) -> int | None:
        """Size in bytes, or None when the key does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None: ...

    # -- conveniences built on the primitives ---------------------------------
    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> Ref:
        ref = self.put_stream(key, io.BytesIO(data), len(data), content_type)
        return dataclasses.replace(ref, sha256=hashlib.sha256(data).hexdigest())

    def put_file(
        self,
        key: str,
        path: str | os.PathLike,
        content_type: str = "application/octet-stream",
        sha256: str = "",
    ) -> Ref:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            ref = self.put_stream(key, f, size, content_type)
        return dataclasses.replace(ref, sha256=sha256 or sha256_file(path))

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def get_file(self, key: str, path: str | os.PathLike) -> Path:
        """Download atomically: a partial download never appears at `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out, self.open(key) as src:
                shutil.copyfileobj(src, out, _CHUNK)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def ref(self, key: str, sha256: str = "") -> Ref:
        size = self.size(key)
        if size is None:
            raise NotFound(f"no object {key!r} in bucket {self.bucket!r}")
        return Ref(self.bucket, key, sha256, size)

    @contextlib.contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        """A local file with the object's bytes for the block's duration (a
        temporary copy, removed after; the local backend gives its own file)."""
        with tempfile.TemporaryDirectory(prefix="dyadlab-") as d:
            yield self.get_file(key, Path(d) / "object")


class LocalStore(ObjectStore):
    """Objects as files under ROOT/BUCKET/KEY; temporaries under ROOT/BUCKET/.tmp."""

    def __init__(self, root: str | os.PathLike, bucket: str = "dyadlab"):
        self.bucket = bucket
        self.root = Path(root).expanduser().resolve() / bucket
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.split("/")[0] == ".tmp":
            raise InvalidKey("keys under .tmp/ are reserved")
        p = self.root / key
        # a symlink inside the store must not lead out of it
        if not p.resolve().is_relative_to(self.root):
            raise InvalidKey(f"object key leads outside the store: {key!r}")
        return p

    def put_stream(self, key, stream, size, content_type="application/octet-stream"):
        dest = self._path(key)
        fd, tmp = tempfile.mkstemp(dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as out:
                written = _copy_exact(stream, out, size)
            if written != size:
                raise StoreError(f"short write for {key!r}: {written} of {size} bytes")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Ref(self.bucket, key, "", size)

    def open(self, key):
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {key!r} in bucket {self.bucket!r}") from None

    def size(self, key):
        p = self._path(key)
        return p.stat().st_size if p.is_file() else None

    def list(self, prefix=""):
        keys = []
        for p in self.root.rglob("*"):
            if p.is_file() and not p.is_relative_to(self.tmp):
                k = p.relative_to(self.root).as_posix()
                if k.startswith(prefix):
                    keys.append(k)
        yield from sorted(keys)  # by key string, as S3 lists (Path order puts "a/1" before "a-b")

    def delete(self, key):
        self._path(key).unlink(missing_ok=True)

    @contextlib.contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        yield self.local_path(key)

    def local_path(self, key: str) -> Path:
        """The file behind a key (local backend only: avoids a copy)."""
        p = self._path(key)
        if not p.is_file():
            raise NotFound(f"no object {key!r} in bucket {self.bucket!r}")
        return p


def _copy_exact(src: BinaryIO, dst: BinaryIO, size: int) -> int:
    n = 0
    while n < size:
        block = src.read(min(_CHUNK, size - n))
        if not block:
            break
        dst.write(block)
        n += len(block)
    return n


class S3Store(ObjectStore):
    """An S3-compatible server through the `minio` client."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = True,
        region: str = "us-east-1",
        timeout_s: float = 30.0,
        sse: str = "auto",
    ):
        from minio import Minio

        if sse not in ("auto", "on", "off"):
            raise ValueError(f"sse={sse!r}: use auto, on or off")
        self.bucket = bucket
        self.endpoint = endpoint
        self.sse_mode = sse
        #: None: not known yet (auto); True: PUTs ask for SSE-S3; False: they do not
        self.sse_active: bool | None = (
            {"on": True, "off": False}[sse] if sse != "auto" else _SSE_SUPPORT.get(endpoint)
        )
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=timeout_s),
            maxsize=16,
            retries=urllib3.Retry(total=3, backoff_factor=0.3, status_forcelist=(500, 502, 503, 504)),
        )
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        self._bucket_ready = False

    def _call(self, fn, *args, **kw):
        with self._errors(kw.get("object_name", args[1] if len(args) > 1 else "")):
            if not self._bucket_ready:
                self._ensure_bucket()
            return fn(*args, **kw)

    def _ensure_bucket(self) -> None:
        """Create the bucket on first use; several processes may race to do it."""
        from minio.error import S3Error

        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as e:
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        self._bucket_ready = True

    @contextlib.contextmanager
    def _errors(self, key: str = "", sse_refusal: bool = False):
        """Translate minio / urllib3 / socket errors into StoreError subclasses
        (`sse_refusal`: a "not implemented" answer becomes _SseRefused)."""
        from minio.error import MinioException, S3Error

        try:
            yield
        except S3Error as e:
            if sse_refusal and e.code in self.SSE_UNSUPPORTED:
                raise _SseRefused(e.code) from None
            if e.code in ("NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound"):
                raise NotFound(f"no object {key!r} in bucket {self.bucket!r}") from None
            if e.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreError(f"object store refused the credentials ({e.code})") from None
            raise StoreError(f"object store error {e.code}") from None
        except MinioException as e:  # non-S3 answers (HTML error page, bare 5xx, ...)
            raise StoreError(
                f"object store gave an unexpected answer ({type(e).__name__}); is the endpoint an S3 server?"
            ) from None
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as e:
            raise Unavailable(f"object store unreachable: {type(e).__name__}") from None
        except OSError as e:  # local I/O, e.g. minio's "stream having not enough data"
            raise StoreError(f"object store transfer failed: {e}") from None

    #: S3 error codes meaning "this server does not do SSE-S3" (Swift s3api without
    #: its encryption middleware: NotImplemented; MinIO without a KMS: NotImplemented
    #: or KMS.NotConfigured)
    SSE_UNSUPPORTED = frozenset(
        {"NotImplemented", "KMS.NotConfigured", "ServerSideEncryptionConfigurationNotFoundError"}
    )

    def put_stream(self, key, stream, size, content_type="application/octet-stream"):
        validate_key(key)
        if self.sse_active is not False:
            start = stream.tell() if stream.seekable() else None
            try:
                self._put(key, stream, size, content_type, sse=True)
            except _SseRefused as e:
                if self.sse_active:  # on: never store unencrypted
                    raise StoreError(
                        f"the object store does not support server-side encryption "
                        f"({e.code}); DYADLAB_S3_SSE=on refuses to store objects "
                        "unencrypted"
                    ) from None
                if start is None:
                    raise StoreError(
                        "the object store refused server-side encryption and the "
                        "upload cannot be rewound; retry"
                    ) from None
                self.sse_active = _SSE_SUPPORT[self.endpoint] = False
                if self.endpoint not in _SSE_LOGGED:  # once per process and endpoint
                    _SSE_LOGGED.add(self.endpoint)
                    log.warning(
                        "object store does not support server-side encryption (SSE-S3): "
                        "storing objects unencrypted (DYADLAB_S3_SSE=on refuses instead)",
                        extra={"s3_code": e.code},
                    )
                stream.seek(start)
            else:
                if self.sse_active is None:
                    self.sse_active = _SSE_SUPPORT[self.endpoint] = True
                    log.info(
                        "object store accepts server-side encryption (SSE-S3): objects are stored encrypted"
                    )
                return Ref(self.bucket, key, "", size)
        self._put(key, stream, size, content_type, sse=False)
        return Ref(self.bucket, key, "", size)

    def _put(self, key, stream, size, content_type, sse: bool) -> None:
        from minio.sse import SseS3

        with self._errors(key, sse_refusal=sse):
            if not self._bucket_ready:
                self._ensure_bucket()
            self.client.put_object(
                self.bucket,
                key,
                stream,
                size,
                content_type=content_type,
                part_size=64 << 20,
                sse=SseS3() if sse else None,
            )

    def encryption(self, key: str) -> str | None:
        """The server-side encryption the store reports for an object (e.g. 'AES256')."""
        validate_key(key)
        st = self._call(self.client.stat_object, self.bucket, key)
        return (st.metadata or {}).get("x-amz-server-side-encryption")

    def open(self, key):
        validate_key(key)
        resp = self._call(self.client.get_object, self.bucket, key)
        return _Response(resp)

    def size(self, key):
        validate_key(key)
        try:
            return self._call(self.client.stat_object, self.bucket, key).size
        except NotFound:
            return None

    def list(self, prefix=""):
        objs = self._call(self.client.list_objects, self.bucket, prefix=prefix, recursive=True)
        with self._errors():  # list_objects is lazy: the requests happen while iterating
            for o in objs:
                yield o.object_name

    def delete(self, key):
        validate_key(key)
        self._call(self.client.remove_object, self.bucket, key)


#: endpoint -> whether it accepted SSE-S3 (auto mode decides once per process)
_SSE_SUPPORT: dict[str, bool] = {}
_SSE_LOGGED: set[str] = set()


class _SseRefused(Exception):
    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


class _Response(io.RawIOBase):
    """A file-like wrapper that releases the HTTP connection on close."""

    def __init__(self, resp):
        self._r = resp

    def readable(self):
        return True

    def readinto(self, b):
        data = self._r.read(len(b))
        b[: len(data)] = data
        return len(data)

    def read(self, n=-1):
        return self._r.read() if n is None or n < 0 else self._r.read(n)

    def close(self):
        if not self.closed:
            self._r.close()
            self._r.release_conn()
        super().close()


#: where inputs (videos, tables, photos) are put under their content hash
INPUTS = "inputs"
_EXT = re.compile(r"\.[a-z0-9]{1,8}")


def content_key(sha256: str, name: str = "", prefix: str = INPUTS) -> str:
    """PREFIX/<sha256><ext>: the one rule for content-addressed keys. The
    extension is the file name's, in lower case, when it is 1-8 letters and
    digits (none otherwise): the same bytes always get the same key."""
    ext = os.path.splitext(name)[1].lower()
    return f"{prefix}/{sha256}{ext if _EXT.fullmatch(ext) else ''}"


def put_content(store: ObjectStore, path: str | os.PathLike, prefix: str = INPUTS) -> Ref:
    """Put a local file under its content hash (skipped when it is there already)."""
    path = Path(path)
    sha = sha256_file(path)
    key, size = content_key(sha, path.name, prefix), path.stat().st_size
    if store.size(key) != size:
        store.put_file(key, path, sha256=sha)
    return Ref(store.bucket, key, sha, size)


def put_content_bytes(
    store: ObjectStore,
    data: bytes,
    name: str,
    prefix: str = INPUTS,
    content_type: str = "application/octet-stream",
) -> Ref:
    """Put bytes under their content hash (`name` gives the extension)."""
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    key = content_key(sha, name, prefix)
    if store.size(key) != len(data):
        store.put_bytes(key, data, content_type)
    return Ref(store.bucket, key, sha, len(data))


#: where a store keeps its identity (a random id, written by the first service or CLI that asks)
STORE_ID_KEY = "meta/store-id"


def store_id(store: ObjectStore) -> str:
    """This store's identity: the same for every process that uses the same
    store (whatever its DYADLAB_HOME or endpoint name), different for another
    store. Services advertise it (dyadlab.rpc.serve) so that a command can tell
    a stack on its store from one on another store."""
    import uuid

    try:
        return store.get_bytes(STORE_ID_KEY).decode().strip()
    except NotFound:
        store.put_bytes(STORE_ID_KEY, uuid.uuid4().hex.encode(), "text/plain")
        return store.get_bytes(STORE_ID_KEY).decode().strip()  # whoever wrote last: one id


def open_store(settings: Settings) -> ObjectStore:
    if settings.uses_s3:
        return S3Store(
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key,
            settings.bucket,
            secure=settings.s3_secure,
            region=settings.s3_region,
            sse=settings.s3_sse,
        )
    return LocalStore(settings.store_dir, settings.bucket)
