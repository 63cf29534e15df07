#!/usr/bin/env bash
# Regenerate tests/data/speech_espeak.wav, the speech test asset of
# tests/test_speech.py: two short English phrases spoken by espeak-ng with a
# 0.6 s pause between them, 16 kHz mono 16-bit PCM.
#
# espeak-ng writes 22.05 kHz and has no sample-rate option (and sox is not
# installed), so the phrases are trimmed and resampled with numpy (an FFT
# resampler: exact for band-limited signals, and the phrases start and end in
# silence so the circular wrap costs nothing). Deterministic for a given
# espeak-ng version (built with 1.51).
#
# Usage: tests/data/make_speech_wav.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="${1:-$root/.venv/bin/python}"
out="$here/speech_espeak.wav"
command -v espeak-ng >/dev/null || { echo "espeak-ng not found (apt-get install espeak-ng)" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# -v en-us: American English voice; -s 160 wpm; -z: no final sentence pause.
espeak-ng -v en-us -s 160 -z -w "$tmp/a.wav" "Hello there, little one."
espeak-ng -v en-us -s 160 -z -w "$tmp/b.wav" "What a big smile!"

"$py" - "$tmp/a.wav" "$tmp/b.wav" "$out" <<'PY'
import sys, wave
import numpy as np

SR, PAUSE_S, PAD_S = 16000, 0.6, 0.05

def read(path):
    with wave.open(path, "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2, w.getparams()
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64) / 32768
        return x, w.getframerate()

def trim(x, sr, thresh=0.01):
    idx = np.flatnonzero(np.abs(x) > thresh)
    return x[idx[0]:idx[-1] + 1]

def resample(x, sr_in, sr_out):
    n_out = int(round(len(x) * sr_out / sr_in))
    spec = np.fft.rfft(x)
    keep = n_out // 2 + 1
    spec = spec[:keep] if len(spec) >= keep else np.pad(spec, (0, keep - len(spec)))
    return np.fft.irfft(spec, n_out) * (n_out / len(x))

a_path, b_path, out = sys.argv[1:]
parts = []
for p in (a_path, b_path):
    x, sr = read(p)
    parts.append(resample(trim(x, sr), sr, SR))
pad, pause = np.zeros(int(PAD_S * SR)), np.zeros(int(PAUSE_S * SR))
y = np.concatenate([pad, parts[0], pause, parts[1], pad])
y = np.clip(np.round(y / max(1e-9, np.abs(y).max()) * 0.7 * 32767), -32768, 32767).astype("<i2")
with wave.open(out, "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(SR)
    w.writeframes(y.tobytes())
print(f"{out}: {len(y) / SR:.3f} s total; phrases {len(parts[0]) / SR:.3f} s and "
      f"{len(parts[1]) / SR:.3f} s, pause {PAUSE_S} s, pads {PAD_S} s")
PY
