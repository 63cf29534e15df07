"""Conversions between the shared library's values and the API's messages."""
from __future__ import annotations

from dyadlab import storage
from dyadlab.v1 import common_pb2

#: Frame-table role names <-> the API's Role enum.
ROLE_ENUM = {"adult": common_pb2.ROLE_ADULT, "infant": common_pb2.ROLE_INFANT}
ROLE_NAME = {v: k for k, v in ROLE_ENUM.items()}


def object_ref(r: storage.Ref) -> common_pb2.ObjectRef:
    return common_pb2.ObjectRef(bucket=r.bucket, key=r.key, sha256=r.sha256, size=max(r.size, 0))
