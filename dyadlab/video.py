"""Video probing and frame decoding with PyAV.

`probe()` demuxes the packets once (no decoding, thousands of packets per
second) to learn every frame's presentation time and the keyframes. Frame
numbers and timestamps therefore come from the container's real pts — correct
for variable-frame-rate video — and any range of frames can be decoded
independently by seeking to the keyframe before it (`frames()`), which lets
the extractor split a video into chunks that run on different cores.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np


class VideoError(ValueError):
    """Not a usable video; the message says why in words a user can act on."""


@dataclasses.dataclass
class VideoIndex:
    width: int
    height: int
    codec: str
    pts: np.ndarray  # int64 presentation timestamps in stream time base, sorted
    keyframe: np.ndarray  # bool per frame
    time_base: float
    has_audio: bool
    rotation: int = 0  # degrees, counter-clockwise, to apply to decoded frames

    @property
    def n_frames(self) -> int:
        return len(self.pts)

    @property
    def timestamps(self) -> np.ndarray:
        """Seconds from the first frame (OpenFace's `timestamp`)."""
        return (self.pts - self.pts[0]).astype(np.float64) * self.time_base

    @property
    def duration_s(self) -> float:
        ts = self.timestamps
        if len(ts) < 2:
            return 0.0
        return float(ts[-1] + np.median(np.diff(ts)))

    @property
    def avg_fps(self) -> float:
        d = self.duration_s
        return self.n_frames / d if d > 0 else 0.0

    @property
    def variable_frame_rate(self) -> bool:
        if self.n_frames < 3:
            return False
        dt = np.diff(self.timestamps)
        return bool(np.max(np.abs(dt - np.median(dt))) > 0.002 + 0.05 * np.median(dt))


#: Smaller pictures cannot hold a face the detector finds (dlib's frontal
#: detector needs faces of ~40 px even with upsampling).
MIN_SIDE_PX = 32


def _open(path: str | os.PathLike):
    try:
        c = av.open(str(path), metadata_errors="ignore")
    except av.error.InvalidDataError:
        raise VideoError(
            "the file is not a video this program can read (no known container format)"
        ) from None
    except av.error.FFmpegError as e:
        raise VideoError(f"the file cannot be opened as a video ({type(e).__name__})") from None
    fmt = c.format.name
    if fmt in ("image2", "image2pipe") or fmt.endswith("_pipe"):
        # FFmpeg's still-image demuxers (jpeg_pipe, png_pipe, ...): one picture, no time.
        codec = c.streams.video[0].codec_context.name if c.streams.video else fmt
        c.close()
        raise VideoError(f"the file is a still image ({codec}), not a video")
    if not c.streams.video:
        kinds: list[str] = sorted({s.type for s in c.streams}) or ["nothing"]
        c.close()
        raise VideoError(f"the file has no video stream (it contains {', '.join(kinds)})")
    return c


def probe(path: str | os.PathLike) -> VideoIndex:
    """Index every frame of the first video stream; raise VideoError when unusable."""
    if os.path.getsize(path) == 0:
        raise VideoError("the file is empty (0 bytes)")
    with _open(path) as c:
        vs = c.streams.video[0]
        if vs.time_base is None:
            raise VideoError("the video stream has no time base")
        pts, key = [], []
        try:
            for p in c.demux(vs):
                if p.size == 0 or p.pts is None:
                    continue
                pts.append(p.pts)
                key.append(p.is_keyframe)
        except av.error.FFmpegError:
            # A damaged tail: keep what was read, the decoder will tell whether it's usable.
            pass
        start = vs.start_time
        codec = vs.codec_context.name
        width, height = vs.codec_context.width, vs.codec_context.height
        has_audio = bool(c.streams.audio)
        tb = float(vs.time_base)
    if not pts:
        raise VideoError("the video stream holds no frames with timestamps")
    order = np.argsort(pts, kind="stable")
    pts_a = np.asarray(pts, dtype=np.int64)[order]
    key_a = np.asarray(key, dtype=bool)[order]
    keep = np.concatenate([[True], np.diff(pts_a) > 0])  # drop duplicate pts
    if start is not None:
        # Packets before the stream's start (an edit list's pre-roll, negative
        # pts) are decoded but never shown: they are not frames of the video.
        keep &= pts_a >= start
    if not keep.any():
        raise VideoError("the video stream holds no frames at or after its start time")
    idx = VideoIndex(width, height, codec, pts_a[keep], key_a[keep], tb, has_audio)
    if width <= 0 or height <= 0:
        raise VideoError("the video stream has no picture size")
    if min(width, height) < MIN_SIDE_PX:
        raise VideoError(
            f"the video is {width}x{height} pixels, too small to hold a face "
            f"(at least {MIN_SIDE_PX}x{MIN_SIDE_PX} needed)"
        )
    # Decode one frame: proves the stream is decodable and reads the rotation.
    first = next(frames(path, idx, 0, min(idx.n_frames, 8)), None)
    if first is None:
        raise VideoError("no frame of the video could be decoded (truncated or corrupt file?)")
    return idx


def _gray(frame: av.VideoFrame) -> np.ndarray:
    """Luma as C-contiguous uint8, without colour conversion when the frame is
    planar YUV. Contiguity matters: dlib silently ignores numpy strides, so a
    padded plane (line size > width) would be read as a sheared image."""
    if frame.format.name in ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "nv12"):
        plane = frame.planes[0]
        buf = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)  # type: ignore[call-overload]  # VideoPlane has the buffer protocol; PyAV's stubs omit it
        return np.ascontiguousarray(buf[:, : plane.width])
    return np.ascontiguousarray(frame.to_ndarray(format="gray"))


