"""The statistics against the simulator: independent references on simulated
cohorts, planted effects recovered, planted nulls not found, the MLP learning
only where something is there to learn."""

from __future__ import annotations

import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import stats

from services.stats import inference, mlp, scores, simulate


def cohort(n: int, seed: int, effects=None):
    c = simulate.simulate(n, seed, effects)
    smiles = scores.validate_smiles(c.smiles)
    sc, _ = scores.validate_scores(c.scores)
    joined, _ = scores.join(smiles, sc)
    return smiles, joined, c.truth


def test_tables_equal_independent_references_on_a_simulated_cohort():
    smiles, joined, _ = cohort(94, 21)
    t3 = inference.welch_table(smiles).set_index("feature")
    for f in scores.FEATURES:
        a = smiles.loc[smiles.visit_month == 12, f].dropna()
        b = smiles.loc[smiles.visit_month == 6, f].dropna()
        ref = stats.ttest_ind(a, b, equal_var=False)
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
        assert t3.loc[f, "t"] == pytest.approx(ref.statistic, abs=1e-9)
        assert t3.loc[f, "p"] == pytest.approx(ref.pvalue, abs=1e-9)
        assert t3.loc[f, "df"] == pytest.approx(df, abs=1e-9)
    t4 = inference.anova_table(joined)
    checked = 0
    for _, row in t4.dropna(subset=["F"]).iterrows():
        sub = joined[joined.visit_month == row.visit_month].copy()
        sub["cat"] = scores.SCALES[row.score].category(sub[row.score])
        sub = sub.dropna(subset=["cat", row.feature])
        sizes = sub["cat"].value_counts()
        sub = sub[sub["cat"].isin(sizes[sizes >= 2].index)]
        fit = smf.ols(f"{row.feature} ~ C(cat)", data=sub).fit()
        aov = sm.stats.anova_lm(fit, typ=2)
        ss_b, ss_r = aov.loc["C(cat)", "sum_sq"], aov.loc["Residual", "sum_sq"]
        assert row.F == pytest.approx(aov.loc["C(cat)", "F"], abs=1e-9)
        assert row.p == pytest.approx(aov.loc["C(cat)", "PR(>F)"], abs=1e-9)
        assert row.partial_eta2 == pytest.approx(ss_b / (ss_b + ss_r), abs=1e-9)
        assert (row.df1, row.df2) == (aov.loc["C(cat)", "df"], aov.loc["Residual", "df"])
        checked += 1
    assert checked >= 40


@pytest.mark.parametrize("n", [94, 300])
def test_planted_visit_effects_are_recovered_within_three_se(n):
    """Over 10 seeds, each feature's d lies within 3 SE of the planted d (SE from
    simulate.expected_d_se, inflated by the simulator's exact clustering factor)."""
    misses = 0
    for seed in range(10):
        smiles, _, truth = cohort(n, 100 + seed)
        t3 = inference.welch_table(smiles).set_index("feature")
        planted = truth["visit_effect"]["d"]
        infl = truth["visit_effect"]["se_inflation"]
        for f in scores.FEATURES:
            se = simulate.expected_d_se(int(t3.loc[f, "n_6"]), int(t3.loc[f, "n_12"]), planted[f])
            misses += abs(t3.loc[f, "cohens_d"] - planted[f]) > 3 * se * infl[f]
    assert misses <= 2, f"{misses} of 80 estimates outside 3 SE"


def test_planted_null_is_rarely_significant():
    """No visit effect planted: the Welch test is significant in about alpha of 50 seeds."""
    hits = {f: 0 for f in ("onset_amplitude", "max_onset_speed")}
    for seed in range(50):
        smiles, _, _ = cohort(94, 500 + seed, simulate.Effects.null())
        t3 = inference.welch_table(smiles).set_index("feature")
        for f in hits:
            hits[f] += t3.loc[f, "p"] < 0.05
    assert all(h <= 6 for h in hits.values()), hits  # 12 %: alpha 5 % plus clustering


def test_mlp_learns_a_planted_relation_and_not_a_null():
    fast = dict(scores=["phq9"], windows=[2, 3], epochs=(50, 100), seeds=range(2), folds=3, holdout=False)
    _, strong, _ = cohort(94, 7, simulate.Effects.strong())
    _, null, _ = cohort(94, 7, simulate.Effects.null())
    s = mlp.run_grid(strong, **fast).table.set_index("score").loc["phq9"]
    z = mlp.run_grid(null, **fast).table.set_index("score").loc["phq9"]
    assert s["mae"] < 0.8 * s["baseline_mae"], s[["mae", "baseline_mae"]]
    assert z["mae"] > 0.95 * z["baseline_mae"], z[["mae", "baseline_mae"]]
