"""Tables III, IV and Fig. 2 statistics against independent reference computations.

The module under test uses pingouin (t-test, d, ANOVA) and scipy.linregress /
pearsonr; the references here are scipy.stats.ttest_ind, the Welch–Satterthwaite
formula, numpy, statsmodels OLS + anova_lm, scipy.stats.f_oneway, numpy.polyfit
and statsmodels.multipletests. Synthetic cohorts are generated here with planted
effects (no dependence on simulate.py).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from services.stats import inference as inf
from services.stats import scores as sc

TOL = 1e-9
FEATS = list(sc.FEATURES)


def cohort(seed: int = 7, n_part: int = 60) -> pd.DataFrame:
    """A joined smile table with planted effects:
    - every feature is larger at 12 months (max_onset_speed by ~0.8 SD);
    - onset_amplitude rises with PSS category (low < moderate < high);
    - total_duration_s rises linearly with PHQ-9 (so the k-th smile correlates).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_part):
        pid = f"p{i:03d}"
        for visit in (6, 12):
            phq = int(rng.integers(0, 20))
            pss = int(rng.choice([rng.integers(0, 14), rng.integers(14, 27), rng.integers(27, 41)]))
            aces = int(rng.integers(0, 8))
            scores = {
                "phq9": phq,
                "aces": aces,
                "pss": pss,
                "pearls": int(rng.integers(0, 4)),
                "social_support": float(rng.uniform(40, 100)),
            }
            pss_level = 0 if pss <= 13 else (1 if pss <= 26 else 2)
            for k in range(1, int(rng.integers(1, 9)) + 1):
                up = 1.0 if visit == 12 else 0.0
                feats = {
                    "max_onset_speed": rng.normal(2.0 + 0.8 * up, 1.0),
                    "max_offset_speed": rng.normal(1.5 + 0.3 * up, 0.8 + 0.4 * up),
                    "onset_amplitude": rng.normal(0.5 + 0.3 * pss_level + 0.1 * up, 0.2),
                    "offset_amplitude": rng.normal(0.4 + 0.1 * up, 0.2),
                    "onset_duration_s": rng.gamma(2.0, 0.3),
                    "offset_duration_s": rng.gamma(2.0, 0.35),
                    "apex_duration_s": rng.gamma(1.5, 0.5),
                    "total_duration_s": 1.0 + 0.08 * phq + rng.normal(0, 0.3),
                }
                rows.append({"participant_id": pid, "visit_month": visit, "smile_id": k, **feats, **scores})
    return pd.DataFrame(rows)


# -- Table III ------------------------------------------------------------------------
def test_welch_matches_scipy_and_satterthwaite():
    df = cohort()
    tab = inf.welch_table(df)
    assert list(tab["feature"]) == FEATS
    for _, row in tab.iterrows():
        x6 = df.loc[df.visit_month == 6, row.feature].to_numpy(float)
        x12 = df.loc[df.visit_month == 12, row.feature].to_numpy(float)
        ref = sps.ttest_ind(x12, x6, equal_var=False)  # 12 minus 6
        v6, v12 = x6.var(ddof=1) / len(x6), x12.var(ddof=1) / len(x12)
        ws = (v6 + v12) ** 2 / (v6**2 / (len(x6) - 1) + v12**2 / (len(x12) - 1))
        assert row.t == pytest.approx(ref.statistic, abs=TOL, rel=TOL)
        assert row.p == pytest.approx(ref.pvalue, abs=TOL, rel=TOL)
        assert row.df == pytest.approx(ws, abs=TOL, rel=TOL)
        assert row.df != round(row.df)  # fractional Welch df
        assert (row.n_6, row.n_12) == (len(x6), len(x12))
        assert row.mean_12 == pytest.approx(x12.mean(), rel=TOL)
        assert row.sd_6 == pytest.approx(x6.std(ddof=1), rel=TOL)
        # pooled-SD Cohen's d, numpy
        sp = np.sqrt(
            ((len(x6) - 1) * x6.var(ddof=1) + (len(x12) - 1) * x12.var(ddof=1)) / (len(x6) + len(x12) - 2)
        )
        d = (x12.mean() - x6.mean()) / sp
        assert row.cohens_d == pytest.approx(d, abs=TOL, rel=TOL)
        n1, n2 = len(x12), len(x6)
        se = np.sqrt((n1 + n2) / (n1 * n2) + d**2 / (2 * (n1 + n2)))
        crit = sps.t.ppf(0.975, n1 + n2 - 2)
        assert row.ci95_low == pytest.approx(d - crit * se, abs=1e-9)
        assert row.ci95_high == pytest.approx(d + crit * se, abs=1e-9)
        assert row.excluded == 0 and row.reason == ""
    # planted: 12 > 6 gives a positive, significant t and d ~ 0.8
    mos = tab.set_index("feature").loc["max_onset_speed"]
    assert mos.t > 0 and mos.p < 1e-6 and 0.5 < mos.cohens_d < 1.1 and mos.significant
    assert mos.apa.startswith(f"t({mos.df:.2f}) = {mos.t:.2f}, p < .001, d = ")