def _rgb(frame: av.VideoFrame) -> np.ndarray:
    """RGB as (H, W, 3) uint8. Planar 4:2:0 frames are converted by OpenCV
    (SIMD; ~0.1 ms for 640x360 where FFmpeg's swscale takes ~0.6 ms)."""
    if frame.format.name in ("yuv420p", "yuvj420p") and frame.width % 2 == 0 and frame.height % 2 == 0:
        w, h = frame.width, frame.height
        y, u, v = (
            np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width]  # type: ignore[call-overload]  # VideoPlane has the buffer protocol; PyAV's stubs omit it
            for p in frame.planes[:3]
        )
        i420 = np.empty((h * 3 // 2, w), np.uint8)
        i420[:h] = y
        i420[h:].reshape(-1)[: u.size] = u.reshape(-1)
        i420[h:].reshape(-1)[u.size :] = v.reshape(-1)
        return cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420)
    return np.ascontiguousarray(frame.to_ndarray(format="rgb24"))


def frames(
    path: str | os.PathLike, index: VideoIndex, start: int, stop: int, threads: int = 1, color: bool = False
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (frame number, image) for frames start..stop-1: grey (H, W)
    uint8, or RGB (H, W, 3) with `color`.

    Seeks to the keyframe at or before `start`, decodes forward and keeps the
    frames whose pts fall in range. A corrupt stretch ends the iteration early
    (the caller sees which frames never came).
    """
    if start >= stop:
        return
    lo, hi = index.pts[start], index.pts[stop - 1]
    number = {int(p): i for i, p in enumerate(index.pts[start:stop], start)}
    with _open(path) as c:
        vs = c.streams.video[0]
        vs.thread_type = "AUTO" if threads > 1 else "SLICE"
        vs.codec_context.thread_count = threads
        if start > 0:
            c.seek(int(lo), stream=vs, backward=True, any_frame=False)
        try:
            for fr in c.decode(vs):
                if fr.pts is None or fr.pts < lo:
                    continue
                if fr.pts > hi:
                    break
                i = number.get(int(fr.pts))
                if i is None:
                    continue
                img = _rgb(fr) if color else _gray(fr)
                rot = getattr(fr, "rotation", 0) or 0
                if rot:
                    img = np.ascontiguousarray(np.rot90(img, k=int(rot) // 90))
                yield i, img
                if i == stop - 1:
                    break
        except av.error.FFmpegError:
            return


def loop(src: Path, dest: Path, min_seconds: float) -> Path:
    """Remux `src` (video + first audio stream) end to end until >= min_seconds,
    without re-encoding (benchmarks and tests make long real videos this way).
    An existing `dest` is reused."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part.mp4")
    with av.open(str(src)) as inp:
        streams = [inp.streams.video[0]] + ([inp.streams.audio[0]] if inp.streams.audio else [])
        packets: dict[int, list[tuple[int, int, int | None, bool, bytes]]] = {s.index: [] for s in streams}
        for p in inp.demux(*streams):
            if p.size and p.pts is not None and p.dts is not None:
                packets[p.stream.index].append((p.pts, p.dts, p.duration, p.is_keyframe, bytes(p)))
        # Length of one pass per stream, in its own time base: long enough for
        # both clocks (with B-frames the decode times start before the
        # presentation times; the next pass's must still come after this one's).
        span = {}
        for s in streams:
            ps = packets[s.index]
            span[s.index] = max(
                max(p[0] + (p[2] or 0) for p in ps) - min(p[0] for p in ps),
                max(p[1] + (p[2] or 0) for p in ps) - min(p[1] for p in ps),
            )
        tbs: dict[int, Fraction] = {}
        for s in streams:
            assert s.time_base is not None  # a demuxed stream has a time base
            tbs[s.index] = s.time_base
        vs = streams[0]
        one_pass = span[vs.index] * float(tbs[vs.index])
        loops = max(1, int(-(-min_seconds // one_pass)))
        with av.open(str(tmp), "w", format="mp4") as out:
            omap = {s.index: out.add_stream_from_template(s) for s in streams}
            # Interleave by time so the muxer does not buffer everything.
            events = []
            for k in range(loops):
                for s in streams:
                    tb = float(tbs[s.index])
                    for pts, dts, dur, key, data in packets[s.index]:
                        events.append(((dts + k * span[s.index]) * tb, s.index, k, pts, dts, dur, key, data))
            events.sort(key=lambda e: (e[0], e[1]))
            for _, si, k, pts, dts, dur, key, data in events:
                pk = av.Packet(data)
                off = k * span[si]
                pk.pts, pk.dts, pk.duration = pts + off, dts + off, dur
                pk.is_keyframe = key
                pk.stream = omap[si]
                pk.time_base = tbs[si]  # the muxer rescales to its own time base
                out.mux(pk)
    os.replace(tmp, dest)
    return dest
