"""Fig.-1-style smile figure ("Behind the Smile", Fig. 1) as a PNG.

Top axis: AU12_r over time with the activation threshold.  Bottom axis: the
radius r of each smile (raw faint, Savitzky-Golay smoothed solid).  Onset,
apex and offset are shaded on both axes, speech is hatched grey and frames
that are not high-confidence (or missing) are greyed.  Only data and the
caller's title are drawn: no file names or paths.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from dyadlab.frames import median_interval

from .segment import Smile, SmileParams, high_confidence

if TYPE_CHECKING:
    from matplotlib.typing import LineStyleType

PHASE_COLOURS = {"onset": "#2ca02c", "apex": "#ff7f0e", "offset": "#9467bd"}


#: the paper's parameters (SmileParams is frozen: one shared instance is safe)
_DEFAULT_PARAMS = SmileParams()


def smile_figure(
    df: pd.DataFrame,
    smiles: Sequence[Smile],
    speech_segments: Iterable[tuple[float, float]],
    path,
    title: str | None = None,
    params: SmileParams = _DEFAULT_PARAMS,
) -> Path:
    """Draw the figure for one face's frame table and write it to ``path``
    (PNG, Agg renderer, no pyplot state).  Returns the path."""
    speech = list(speech_segments)
    df = df.sort_values("timestamp", kind="stable")
    t = df["timestamp"].to_numpy(float)
    fig = Figure(figsize=(10, 5.5), dpi=100, layout="constrained")
    ax_au, ax_r = fig.subplots(2, 1, sharex=True, height_ratios=(1, 1.3))

    for ax in (ax_au, ax_r):
        _shade_bad(ax, t, high_confidence(df, params), params)
        for a, b in speech:
            ax.axvspan(a, b, facecolor="none", edgecolor="0.45", hatch="///", linewidth=0)
        for s in smiles:
            for name, (a, b) in _phases(s).items():
                ax.axvspan(a, b, color=PHASE_COLOURS[name], alpha=0.22, linewidth=0)

    ax_au.plot(t, df["AU12_r"].to_numpy(float), color="k", linewidth=1)
    ax_au.axhline(params.au12_threshold, color="crimson", linestyle="--", linewidth=1)
    ax_au.set_ylabel("AU12 intensity")
    for s in smiles:
        ax_r.plot(s.t, s.r_raw, color="tab:blue", alpha=0.3, linewidth=1)
        ax_r.plot(s.t, s.r, color="tab:blue", linewidth=1.8)
    ax_r.set_ylabel("r (units of IR)")
    ax_r.set_xlabel("time (s)")
    if len(t):
        ax_r.set_xlim(t[0], t[-1])
    if title:
        fig.suptitle(title)

    handles = [
        _line("k", "-"),
        _line("crimson", "--"),
        _line("tab:blue", "-", 0.3),
        _line("tab:blue", "-"),
        *(Patch(color=c, alpha=0.22) for c in PHASE_COLOURS.values()),
        Patch(facecolor="none", edgecolor="0.45", hatch="///"),
        Patch(color="0.85"),
    ]
    labels = [
        "AU12_r",
        f"AU12 threshold {params.au12_threshold:g}",
        "r raw",
        "r smoothed",
        "onset",
        "apex",
        "offset",
        "speech",
        "low confidence / missing",
    ]
    fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    path = Path(path)
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def _phases(s: Smile) -> dict[str, tuple[float, float]]:
    out = {"onset": (s.start_s, s.onset_end_s)}
    if s.complete:
        out["apex"] = (s.onset_end_s, s.offset_start_s)
        out["offset"] = (s.offset_start_s, s.end_s)
    else:
        out["apex"] = (s.onset_end_s, s.end_s)
    return out


def _shade_bad(ax, t: np.ndarray, ok: np.ndarray, params: SmileParams) -> None:
    """Grey spans over runs of rows that are not high-confidence, and over
    time gaps longer than the segment-breaking gap."""
    if not len(t):
        return
    dt = median_interval(t)
    half = dt / 2 if np.isfinite(dt) else 0.0
    i = 0
    while i < len(t):
        if ok[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(t) and not ok[j + 1]:
            j += 1
        ax.axvspan(t[i] - half, t[j] + half, color="0.85", linewidth=0)
        i = j + 1
    gaps = np.flatnonzero(np.diff(t) > params.max_gap_factor * dt)
    for k in gaps:
        ax.axvspan(t[k] + half, t[k + 1] - half, color="0.85", linewidth=0)


def _line(colour: str, style: LineStyleType, alpha: float = 1.0) -> Line2D:
    return Line2D([], [], color=colour, linestyle=style, alpha=alpha)