def test_welch_sign_follows_12_minus_6():
    df = cohort()
    df.loc[df.visit_month == 12, "max_onset_speed"] -= 3.0  # now 12 < 6
    row = inf.welch_table(df, features=["max_onset_speed"]).iloc[0]
    assert row.t < 0 and row.cohens_d < 0


def test_welch_missing_values_excluded_and_counted():
    df = cohort()
    rng = np.random.default_rng(1)
    i6 = rng.choice(np.flatnonzero(df.visit_month == 6), 7, replace=False)
    i12 = rng.choice(np.flatnonzero(df.visit_month == 12), 4, replace=False)
    df.loc[np.r_[i6, i12], "onset_amplitude"] = np.nan
    row = inf.welch_table(df).set_index("feature").loc["onset_amplitude"]
    assert (row.excluded, row.excluded_6, row.excluded_12) == (11, 7, 4)
    x6 = df.loc[df.visit_month == 6, "onset_amplitude"].dropna()
    x12 = df.loc[df.visit_month == 12, "onset_amplitude"].dropna()
    assert (row.n_6, row.n_12) == (len(x6), len(x12))
    assert row.t == pytest.approx(sps.ttest_ind(x12, x6, equal_var=False).statistic, rel=TOL)
    other = inf.welch_table(df).set_index("feature").loc["onset_duration_s"]
    assert other.excluded == 0


def test_welch_too_few_is_skipped_with_reason():
    df = cohort()
    df.loc[df.visit_month == 6, "apex_duration_s"] = np.nan
    df.loc[df.index[df.visit_month == 6][0], "apex_duration_s"] = 1.0
    row = inf.welch_table(df).set_index("feature").loc["apex_duration_s"]
    assert np.isnan(row.t) and "fewer than 2" in row.reason and row.n_6 == 1
    assert not row.significant


# -- Table IV -------------------------------------------------------------------------
def _statsmodels_anova(y, g):
    d = pd.DataFrame({"y": y, "g": g})
    fit = smf.ols("y ~ C(g)", data=d).fit()
    a = sm.stats.anova_lm(fit, typ=2)
    ss_b, ss_w = a.loc["C(g)", "sum_sq"], a.loc["Residual", "sum_sq"]
    return (
        a.loc["C(g)", "F"],
        a.loc["C(g)", "PR(>F)"],
        ss_b / (ss_b + ss_w),
        a.loc["C(g)", "df"],
        a.loc["Residual", "df"],
    )


