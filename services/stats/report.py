"""APA-style numbers, the cohort figures, and a self-contained HTML report.

APA conventions (7th ed.): statistics in italics; no leading zero for values
that cannot exceed 1 (p, r, ηp²); exact p to three decimals, "p < .001"
below that; t(df) with fractional Welch df to two decimals.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dyadlab import htmlpage
from services.stats.scores import FEATURES, SCALES


# -- numbers -------------------------------------------------------------------------
def _no_zero(x: float, digits: int) -> str:
    s = f"{x:.{digits}f}"
    return s.replace("0.", ".", 1) if abs(x) < 1 else s


def apa_p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "p = n/a"
    if p < 0.001:
        return "p < .001"
    return "p > .999" if p > 0.999 else f"p = {_no_zero(p, 3)}"


def apa_t(t: float, df: float, p: float, d: float | None = None) -> str:
    s = f"t({df:.2f}) = {t:.2f}, {apa_p(p)}"
    return s + (f", d = {d:.2f}" if d is not None and np.isfinite(d) else "")


def apa_f(F: float, df1: float, df2: float, p: float, eta: float | None = None) -> str:
    s = f"F({df1:g}, {df2:g}) = {F:.2f}, {apa_p(p)}"
    return s + (f", ηp² = {_no_zero(eta, 2)}" if eta is not None and np.isfinite(eta) else "")


def apa_r(r: float, n: int, p: float) -> str:
    return f"r({n - 2}) = {_no_zero(r, 2)}, {apa_p(p)}"


# -- figures ----------------------------------------------------------------------------
def _empty(title: str, why: str) -> bytes:
    """A figure that says why there is nothing to plot (small cohorts)."""
    fig = Figure(figsize=(7, 1.6), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.4, why, ha="center", va="center", fontsize=10, color="0.3")
    return htmlpage.png(fig)


def fig_ttests(t3: pd.DataFrame) -> bytes:
    """Cohen's d per feature (12 vs 6 months), significant ones filled."""
    if not t3["cohens_d"].notna().any():
        return _empty("Table III", "no feature has smiles at both visits")
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(t3))[::-1]
    sig = t3["p"] < 0.05
    ax.axvline(0, color="0.6", lw=1)
    ax.scatter(
        t3["cohens_d"],
        y,
        s=60,
        c=np.where(sig, "#1f77b4", "white"),
        edgecolors="#1f77b4",
        zorder=3,
        label="p < .05 (filled)",
    )
    if {"ci95_low", "ci95_high"} <= set(t3.columns):
        ax.hlines(y, t3["ci95_low"], t3["ci95_high"], color="#1f77b4", lw=1.5, label="95% CI")
    ax.set_yticks(y, [FEATURES.get(f, f) for f in t3["feature"]])
    ax.set_xlabel("Cohen's d (12 months − 6 months)")
    ax.set_title("Table III: smile features between visits")
    ax.legend(loc="lower right", fontsize=8)
    return htmlpage.png(fig)


