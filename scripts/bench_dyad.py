"""Dyad measures: wall time for one 3-minute dyad at 30 fps with 1,000 shifts.

    .venv/bin/python scripts/bench_dyad.py [--seconds 180] [--fps 30] [--shifts 1000] [--repeat 3]

A synthetic dyad (services.smiles.dyad.simulate_dyad: the infant follows the
parent by 0.8 s) is aligned, then contingency, synchrony (global lagged r,
windowed TLCC and the surrogates) and shared affect are each timed; the best
of ``--repeat`` runs is printed per measure, and their total.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from services.smiles.dyad import align, contingency, shared_affect, simulate_dyad, synchrony  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--shifts", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()

    d = simulate_dyad(a.seconds, a.fps, lag_s=0.8, seed=0)
    steps = {
        "align": lambda: align(d.parent_df, d.infant_df),
    }
    al = steps["align"]()
    steps.update(
        {
            "contingency": lambda: contingency(al, d.parent_onsets_s, d.infant_onsets_s, shifts=a.shifts),
            "synchrony": lambda: synchrony(al, shifts=a.shifts),
            "shared_affect": lambda: shared_affect(al),
        }
    )
    best, out = {}, {}
    for name, fn in steps.items():
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            out[name] = fn()
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    print(
        f"dyad: {a.seconds:g} s at {a.fps:g} fps = {al.n} grid frames, {a.shifts} shifts, best of {a.repeat}"
    )
    for name, t in best.items():
        print(f"  {name:<14s} {t * 1000:8.1f} ms")
    print(f"  {'total':<14s} {sum(best.values()) * 1000:8.1f} ms")
    c, s, sh = out["contingency"], out["synchrony"], out["shared_affect"]
    print(
        f"check: p2i p = {c['parent_to_infant']['p']:.4f}, peak lag = "
        f"{s['peak_lag_frames']} frames ({s['peak_lag_s']:+.2f} s), r = {s['peak_r']:.3f} "
        f"> threshold {s['threshold']:.3f}: {s['significant']}; shared ratio = "
        f"{sh['ratio']:.2f}, episodes = {sh['n_episodes']}"
    )


if __name__ == "__main__":
    main()