def test_anova_matches_statsmodels_and_f_oneway():
    df = cohort()
    tab = inf.anova_table(df)
    assert set(tab["score"]) == set(sc.CATEGORICAL)
    assert set(tab["visit_month"]) == {6, 12}
    assert len(tab) == 2 * len(sc.CATEGORICAL) * len(FEATS)
    ran = tab[tab.reason == ""]
    assert len(ran) == len(tab)  # all cohorts have >= 2 groups
    for _, row in ran.iterrows():
        sub = df[df.visit_month == row.visit_month]
        cat = sc.SCALES[row.score].category(sub[row.score])
        ok = cat.notna() & sub[row.feature].notna()
        y, g = sub.loc[ok, row.feature].to_numpy(float), cat[ok].to_numpy(object)
        counts = pd.Series(g).value_counts()
        keep = counts[counts >= 2].index
        y, g = y[np.isin(g, keep)], g[np.isin(g, keep)]
        F, p, eta2, df1, df2 = _statsmodels_anova(y, g)
        assert row.F == pytest.approx(F, rel=TOL, abs=TOL)
        assert row.p == pytest.approx(p, rel=TOL, abs=TOL)
        assert row.partial_eta2 == pytest.approx(eta2, rel=TOL, abs=TOL)
        assert (row.df1, row.df2) == (df1, df2) == (len(keep) - 1, len(y) - len(keep))
        ref = sps.f_oneway(*[y[g == k] for k in keep])
        assert row.F == pytest.approx(ref.statistic, rel=TOL)
        assert row.p == pytest.approx(ref.pvalue, rel=TOL, abs=TOL)
        assert row.n == len(y)
        parsed = dict(s.rsplit(":", 1) for s in row.groups.split(", "))
        assert {k: int(v) for k, v in parsed.items()} == {k: int(counts[k]) for k in keep}
    # planted: onset amplitude differs across PSS categories at both visits
    hit = tab[(tab.feature == "onset_amplitude") & (tab.score == "pss")]
    assert len(hit) == 2 and hit.significant.all() and (hit.partial_eta2 > 0.2).all()
    assert hit.iloc[0].apa.startswith(f"F({hit.iloc[0].df1:g}, {hit.iloc[0].df2:g}) = ")


def test_anova_groups_in_scale_order():
    df = cohort()
    row = inf.anova_table(df, features=["onset_amplitude"], scores=["pss"]).iloc[0]
    names = [s.rsplit(":", 1)[0] for s in row.groups.split(", ")]
    assert names == ["low", "moderate", "high"]


def test_anova_missing_scores_and_features_counted():
    df = cohort()
    m6 = df.visit_month == 6
    idx_score = df.index[m6][:5]
    idx_feat = df.index[m6][10:13]
    df.loc[idx_score, "phq9"] = np.nan
    df.loc[idx_feat, "max_onset_speed"] = np.nan
    tab = inf.anova_table(df, features=["max_onset_speed", "onset_amplitude"], scores=["phq9"])
    r = tab.set_index(["visit_month", "feature"])
    assert r.loc[(6, "max_onset_speed"), "excluded"] == 8
    assert r.loc[(6, "onset_amplitude"), "excluded"] == 5
    assert r.loc[(12, "max_onset_speed"), "excluded"] == 0
    assert r.loc[(6, "max_onset_speed"), "n"] + 8 + r.loc[(6, "max_onset_speed"), "dropped_small"] == int(
        m6.sum()
    )


