"""Inferential statistics of "Behind the Smile" (Tables III, IV and Fig. 2).

All tests are at the **smile level**, as in the paper (one row per smile, e.g.
``t(207.33)`` and ``F(2, 179)`` at 6 months count smiles, not mothers). Smiles
of one session are therefore not independent observations; the tables
reproduce the paper's analysis, they do not correct for that clustering.

Every number comes from scipy / pingouin / statsmodels:

- :func:`welch_table` (Table III): Welch's unequal-variance t-test per feature
  between visits, ``pingouin.ttest(x12, x6, correction=True)``.
  **Sign convention: 12 minus 6** — ``t`` and ``cohens_d`` are positive when
  the 12-month mean is larger (the paper reports positive t with 12 > 6).
  ``df`` is the Welch–Satterthwaite degrees of freedom (fractional).
  ``cohens_d`` is pingouin's ``compute_effsize(x12, x6, eftype="cohen")``:
  the mean difference over the **pooled** SD
  ``sqrt(((n12-1) s12² + (n6-1) s6²) / (n12 + n6 - 2))`` (not Hedges'
  small-sample correction). ``ci95_low/high`` are pingouin's
  ``compute_esci`` for that d (normal-approximation SE, t critical value with
  n12+n6-2 df). The seed paper does not say which d it reports (its values
  are not reproducible from its t and n by any standard formula), so the
  common pooled-SD d is used.
- :func:`anova_table` (Table IV): one-way ANOVA of a feature across the
  categories of a questionnaire (``scores.SCALES[col].category``) within one
  visit, ``pingouin.anova`` (type-II SS; for one factor partial eta² equals
  eta² = SS_between / SS_total).
- :func:`correlation_table` (Fig. 2): for the k-th smile of each session,
  Pearson r (``scipy.stats.pearsonr``) and the simple linear regression
  **score ~ feature** (``scipy.stats.linregress(x=feature, y=score)``: slope in
  score points per feature unit; smile features as predictors of the score,
  the direction of the paper's models).
- :func:`adjust`: Holm or Benjamini–Hochberg control over one table's ``p``
  column (``statsmodels.stats.multitest.multipletests``), or none.

Exclusions are never silent: every row carries ``excluded`` (observations
dropped because a feature or score was missing) and, where a test could not be
run, a ``reason``; its statistics are then NaN.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pingouin as pg
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from services.stats.scores import CATEGORICAL, FEATURES, KEYS, SCALES, SCORE_COLUMNS

ALPHA = 0.05
#: fewest observations per category for it to enter an ANOVA (see anova_table)
MIN_GROUP = 2
#: fewest sessions with a k-th smile for k to be analysed (correlation_table)
MIN_SESSIONS = 5
#: fewest complete (feature, score) pairs for a correlation
MIN_PAIRS = 3
ADJUST_METHODS = ("none", "holm", "fdr_bh")


# -- formatting -------------------------------------------------------------------
def _fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return "p = n/a"
    if p < 0.001:
        return "p < .001"
    return f"p = {p:.3f}".replace("0.", ".", 1)


def _apa_t(t: float, df: float, p: float, d: float) -> str:
    if not np.isfinite(t):
        return ""
    return f"t({df:.2f}) = {t:.2f}, {_fmt_p(p)}, d = {d:.2f}"


def _apa_f(f: float, df1: float, df2: float, p: float, np2: float) -> str:
    if not np.isfinite(f):
        return ""
    return f"F({df1:g}, {df2:g}) = {f:.2f}, {_fmt_p(p)}, ηp² = {np2:.2f}"


def _features(df: pd.DataFrame, features) -> list[str]:
    feats = list(FEATURES) if features is None else list(features)
    missing = [f for f in feats if f not in df.columns]
    if missing:
        raise ValueError(f"table is missing feature columns: {', '.join(missing)}")
    return feats


def _nan(*cols: str) -> dict:
    return {c: math.nan for c in cols}


# -- Table III ----------------------------------------------------------------------
def welch_table(smiles: pd.DataFrame, features=None, visits=(6, 12)) -> pd.DataFrame:
    """Welch t-test per feature between two visits (smile level), 12 minus 6.

    Columns: feature, label, n_6, n_12, mean_6, sd_6, mean_12, sd_12, t, df, p,
    cohens_d, ci95_low, ci95_high, significant, excluded
    (NaN feature values dropped, both visits), excluded_6, excluded_12,
    reason (why a test was not run; empty otherwise), apa.
    ``visits=(a, b)`` tests b minus a; SDs are sample SDs (ddof=1)."""
    a, b = visits
    if "visit_month" not in smiles.columns:
        raise ValueError("smiles table has no 'visit_month' column")
    feats = _features(smiles, features)
    va = smiles[smiles["visit_month"] == a]
    vb = smiles[smiles["visit_month"] == b]
    rows = []
    for f in feats:
        xa_all = pd.to_numeric(va[f], errors="coerce")
        xb_all = pd.to_numeric(vb[f], errors="coerce")
        xa = xa_all.dropna().to_numpy(float)
        xb = xb_all.dropna().to_numpy(float)
        ex_a, ex_b = int(xa_all.isna().sum()), int(xb_all.isna().sum())
        row = {
            "feature": f,
            "label": FEATURES.get(f, f),
            f"n_{a}": len(xa),
            f"n_{b}": len(xb),
            f"mean_{a}": float(np.mean(xa)) if len(xa) else math.nan,
            f"sd_{a}": float(np.std(xa, ddof=1)) if len(xa) > 1 else math.nan,
            f"mean_{b}": float(np.mean(xb)) if len(xb) else math.nan,
            f"sd_{b}": float(np.std(xb, ddof=1)) if len(xb) > 1 else math.nan,
            **_nan("t", "df", "p", "cohens_d", "ci95_low", "ci95_high"),
            "significant": False,
            "excluded": ex_a + ex_b,
            f"excluded_{a}": ex_a,
            f"excluded_{b}": ex_b,
            "reason": "",
        }
        if len(xa) < 2 or len(xb) < 2:
            row["reason"] = (
                f"fewer than 2 smiles with a value at month {a if len(xa) < 2 else b} "
                f"(n_{a}={len(xa)}, n_{b}={len(xb)})"
            )
        elif np.ptp(xa) == 0 and np.ptp(xb) == 0:
            row["reason"] = "no variance within either visit"
        else:
            tt = pg.ttest(xb, xa, paired=False, correction=True, alternative="two-sided")
            d = float(pg.compute_effsize(xb, xa, paired=False, eftype="cohen"))
            lo, hi = pg.compute_esci(
                stat=d, nx=len(xb), ny=len(xa), paired=False, eftype="cohen", confidence=0.95, decimals=15
            )
            row.update(
                t=float(tt["T"].iloc[0]),
                df=float(tt["dof"].iloc[0]),
                p=float(_col(tt, "p_val", "p-val").iloc[0]),
                cohens_d=d,
                ci95_low=float(lo),
                ci95_high=float(hi),
            )
            row["significant"] = bool(row["p"] < ALPHA)
        row["apa"] = _apa_t(row["t"], row["df"], row["p"], row["cohens_d"])
        rows.append(row)
    return pd.DataFrame(rows)


def _col(df: pd.DataFrame, *names: str) -> pd.Series:
    """The first of ``names`` present (pingouin renamed columns across versions)."""
    for n in names:
        if n in df.columns:
            return df[n]
    raise KeyError(f"none of {names} in {list(df.columns)}")


# -- Table IV -----------------------------------------------------------------------
def anova_table(joined: pd.DataFrame, features=None, scores=None, min_group: int = MIN_GROUP) -> pd.DataFrame:
    """One-way ANOVA per visit × categorical score × feature (smile level).

    The categories of each score are ``scores.SCALES[col].category``. Within a
    visit, smiles missing the score or the feature are excluded (``excluded``).
    **Categories with fewer than ``min_group`` (2) smiles are left out of the
    test** and reported in ``dropped_groups`` / ``dropped_small`` (count of
    smiles); the test needs at least 2 remaining categories, otherwise it is
    skipped with a ``reason``. ``groups`` lists the categories used in scale
    order with their counts, e.g. ``"minimal:120, mild:40"``.

    Columns: feature, label, visit_month, score, score_label, F, df1, df2, p,
    partial_eta2, n, k_groups, groups, excluded, dropped_small, dropped_groups,
    significant (p < .05), reason, apa."""
    for c in ("visit_month",):
        if c not in joined.columns:
            raise ValueError(f"joined table has no {c!r} column")
    feats = _features(joined, features)
    score_cols = list(CATEGORICAL) if scores is None else list(scores)
    for s in score_cols:
        if s not in SCALES or SCALES[s].categories is None:
            raise ValueError(f"{s!r} is not a categorical score (choose from {CATEGORICAL})")
        if s not in joined.columns:
            raise ValueError(f"joined table has no {s!r} column")
    rows = []
    for visit in sorted(pd.unique(joined["visit_month"].dropna())):
        sub = joined[joined["visit_month"] == visit]
        for s in score_cols:
            sc = SCALES[s]
            cat = sc.category(pd.to_numeric(sub[s], errors="coerce"))
            assert sc.categories is not None  # score_cols are categorical (checked above)
            order = [name for name, _, _ in sc.categories]
            for f in feats:
                y = pd.to_numeric(sub[f], errors="coerce")
                ok = y.notna() & cat.notna()
                data = pd.DataFrame({"y": y[ok].to_numpy(float), "g": cat[ok].to_numpy(object)})
                counts = data["g"].value_counts()
                small = [g for g in order if 0 < counts.get(g, 0) < min_group]
                keep = [g for g in order if counts.get(g, 0) >= min_group]
                data = data[data["g"].isin(keep)]
                row = {
                    "feature": f,
                    "label": FEATURES.get(f, f),
                    "visit_month": int(visit),
                    "score": s,
                    "score_label": sc.label,
                    **_nan("F", "df1", "df2", "p", "partial_eta2"),
                    "n": len(data),
                    "k_groups": len(keep),
                    "groups": ", ".join(f"{g}:{int(counts[g])}" for g in keep),
                    "excluded": int((~ok).sum()),
                    "dropped_small": int(sum(counts[g] for g in small)),
                    "dropped_groups": ", ".join(f"{g}:{int(counts[g])}" for g in small),
                    "significant": False,
                    "reason": "",
                }
                if len(keep) < 2:
                    row["reason"] = (
                        f"fewer than 2 {sc.label} categories with >= {min_group} "
                        f"smiles at month {int(visit)}"
                        + (
                            f" (present: {', '.join(f'{g}:{int(counts[g])}' for g in order if g in counts)})"
                            if len(counts)
                            else " (no complete observations)"
                        )
                    )
                elif data["y"].nunique() < 2:
                    row["reason"] = "feature has no variance"
                else:
                    aov = pg.anova(data=data, dv="y", between="g", ss_type=2, detailed=False, effsize="np2")
                    r0 = aov.iloc[0]
                    row.update(
                        F=float(r0["F"]),
                        df1=float(r0["ddof1"]),
                        df2=float(r0["ddof2"]),
                        p=float(_col(aov, "p_unc", "p-unc").iloc[0]),
                        partial_eta2=float(r0["np2"]),
                    )
                    row["significant"] = bool(row["p"] < ALPHA)
                row["apa"] = _apa_f(row["F"], row["df1"], row["df2"], row["p"], row["partial_eta2"])
                rows.append(row)
    out = pd.DataFrame(rows)
    if not len(out):
        out = pd.DataFrame(
            columns=[
                "feature",
                "label",
                "visit_month",
                "score",
                "score_label",
                "F",
                "df1",
                "df2",
                "p",
                "partial_eta2",
                "n",
                "k_groups",
                "groups",
                "excluded",
                "dropped_small",
                "dropped_groups",
                "significant",
                "reason",
                "apa",
            ]
        )
    return out


# -- Fig. 2 -------------------------------------------------------------------------
def sessions_per_index(joined: pd.DataFrame) -> pd.Series:
    """Number of sessions (participant, visit) having a k-th smile, indexed by k."""
    if "smile_id" not in joined.columns:
        raise ValueError("joined table has no 'smile_id' column")
    ids = joined.dropna(subset=["smile_id"])
    return ids.groupby("smile_id")[KEYS].apply(lambda g: len(g.drop_duplicates())).sort_index()


def max_smile_index(joined: pd.DataFrame, min_n: int = MIN_SESSIONS) -> int:
    """K: the largest k such that every index 1..k has >= ``min_n`` sessions with
    a k-th smile (counting stops at the first index that falls short)."""
    counts = sessions_per_index(joined)
    k = 0
    while counts.get(k + 1, 0) >= min_n:
        k += 1
    return k


def correlation_table(
    joined: pd.DataFrame,
    max_k: int | None = None,
    features=None,
    scores=None,
    min_n: int = MIN_SESSIONS,
    by_visit: bool = False,
) -> pd.DataFrame:
    """Pearson correlation and simple regression of the k-th smile's features with
    each score, k = 1..K (smile level: one smile per session at each k).

    K = :func:`max_smile_index` (``min_n`` sessions), capped at ``max_k``.
    Regression direction: **score ~ feature** (``linregress(x=feature, y=score)``).
    By default both visits are pooled (``visit_month`` is <NA>); ``by_visit=True``
    gives one block per visit. Pairs missing the feature or the score are
    excluded (``excluded``); fewer than 3 complete pairs, or a constant
    feature/score, skip the row with a ``reason``.

    Columns: smile_index, visit_month, feature, label, score, score_label, n,
    sessions (sessions with a k-th smile), r, p, slope, intercept, slope_p,
    slope_se, significant, excluded, reason."""
    feats = _features(joined, features)
    score_cols = list(SCORE_COLUMNS) if scores is None else list(scores)
    missing = [s for s in score_cols if s not in joined.columns]
    if missing:
        raise ValueError(f"joined table has no score columns: {', '.join(missing)}")
    K = max_smile_index(joined, min_n)
    if max_k is not None:
        if max_k < 1:
            raise ValueError("max_k must be >= 1")
        K = min(K, int(max_k))
    blocks = (
        [(pd.NA, joined)]
        if not by_visit
        else [
            (int(v), joined[joined["visit_month"] == v])
            for v in sorted(pd.unique(joined["visit_month"].dropna()))
        ]
    )
    rows = []
    for visit, block in blocks:
        for k in range(1, K + 1):
            kth = block[block["smile_id"] == k]
            sessions = len(kth[KEYS].drop_duplicates())
            for f in feats:
                x_all = pd.to_numeric(kth[f], errors="coerce")
                for s in score_cols:
                    y_all = pd.to_numeric(kth[s], errors="coerce")
                    ok = x_all.notna() & y_all.notna()
                    x, y = x_all[ok].to_numpy(float), y_all[ok].to_numpy(float)
                    row = {
                        "smile_index": k,
                        "visit_month": visit,
                        "feature": f,
                        "label": FEATURES.get(f, f),
                        "score": s,
                        "score_label": SCALES[s].label if s in SCALES else s,
                        "n": len(x),
                        "sessions": sessions,
                        **_nan("r", "p", "slope", "intercept", "slope_p", "slope_se"),
                        "significant": False,
                        "excluded": int((~ok).sum()),
                        "reason": "",
                    }
                    if len(x) < MIN_PAIRS:
                        row["reason"] = f"fewer than {MIN_PAIRS} complete pairs"
                    elif np.ptp(x) == 0 or np.ptp(y) == 0:
                        row["reason"] = ("feature" if np.ptp(x) == 0 else "score") + " is constant"
                    else:
                        r, p = sps.pearsonr(x, y)
                        lr = sps.linregress(x, y)
                        row.update(
                            r=float(r),
                            p=float(p),
                            slope=float(lr.slope),
                            intercept=float(lr.intercept),
                            slope_p=float(lr.pvalue),
                            slope_se=float(lr.stderr),
                        )
                        row["significant"] = bool(row["p"] < ALPHA)
                    rows.append(row)
    out = pd.DataFrame(
        rows,
        columns=[
            "smile_index",
            "visit_month",
            "feature",
            "label",
            "score",
            "score_label",
            "n",
            "sessions",
            "r",
            "p",
            "slope",
            "intercept",
            "slope_p",
            "slope_se",
            "significant",
            "excluded",
            "reason",
        ],
    )
    out["visit_month"] = out["visit_month"].astype("Int64")
    return out


# -- multiple comparisons -----------------------------------------------------------
def adjust(table: pd.DataFrame, method: str = "none", alpha: float = ALPHA, p_col: str = "p") -> pd.DataFrame:
    """A copy of ``table`` with ``p_adj``, ``significant_adj`` and ``adjust``
    (the method) columns; the whole table is one family.

    ``method``: "none" (p_adj = p), "holm" or "fdr_bh" (statsmodels
    ``multipletests``). Rows whose p is NaN (tests not run) are not part of
    the family and keep p_adj = NaN, significant_adj = False."""
    if method not in ADJUST_METHODS:
        raise ValueError(f"unknown adjustment {method!r}; choose from {', '.join(ADJUST_METHODS)}")
    if p_col not in table.columns:
        raise ValueError(f"table has no {p_col!r} column")
    out = table.copy()
    p = pd.to_numeric(out[p_col], errors="coerce").to_numpy(float)
    ok = np.isfinite(p)
    p_adj = np.full(len(p), np.nan)
    if method == "none":
        p_adj[ok] = p[ok]
    elif ok.any():
        _, padj, _, _ = multipletests(p[ok], alpha=alpha, method=method)
        p_adj[ok] = padj
    out["p_adj"] = p_adj
    out["significant_adj"] = np.where(ok, p_adj < alpha, False).astype(bool)
    out["adjust"] = method
    return out


def dyad_tables(dyads_joined: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-dyad measures against the scores, one dyad = one observation:
    one-way ANOVA across categories per visit, and Pearson r with each score
    (visits pooled), both as for the smile features."""
    from services.stats.scores import DYAD_MEASURES

    measures = list(DYAD_MEASURES)
    anova = anova_table(dyads_joined, features=measures)
    corr = correlation_table(dyads_joined.assign(smile_id=1), features=measures)
    corr = corr.drop(columns=["smile_index"])
    for t in (anova, corr):
        t["label"] = t["feature"].map(DYAD_MEASURES)
    return anova, corr
