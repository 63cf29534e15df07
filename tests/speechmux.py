"""Test helper: give a real face video a known speech track (PyAV only).

``mux_speech`` copies the video's compressed packets unchanged (no re-encode)
into a new mp4 and adds a mono AAC track that is silent except for ``wav``,
placed so that it is heard at video time ``at_s``. ``audio_start_s`` delays
the whole audio stream relative to the first video frame (an mp4 edit list),
to test that speech timestamps are reported in video time.
"""

from __future__ import annotations

import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

AUDIO_RATE = 48000


def read_wav(path) -> tuple[np.ndarray, int]:
    """Mono 16-bit PCM wav -> (float32 samples in [-1, 1], sample rate)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: need 16-bit PCM, got {8 * w.getsampwidth()}-bit")
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
        if w.getnchannels() > 1:
            x = x.reshape(-1, w.getnchannels()).mean(axis=1)
        return x, w.getframerate()


def _to_rate(x: np.ndarray, sr: int, rate: int) -> np.ndarray:
    if sr == rate:
        return x
    frame = av.AudioFrame.from_ndarray(x.reshape(1, -1).astype(np.float32), format="flt", layout="mono")
    frame.sample_rate = sr
    r = av.AudioResampler(format="flt", layout="mono", rate=rate)
    out = [f.to_ndarray().reshape(-1) for f in r.resample(frame) + r.resample(None)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def mux_speech(
    video_in, wav, out_path, at_s: float, *, audio_start_s: float = 0.0, rate: int = AUDIO_RATE
) -> Path:
    """Write ``out_path`` (mp4): ``video_in``'s video packets + ``wav`` at ``at_s``.

    The audio track spans from ``audio_start_s`` to the end of the video and is
    silent apart from the wav, which starts at video time ``at_s``.
    """
    out_path = Path(out_path)
    speech, sr = read_wav(wav)
    speech = _to_rate(speech, sr, rate)
    if at_s < audio_start_s:
        raise ValueError("the wav must start after the audio stream does")

    with av.open(str(video_in)) as src, av.open(str(out_path), "w", format="mp4") as dst:
        vin = src.streams.video[0]
        if vin.duration is not None:
            dur = float(vin.duration * vin.time_base)
        else:
            dur = src.duration / 1e6
        vout = dst.add_stream_from_template(vin)

        aout = dst.add_stream("aac", rate=rate, layout="mono")
        aout.time_base = Fraction(1, rate)
        total = max(
            int(round((dur - audio_start_s) * rate)), int(round((at_s - audio_start_s) * rate)) + len(speech)
        )
        track = np.zeros(total, np.float32)
        i0 = int(round((at_s - audio_start_s) * rate))
        track[i0 : i0 + len(speech)] = speech

        for packet in src.demux(vin):
            if packet.dts is None:  # the demuxer's final empty packet
                continue
            packet.stream = vout
            dst.mux(packet)

        n = aout.codec_context.frame_size or 1024
        pts0 = int(round(audio_start_s * rate))
        for k in range(0, total, n):
            chunk = track[k : k + n]
            if len(chunk) < n:
                chunk = np.pad(chunk, (0, n - len(chunk)))
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = pts0 + k
            frame.time_base = aout.time_base
            dst.mux(aout.encode(frame))
        dst.mux(aout.encode(None))
    return out_path