def test_anova_singleton_category_is_dropped_with_note():
    """A category with one smile is left out of the test (and named), not used."""
    rng = np.random.default_rng(3)
    y = rng.normal(size=41)
    pss = np.r_[np.full(20, 5), np.full(20, 20), 35]  # low, moderate, one 'high'
    df = pd.DataFrame(
        {
            "participant_id": [f"p{i}" for i in range(41)],
            "visit_month": 6,
            "smile_id": 1,
            "onset_amplitude": y,
            "pss": pss,
        }
    )
    row = inf.anova_table(df, features=["onset_amplitude"], scores=["pss"]).iloc[0]
    assert row.reason == "" and row.k_groups == 2 and row.n == 40
    assert row.dropped_groups == "high:1" and row.dropped_small == 1
    assert row.groups == "low:20, moderate:20"
    ref = sps.f_oneway(y[:20], y[20:40])
    assert row.F == pytest.approx(ref.statistic, rel=TOL) and row.df2 == 38
    # only one usable category left -> skipped with a reason, no statistics
    df2 = df.iloc[[0, 1, 2, 20, 40]]
    row2 = inf.anova_table(df2, features=["onset_amplitude"], scores=["pss"]).iloc[0]
    assert np.isnan(row2.F) and "fewer than 2 PSS categories" in row2.reason
    assert row2.k_groups == 1 and row2.dropped_small == 2 and not row2.significant


def test_anova_rejects_non_categorical_score():
    with pytest.raises(ValueError, match="not a categorical"):
        inf.anova_table(cohort(n_part=5), scores=["pearls"])


# -- Fig. 2 ---------------------------------------------------------------------------
def test_correlation_matches_pearsonr_and_polyfit():
    df = cohort()
    tab = inf.correlation_table(df, max_k=3)
    assert sorted(set(tab.smile_index)) == [1, 2, 3]
    assert len(tab) == 3 * len(FEATS) * len(sc.SCORE_COLUMNS)
    assert tab.visit_month.isna().all()  # visits pooled
    for _, row in tab.iterrows():
        kth = df[df.smile_id == row.smile_index]
        ok = kth[row.feature].notna() & kth[row.score].notna()
        x, y = kth.loc[ok, row.feature].to_numpy(float), kth.loc[ok, row.score].to_numpy(float)
        r, p = sps.pearsonr(x, y)
        slope, icpt = np.polyfit(x, y, 1)  # score ~ feature
        assert row.r == pytest.approx(r, abs=TOL)
        assert row.p == pytest.approx(p, abs=TOL, rel=TOL)
        assert row.slope == pytest.approx(slope, abs=TOL, rel=1e-8)
        assert row.intercept == pytest.approx(icpt, abs=TOL, rel=1e-8)
        ols = sm.OLS(y, sm.add_constant(x)).fit()
        assert row.slope_p == pytest.approx(ols.pvalues[1], abs=TOL, rel=1e-8)
        assert row.n == len(x) and row.sessions == len(kth)
    # planted: total duration rises with PHQ-9 at every k
    hit = tab[(tab.feature == "total_duration_s") & (tab.score == "phq9")]
    assert (hit.r > 0.5).all() and hit.significant.all() and (hit.slope > 0).all()


def test_correlation_by_visit_and_exclusions():
    df = cohort()
    first = df.index[(df.smile_id == 1) & (df.visit_month == 12)]
    df.loc[first[:3], "pss"] = np.nan
    df.loc[first[3:5], "onset_amplitude"] = np.nan
    tab = inf.correlation_table(df, max_k=1, by_visit=True)
    assert list(tab.visit_month.unique()) == [6, 12]
    r = tab.set_index(["visit_month", "feature", "score"])
    assert r.loc[(12, "onset_amplitude", "pss"), "excluded"] == 5
    assert r.loc[(12, "onset_amplitude", "phq9"), "excluded"] == 2
    assert r.loc[(12, "max_onset_speed", "pss"), "excluded"] == 3
    assert r.loc[(6, "onset_amplitude", "pss"), "excluded"] == 0
    n12 = int(((df.smile_id == 1) & (df.visit_month == 12)).sum())
    assert r.loc[(12, "onset_amplitude", "pss"), "n"] == n12 - 5


def _sessions(counts: list[int]) -> pd.DataFrame:
    """One session per entry, with that many smiles; constant-free random data."""
    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate(counts):
        s = {c: float(rng.uniform(0, 20)) for c in sc.SCORE_COLUMNS}
        for k in range(1, n + 1):
            rows.append(
                {
                    "participant_id": f"p{i}",
                    "visit_month": 6,
                    "smile_id": k,
                    **{f: float(rng.normal()) for f in FEATS},
                    **s,
                }
            )
    return pd.DataFrame(rows)