def fig_anova(t4: pd.DataFrame) -> bytes:
    """Partial η² per feature × score, one panel per visit; * marks p < .05."""
    ok = t4.dropna(subset=["partial_eta2"])
    if not len(ok):
        return _empty("Table IV", "no visit has two questionnaire categories with smiles")
    visits = sorted(ok["visit_month"].unique()) or [6, 12]
    fig = Figure(figsize=(8, 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(visits), sharey=True))
    vmax = max(0.05, float(ok["partial_eta2"].max()) if len(ok) else 0.05)
    im = None
    for ax, v in zip(axes, visits):
        sub = ok[ok["visit_month"] == v]
        m = sub.pivot_table(index="feature", columns="score", values="partial_eta2")
        m = m.reindex(index=list(FEATURES), columns=[c for c in SCALES if SCALES[c].categories])
        im = ax.imshow(m.to_numpy(float), vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
        for i, f in enumerate(m.index):
            for j, s in enumerate(m.columns):
                row = sub[(sub["feature"] == f) & (sub["score"] == s)]
                if len(row) and row["p"].iloc[0] < 0.05:
                    ax.text(j, i, "*", ha="center", va="center", color="white", fontsize=14)
        ax.set_xticks(range(len(m.columns)), [SCALES[c].label for c in m.columns])
        ax.set_yticks(range(len(m.index)), [FEATURES[f] for f in m.index])
        ax.set_title(f"{v} months")
    if im is not None:
        fig.colorbar(im, ax=axes, label="partial η²  (* p < .05)")
    fig.suptitle("Table IV: one-way ANOVA across questionnaire categories")
    return htmlpage.png(fig)


def fig_correlations(corr: pd.DataFrame) -> bytes:
    """Fig. 2: Pearson r of the k-th smile's feature with each score, against k."""
    scores = [s for s in SCALES if s in set(corr["score"])]
    if not scores or not corr["r"].notna().any():
        return _empty("Fig. 2", "too few sessions with a k-th smile (at least 5 are needed)")
    fig = Figure(figsize=(12, 2.6 * math.ceil(len(scores) / 3) + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(math.ceil(len(scores) / 3), 3, squeeze=False)).ravel()
    for ax, s in zip(axes, scores):
        sub = corr[corr["score"] == s]
        for f in FEATURES:
            line = sub[sub["feature"] == f].sort_values("smile_index")
            if len(line):
                ax.plot(line["smile_index"], line["r"], marker="o", ms=3, label=FEATURES[f])
        ax.axhline(0, color="0.6", lw=1)
        ax.set_title(SCALES[s].label)
        ax.set_xlabel("smile index k")
        ax.set_ylabel("Pearson r")
    for ax in axes[len(scores) :]:
        ax.set_visible(False)
    if scores:
        axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Fig. 2: correlation of the k-th smile's features with each score")
    return htmlpage.png(fig)


def fig_mlp(t2: pd.DataFrame) -> bytes:
    """Table II: the MLP's cross-validated MAE against the mean baseline."""
    fig = Figure(figsize=(7, 3.4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(t2))
    ax.bar(x - 0.2, t2["mae"] / t2["baseline_mae"], 0.4, label="MLP")
    ax.bar(x + 0.2, np.ones(len(t2)), 0.4, color="0.75", label="mean baseline")
    ax.set_xticks(x, [SCALES[s].label for s in t2["score"]])
    ax.set_ylabel("MAE relative to baseline")
    ax.set_title("Table II: sliding-window MLP (cross-validated)")
    ax.legend(fontsize=8)
    return htmlpage.png(fig)


# -- HTML -----------------------------------------------------------------------------
def _adjusted(t: pd.DataFrame) -> bool:
    """Whether a multiple-comparison correction was applied to this table."""
    return "p_adj" in t and "adjust" in t and bool((t["adjust"] != "none").any())


def _significant(t: pd.DataFrame) -> pd.Series:
    """Bold rows: adjusted p < .05 when a correction was applied, else p < .05."""
    return t["p_adj"] < 0.05 if _adjusted(t) else t["p"] < 0.05


def dyad_section(anova: pd.DataFrame, corr: pd.DataFrame) -> list[str]:
    """Per-dyad measures (contingency, synchrony, shared smiling) against the scores."""
    ok = anova.dropna(subset=["F"])
    a = pd.DataFrame(
        {
            "Dyad measure": ok["label"],
            "Month": ok["visit_month"],
            "Variable": [SCALES[s].label for s in ok["score"]],
            "ANOVA": [
                apa_f(F, x, y, p, e)
                for F, x, y, p, e in zip(ok["F"], ok["df1"], ok["df2"], ok["p"], ok["partial_eta2"])
            ],
        }
    )
    okc = corr.dropna(subset=["r"])
    c = pd.DataFrame(
        {
            "Dyad measure": okc["label"],
            "Score": [SCALES[s].label for s in okc["score"]],
            "Correlation": [apa_r(r, int(n), p) for r, n, p in zip(okc["r"], okc["n"], okc["p"])],
        }
    )
    return [
        "<h2>Parent–infant dyads</h2>",
        htmlpage.table(
            a,
            "Table V. One-way ANOVA of each dyad measure across questionnaire "
            "categories, per visit (one dyad = one observation).",
            "table5",
            _significant(ok),
        ),
        htmlpage.table(
            c,
            "Table VI. Pearson correlation of each dyad measure with each score (visits pooled).",
            "table6",
            _significant(okc),
        ),
    ]


def html_report(
    t2: pd.DataFrame | None,
    t3: pd.DataFrame,
    t4: pd.DataFrame,
    corr: pd.DataFrame,
    figures: dict[str, bytes],
    notes: list[str],
    meta: dict,
    dyads: tuple[pd.DataFrame, pd.DataFrame] | None = None,
) -> str:
    """One self-contained page (figures inline), readable offline."""
    parts = [
        "<h1>Maternal smiles and mental health: cohort report</h1>",
        htmlpage.para(meta.get("summary", ""), "note"),
    ]
    if t2 is not None and len(t2):
        show = pd.DataFrame(
            {
                "Score": [f"{SCALES[s].label} [{SCALES[s].lo:g}, {SCALES[s].hi:g}]" for s in t2["score"]],
                "Best window": t2["best_window"],
                "Best epochs": t2["best_epochs"],
                "MAE": t2["mae"].map(lambda v: f"{v:.2f}"),
                "RMSE": t2["rmse"].map(lambda v: f"{v:.2f}"),
                "Baseline MAE": t2["baseline_mae"].map(lambda v: f"{v:.2f}"),
                "Baseline RMSE": t2["baseline_rmse"].map(lambda v: f"{v:.2f}"),
            }
        )
        for extra in ("holdout_mae", "holdout_rmse"):
            if extra in t2:
                show["Hold-out " + extra.split("_")[1].upper()] = t2[extra].map(lambda v: f"{v:.2f}")
        parts += [
            "<h2>Sliding-window MLP</h2>",
            htmlpage.table(
                show,
                "Table II. Best window size and epochs per score, cross-validated "
                "MAE and RMSE (mean over seeds), against predicting the training mean. "
                "The hold-out columns test the chosen setting on ~19/94 of the mothers; "
                "the choice was made by cross-validation that saw them, so they are "
                "optimistic.",
                "table2",
            ),
            htmlpage.img(figures["table2"], "MLP against baseline"),
        ]
    show3 = pd.DataFrame(
        {
            "Smile feature": [FEATURES.get(f, f) for f in t3["feature"]],
            "M (SD), 6 months": [f"{m:.3f} ({s:.3f})" for m, s in zip(t3["mean_6"], t3["sd_6"])],
            "M (SD), 12 months": [f"{m:.3f} ({s:.3f})" for m, s in zip(t3["mean_12"], t3["sd_12"])],
            "Unequal-variance t-test": [
                apa_t(t, df, p, d) for t, df, p, d in zip(t3["t"], t3["df"], t3["p"], t3["cohens_d"])
            ],
        }
    )
    if _adjusted(t3):
        show3["Adjusted p"] = t3["p_adj"].map(apa_p)
    parts += [
        "<h2>Visits compared</h2>",
        htmlpage.table(
            show3,
            "Table III. Welch t-tests of smile features between the 6- and "
            "12-month visits (smiles as observations; bold: p < .05, adjusted when "
            "a correction is applied).",
            "table3",
            _significant(t3),
        ),
        htmlpage.img(figures["table3"], "Cohen's d per feature"),
    ]
    ok4 = t4.dropna(subset=["F"])
    show4 = pd.DataFrame(
        {
            "Smile feature": [FEATURES.get(f, f) for f in ok4["feature"]],
            "Month": ok4["visit_month"],
            "Variable": [SCALES[s].label for s in ok4["score"]],
            "ANOVA": [
                apa_f(F, a, b, p, e)
                for F, a, b, p, e in zip(ok4["F"], ok4["df1"], ok4["df2"], ok4["p"], ok4["partial_eta2"])
            ],
        }
    )
    if _adjusted(ok4):
        show4["Adjusted p"] = ok4["p_adj"].map(apa_p)
    parts += [
        "<h2>Questionnaire categories</h2>",
        htmlpage.table(
            show4,
            "Table IV. One-way ANOVA of each smile feature across questionnaire "
            "categories, per visit (all tests; bold: p < .05, adjusted when a "
            "correction is applied).",
            "table4",
            _significant(ok4),
        ),
        htmlpage.img(figures["table4"], "partial eta squared"),
    ]
    parts += [
        "<h2>Smile by smile</h2>",
        "<p>Pearson correlation of the k-th smile's features with each score "
        "(the full table, with regression slopes, is fig2_correlations.csv).</p>",
        htmlpage.img(figures["fig2"], "correlation against smile index"),
    ]
    if dyads is not None:
        parts += dyad_section(*dyads)
    if notes:
        parts += ["<h2>Notes and exclusions</h2><ul>"]
        parts += [f"<li>{html.escape(n)}</li>" for n in notes]
        parts += ["</ul>"]
    parts.append(htmlpage.para(meta.get("footer", ""), "note"))
    return htmlpage.page("dyadlab cohort report", parts)


def write_all(out: Path, t2, t3, t4, corr, notes, meta, dyads=None) -> dict[str, Path]:
    """Every table (CSV), figure (PNG) and the report into `out`; returns name -> path."""
    out.mkdir(parents=True, exist_ok=True)
    figures = {"table3": fig_ttests(t3), "table4": fig_anova(t4), "fig2": fig_correlations(corr)}
    if t2 is not None and len(t2):
        figures["table2"] = fig_mlp(t2)
    files = {}
    da, dc = dyads if dyads is not None else (None, None)
    for name, df in (
        ("table2_mlp.csv", t2),
        ("table3_ttests.csv", t3),
        ("table4_anova.csv", t4),
        ("fig2_correlations.csv", corr),
        ("table5_dyads_anova.csv", da),
        ("table6_dyads_correlations.csv", dc),
    ):
        if df is not None:
            files[name] = out / name
            df.to_csv(files[name], index=False)  # full precision: floats round-trip
    for name, png in figures.items():
        files[f"{name}.png"] = out / f"{name}.png"
        files[f"{name}.png"].write_bytes(png)
    files["report.html"] = out / "report.html"
    files["report.html"].write_text(
        html_report(t2, t3, t4, corr, figures, notes, meta, dyads), encoding="utf-8"
    )
    return files
