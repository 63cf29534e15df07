"""Conversions between the shared library's values and the API's messages."""

from __future__ import annotations

from dyadlab import storage
from dyadlab.v1 import common_pb2

#: Frame-table role names <-> the API's Role enum.
ROLE_ENUM = {"adult": common_pb2.ROLE_ADULT, "infant": common_pb2.ROLE_INFANT}
ROLE_NAME = {v: k for k, v in ROLE_ENUM.items()}


def object_ref(r: storage.Ref) -> common_pb2.ObjectRef:
    return common_pb2.ObjectRef(bucket=r.bucket, key=r.key, sha256=r.sha256, size=max(r.size, 0))


def face_selector(text: str | None) -> common_pb2.FaceSelector:
    """A face choice as people write it — "adult", "infant", a face_id, or
    nothing (the service's default: the adult if roles are known) — as the
    API's FaceSelector. Raises ValueError for anything else."""
    text = (text or "").strip()
    if not text:
        return common_pb2.FaceSelector()
    if text in ROLE_ENUM:
        return common_pb2.FaceSelector(role=ROLE_ENUM[text])
    if text.isdigit():
        return common_pb2.FaceSelector(face_id=int(text))
    raise ValueError(f"{text!r} is not adult, infant or a face_id")