def test_K_stops_where_fewer_than_5_sessions_have_a_kth_smile():
    # sessions with >= k smiles: k=1:8, 2:7, 3:5, 4:3, 5:1
    df = _sessions([1, 2, 2, 3, 3, 4, 4, 5])
    assert list(inf.sessions_per_index(df)) == [8, 7, 5, 3, 1]
    assert inf.max_smile_index(df) == 3
    tab = inf.correlation_table(df)
    assert tab.smile_index.max() == 3 and list(tab.groupby("smile_index").sessions.first()) == [8, 7, 5]
    assert inf.correlation_table(df, max_k=2).smile_index.max() == 2
    assert inf.max_smile_index(df, min_n=8) == 1
    assert inf.max_smile_index(_sessions([3, 3, 3, 3])) == 0
    assert inf.correlation_table(_sessions([3, 3, 3, 3])).empty


def test_correlation_too_few_pairs_has_reason():
    df = _sessions([2, 2, 2, 2, 2, 2])
    df.loc[df.smile_id == 2, "phq9"] = np.nan
    df.loc[df.index[df.smile_id == 2][:2], "phq9"] = 5.0
    row = (
        inf.correlation_table(df)
        .set_index(["smile_index", "feature", "score"])
        .loc[(2, "onset_amplitude", "phq9")]
    )
    assert np.isnan(row.r) and "fewer than 3" in row.reason and row.excluded == 4


# -- multiple comparisons -------------------------------------------------------------
def test_adjust_known_example_and_statsmodels():
    t = pd.DataFrame({"p": [0.01, 0.04, 0.03]})
    holm = inf.adjust(t, "holm")
    assert holm.p_adj.tolist() == pytest.approx([0.03, 0.06, 0.06], abs=1e-12)
    assert holm.significant_adj.tolist() == [True, False, False]
    assert "p_adj" not in t.columns  # input untouched
    bh = inf.adjust(t, "fdr_bh")
    assert bh.p_adj.tolist() == pytest.approx([0.03, 0.04, 0.04], abs=1e-12)
    none = inf.adjust(t, "none")
    assert none.p_adj.tolist() == t.p.tolist() and none.adjust.iloc[0] == "none"
    rng = np.random.default_rng(5)
    p = rng.uniform(0, 0.2, 40) ** 2
    big = pd.DataFrame({"p": p})
    for m in ("holm", "fdr_bh"):
        out = inf.adjust(big, m)
        rej, ref, _, _ = multipletests(p, alpha=0.05, method=m)
        assert np.allclose(out.p_adj, ref, atol=TOL, rtol=0)
        assert (out.significant_adj.to_numpy() == rej).all()
        o = np.argsort(p)
        assert np.all(np.diff(out.p_adj.to_numpy()[o]) >= -1e-15)  # monotone in p
        assert np.all(out.p_adj >= big.p - 1e-15)


def test_adjust_skips_nan_rows_and_rejects_unknown():
    t = pd.DataFrame({"p": [0.01, np.nan, 0.04, 0.03]})
    out = inf.adjust(t, "holm")
    assert np.isnan(out.p_adj.iloc[1]) and not out.significant_adj.iloc[1]
    assert out.p_adj.dropna().tolist() == pytest.approx([0.03, 0.06, 0.06])  # family of 3
    with pytest.raises(ValueError, match="unknown adjustment"):
        inf.adjust(t, "bonferroni-ish")


def test_adjust_on_real_tables():
    df = cohort()
    tab = inf.adjust(inf.anova_table(df), "fdr_bh")
    assert (tab.p_adj >= tab.p - 1e-15).all()
    assert tab.loc[(tab.feature == "onset_amplitude") & (tab.score == "pss"), "significant_adj"].all()
