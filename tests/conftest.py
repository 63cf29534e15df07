"""Shared fixtures. Keep each group in its own section."""
from __future__ import annotations

import uuid

import pytest

from dyadlab.storage import LocalStore, ObjectStore, S3Store

try:                      # tests/ as a package, or (pytest's default) on sys.path
    from tests.s3server import SwiftS3Server, SwiftUnavailable
except ImportError:
    from s3server import SwiftS3Server, SwiftUnavailable


# -- object store ---------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (Swift + s3api, tests/s3server.py) for the whole session."""
    server = SwiftS3Server()
    try:
        server.start()
    except SwiftUnavailable as e:
        pytest.skip(str(e))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_store_factory(s3_server):
    """make(bucket=None, **S3Store kwargs) -> an S3Store on the session server,
    in a fresh bucket unless one is named."""
    def make(bucket: str | None = None, **kw) -> S3Store:
        kw = {"access_key": s3_server.access_key, "secret_key": s3_server.secret_key,
              "secure": s3_server.secure, "region": s3_server.region, **kw}
        return S3Store(kw.pop("endpoint", s3_server.endpoint),
                       bucket=bucket or f"t-{uuid.uuid4().hex[:16]}", **kw)
    return make


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ObjectStore:
    """Each backend in turn; a fresh directory or bucket per test."""
    if request.param == "local":
        return LocalStore(tmp_path / "store", bucket="dyadlab")
    return request.getfixturevalue("s3_store_factory")()
