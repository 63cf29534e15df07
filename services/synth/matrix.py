"""The avImage matrix: one face generated over a valence x arousal grid, as a PNG.

Rows are arousal, high at the top; columns are valence, low (negative) at the
left -- the orientation of the circumplex plots in Wang et al. 2021. The
source face (the aligned input crop) is shown beside the grid, and each cell
can carry the VA judge's reading of the generated face.

Drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

DEFAULT_VALENCES = (-1.0, -0.5, 0.0, 0.5, 1.0)
DEFAULT_AROUSALS = (1.0, 0.5, 0.0, -0.5, -1.0)
MAX_STEPS = 11
GAP_FRACTION = 0.04


def grid_order(valences: Sequence[float], arousals: Sequence[float]) -> tuple[list[float], list[float]]:
    """Columns: valence ascending; rows: arousal descending; duplicates dropped."""
    return sorted(set(float(v) for v in valences)), sorted(set(float(a) for a in arousals), reverse=True)


def _fmt(x: float) -> str:
    return f"{x:+.2f}".replace("+0.00", "0").replace("-0.00", "0")


def render(
    cells: np.ndarray,
    valences: Sequence[float],
    arousals: Sequence[float],
    source: np.ndarray | None = None,
    judged: np.ndarray | None = None,
    title: str = "avImage",
    dpi: int = 100,
) -> bytes:
    """PNG bytes of the matrix.

    cells: (R, C, P, P, 3) uint8 -- row r = arousals[r], column c = valences[c];
    source: optional (S, S, 3) input face; judged: optional (R, C, 2) VA of each cell.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    cells = np.asarray(cells)
    R, C, P = cells.shape[0], cells.shape[1], cells.shape[2]
    if cells.shape[3] != P or cells.shape[4] != 3 or (R, C) != (len(arousals), len(valences)):
        raise ValueError(f"cells must be ({len(arousals)}, {len(valences)}, P, P, 3), got {cells.shape}")
    gap = max(1, int(round(GAP_FRACTION * P)))
    H, W = R * P + (R - 1) * gap, C * P + (C - 1) * gap
    mosaic = np.full((H, W, 3), 255, np.uint8)
    for r in range(R):
        for c in range(C):
            y, x = r * (P + gap), c * (P + gap)
            mosaic[y : y + P, x : x + P] = cells[r, c]

    # Figure size: the mosaic at one pixel per pixel, plus room for labels.
    left_in, bottom_in, top_in, right_in = 0.9, 0.75, 0.45, 0.25
    src_in = 0.0
    if source is not None:
        src_in = min(2.0, max(1.0, P / dpi)) + 0.35
    fig_w = W / dpi + left_in + right_in + src_in
    fig_h = max(H / dpi + bottom_in + top_in, 2.2)
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    ax = fig.add_axes((left_in / fig_w, bottom_in / fig_h, (W / dpi) / fig_w, (H / dpi) / fig_h))
    ax.imshow(mosaic, interpolation="nearest", extent=(-0.5, W - 0.5, H - 0.5, -0.5))
    centres_x = [c * (P + gap) + (P - 1) / 2 for c in range(C)]
    centres_y = [r * (P + gap) + (P - 1) / 2 for r in range(R)]
    ax.set_xticks(centres_x, [_fmt(v) for v in valences])
    ax.set_yticks(centres_y, [_fmt(a) for a in arousals])
    ax.set_xlabel("valence  (negative \u2192 positive)")
    ax.set_ylabel("arousal  (low \u2192 high)")
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)
    ax.set_title(title, fontsize=11)
    if judged is not None:
        fs = max(5, min(8, P // 16))
        for r in range(R):
            for c in range(C):
                v, a = judged[r][c]
                ax.text(
                    centres_x[c],
                    r * (P + gap) + P - 2,
                    f"{v:+.2f},{a:+.2f}",
                    ha="center",
                    va="bottom",
                    fontsize=fs,
                    color="white",
                    bbox={"boxstyle": "square,pad=0.1", "fc": "black", "alpha": 0.45, "lw": 0},
                )
    if source is not None:
        side = src_in - 0.35
        sx = (left_in + W / dpi + right_in + 0.1) / fig_w
        sy = (bottom_in + H / dpi - side) / fig_h
        ax2 = fig.add_axes((sx, sy, side / fig_w, side / fig_h))
        ax2.imshow(np.asarray(source), interpolation="nearest")
        ax2.set_xticks([])
        ax2.set_yticks([])
        ax2.set_title("input", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()
