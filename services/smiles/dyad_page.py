"""The dyad's tables, figures and HTML page (dyad measures from the `dyad` package)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dyadlab import htmlpage

LABELS = {
    "joint_fraction": "Time both faces are measured (fraction)",
    "contingency_p2i_observed": "Infant answers a parent smile within W (P)",
    "contingency_p2i_p": "  permutation p",
    "contingency_i2p_observed": "Parent answers an infant smile within W (P)",
    "contingency_i2p_p": "  permutation p",
    "peak_lag_s": "Peak lag, s (positive: the infant follows)",
    "peak_r": "Peak cross-correlation r",
    "sync_threshold": "  surrogate 95% threshold of max |r|",
    "shared_fraction": "Both smiling (fraction of joint time)",
    "shared_expected": "  expected if independent",
    "shared_episodes": "Episodes building to a peak together",
}


def fig_traces(al, smiles: dict, episodes: pd.DataFrame) -> bytes:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, who, au, valid in (
        (axes[0], "parent", al.au12_parent, al.valid_parent),
        (axes[1], "infant", al.au12_infant, al.valid_infant),
    ):
        ax.plot(al.t, au, color="#1f77b4" if who == "parent" else "#d62728", lw=1)
        bad = ~valid
        if bad.any():
            ax.fill_between(al.t, 0, 5, where=bad, color="0.88", step="mid", label="not measured")
        for s in smiles[who]:
            t0 = s.start_s + (al.offset_s if who == "infant" else 0.0)
            ax.axvline(t0, color="k", lw=0.8, ls=":")
        for _, e in episodes.iterrows():
            ax.axvspan(e["start_s"], e["end_s"], color="#2ca02c", alpha=0.15)
        ax.set_ylabel(f"{who} AU12")
        ax.set_ylim(0, 5)
    axes[1].set_xlabel("time (s, parent's clock); dotted: smile onsets; green: shared episodes")
    fig.suptitle("AU12 of both partners")
    return htmlpage.png(fig)


def fig_contingency(c: dict) -> bytes:
    fig = Figure(figsize=(10, 3.0), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, title in (
        (axes[0], "parent_to_infant", "infant answers parent"),
        (axes[1], "infant_to_parent", "parent answers infant"),
    ):
        d = c[key]
        null = np.asarray(d.get("null", []), float)
        null = null[np.isfinite(null)]
        if len(null):
            ax.hist(null, bins=30, color="0.7", label="circular-shift null")
        if np.isfinite(d["observed"]):
            ax.axvline(d["observed"], color="#d62728", lw=2, label=f"observed (p = {d['p']:.3f})")
        ax.set_title(f"{title}, within {c['window_s']:g} s")
        ax.set_xlabel("P(answered)")
        ax.legend(fontsize=8)
    return htmlpage.png(fig)


def fig_synchrony(s: dict) -> bytes:
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=(1, 1.6))
    ax1.plot(s["lags_s"], s["r"], color="k")
    thr = s["threshold"]
    if np.isfinite(thr):
        ax1.axhspan(-thr, thr, color="0.85", label="95% of surrogate max |r|")
    ax1.axvline(0, color="0.5", lw=0.8)
    ax1.set_xlabel("lag (s); positive: the infant follows")
    ax1.set_ylabel("r")
    ax1.set_title("lagged cross-correlation")
    ax1.legend(fontsize=8)
    m = np.asarray(s["tlcc"], float)
    if m.size:
        lags = s["lags_s"]
        ext = [lags[0], lags[-1], s["window_center_s"][-1], s["window_center_s"][0]]
        im = ax2.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, extent=ext)
        fig.colorbar(im, ax=ax2, label="r")
    ax2.set_xlabel("lag (s)")
    ax2.set_ylabel("window centre (s)")
    ax2.set_title("windowed, time-lagged cross-correlation")
    return htmlpage.png(fig)


def write(out: Path, result: dict, params: dict, notes: list[str]) -> dict[str, Path]:
    """dyad_summary.csv, contingency.csv, synchrony.csv, figures and dyad.html into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    summary = pd.DataFrame([result["summary"]])
    c, s, a = result["contingency"], result["synchrony"], result["shared_affect"]
    cont = pd.DataFrame(
        [
            {
                "direction": k,
                **{
                    f: c[k][f] for f in ("observed", "null_mean", "null_sd", "p", "n_triggers", "n_responded")
                },
                "window_s": c["window_s"],
                "shifts": c["shifts"],
            }
            for k in ("parent_to_infant", "infant_to_parent")
        ]
    )
    sync = pd.DataFrame({"lag_frames": s["lags"], "lag_s": s["lags_s"], "r": s["r"], "n_pairs": s["n_pairs"]})
    figs = {
        "dyad_traces.png": fig_traces(result["aligned"], result["smiles"], a["episodes"]),
        "dyad_contingency.png": fig_contingency(c),
        "dyad_synchrony.png": fig_synchrony(s),
    }
    files = {
        "dyad_summary.csv": out / "dyad_summary.csv",
        "contingency.csv": out / "contingency.csv",
        "synchrony.csv": out / "synchrony.csv",
        "shared_episodes.csv": out / "shared_episodes.csv",
    }
    summary.to_csv(files["dyad_summary.csv"], index=False)
    cont.to_csv(files["contingency.csv"], index=False)
    sync.to_csv(files["synchrony.csv"], index=False)
    a["episodes"].to_csv(files["shared_episodes.csv"], index=False)
    for name, data in figs.items():
        files[name] = out / name
        files[name].write_bytes(data)
    row = result["summary"]
    show = pd.DataFrame({"Measure": list(LABELS.values()), "Value": [_fmt(row.get(k)) for k in LABELS]})
    used = pd.DataFrame({"Parameter": list(params), "Value": [str(v) for v in params.values()]})
    body = [
        "<h1>Parent and infant: contingency, synchrony, shared smiles</h1>",
        htmlpage.para(
            f"{row['n_joint_frames']} of {row['n_grid_frames']} frames "
            f"({row['joint_fraction']:.0%}) have both faces measured at "
            f"{row['rate_hz']:g} Hz; every measure uses only those.",
            "note",
        ),
        htmlpage.table(
            show,
            "Dyad measures, each against a null model (circular shifts of the infant's series).",
            "dyad_summary",
        ),
        htmlpage.img(figs["dyad_traces.png"], "AU12 traces"),
        "<h2>Contingency</h2>",
        htmlpage.img(figs["dyad_contingency.png"], "contingency nulls"),
        "<h2>Lagged synchrony</h2>",
        htmlpage.img(figs["dyad_synchrony.png"], "synchrony"),
        "<h2>Values used</h2>",
        htmlpage.table(
            used,
            "Smile thresholds, confidence and calibration per person, and the measures' parameters.",
            "dyad_params",
        ),
    ]
    if notes:
        body += ["<h2>Notes</h2><ul>"] + [f"<li>{htmlpage.para(n)}</li>" for n in notes] + ["</ul>"]
    files["dyad.html"] = out / "dyad.html"
    files["dyad.html"].write_text(htmlpage.page("dyadlab dyad", body), encoding="utf-8")
    return files


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if not np.isfinite(f) else f"{f:.3f}"
