"""The cohort simulator (services/stats/simulate.py): valid tables, realistic
scores and counts, and planted effects that come back out at the planted size."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from services.stats import simulate as S
from services.stats.scores import FEATURES, KEYS, SCALES, SCORE_COLUMNS, validate_scores, validate_smiles

# -- helpers ----------------------------------------------------------------------


def pooled_d(smiles: pd.DataFrame, f: str) -> tuple[float, int, int]:
    """Cohen's d, 12-month minus 6-month, plain pooled SD; (d, n6, n12)."""
    a = smiles.loc[smiles["visit_month"] == 6, f].to_numpy()
    b = smiles.loc[smiles["visit_month"] == 12, f].to_numpy()
    n1, n2 = len(a), len(b)
    sp = math.sqrt(((n1 - 1) * a.var(ddof=1) + (n2 - 1) * b.var(ddof=1)) / (n1 + n2 - 2))
    return (b.mean() - a.mean()) / sp, n1, n2


def d_z(cohort: S.Cohort, f: str) -> float:
    """(estimated d - planted d) in units of expected_d_se x the recorded
    clustering inflation."""
    d, n6, n12 = pooled_d(cohort.smiles, f)
    ve = cohort.truth["visit_effect"]
    planted = ve["d"][f]
    return (d - planted) / (S.expected_d_se(n6, n12, planted) * ve["se_inflation"][f])


def with_scores(cohort: S.Cohort) -> pd.DataFrame:
    return cohort.smiles.merge(cohort.scores, on=KEYS, how="left")


@pytest.fixture(scope="module")
def big() -> S.Cohort:
    return S.simulate(3000, 11)


@pytest.fixture(scope="module")
def mid() -> S.Cohort:
    return S.simulate(2000, 5)


# -- determinism, tables, files -------------------------------------------------------


def test_same_seed_same_cohort_other_seed_other_cohort():
    a, b, c = S.simulate(94, 7), S.simulate(94, 7), S.simulate(94, 8)
    pd.testing.assert_frame_equal(a.scores, b.scores)
    pd.testing.assert_frame_equal(a.smiles, b.smiles)
    assert json.dumps(a.truth, sort_keys=True) == json.dumps(b.truth, sort_keys=True)
    assert not a.smiles["onset_amplitude"].equals(c.smiles["onset_amplitude"])
    assert not a.scores["phq9"].equals(c.scores["phq9"])
    assert a.truth["seed"] == 7 and c.truth["seed"] == 8


def test_missingness_does_not_change_the_rest():
    full, holes = S.simulate(300, 3), S.simulate(300, 3, missing_rate=0.2)
    pd.testing.assert_frame_equal(full.smiles, holes.smiles)
    kept = holes.scores[SCORE_COLUMNS].notna().to_numpy()
    assert np.array_equal(
        full.scores[SCORE_COLUMNS].to_numpy()[kept], holes.scores[SCORE_COLUMNS].to_numpy()[kept]
    )
    share = 1 - kept.mean()
    assert abs(share - 0.2) < 0.03
    assert sum(holes.truth["counts"]["missing_scores"].values()) == (~kept).sum()


def test_tables_pass_the_validators_with_the_right_columns_and_types(tmp_path):
    c = S.simulate(200, 1, missing_rate=0.1)
    assert list(c.scores.columns) == KEYS + SCORE_COLUMNS
    assert list(c.smiles.columns) == KEYS + ["smile_id"] + list(FEATURES)
    scores, notes = validate_scores(c.scores)
    assert len(notes) == len(SCORE_COLUMNS) and all("missing" in n for n in notes)
    smiles = validate_smiles(c.smiles)
    assert len(smiles) == len(c.smiles) == c.truth["counts"]["smiles_total"]
    # every participant has exactly the two visits
    assert (c.scores.groupby("participant_id")["visit_month"].apply(sorted).map(tuple) == (6, 12)).all()
    for col, sc in SCALES.items():
        v = c.scores[col].dropna().astype(float)
        assert (v == np.round(v)).all(), col
        assert v.between(sc.lo, sc.hi).all(), col
    # smile_id runs 1..n within each session
    ids = c.smiles.groupby(KEYS)["smile_id"].agg(["min", "max", "count"])
    assert (ids["min"] == 1).all() and (ids["max"] == ids["count"]).all()
    feats = c.smiles[list(FEATURES)].to_numpy()
    assert np.isfinite(feats).all() and (feats > 0).all()

    paths = S.write(c, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"scores.csv", "smiles.csv", "truth.json"}
    scores2, _ = validate_scores(pd.read_csv(paths["scores"]))
    smiles2 = validate_smiles(pd.read_csv(paths["smiles"]))
    assert scores2[SCORE_COLUMNS].isna().sum().sum() == c.scores[SCORE_COLUMNS].isna().sum().sum()
    np.testing.assert_allclose(
        smiles2[list(FEATURES)].to_numpy(), smiles[list(FEATURES)].to_numpy(), rtol=1e-12
    )
    assert json.loads(paths["truth"].read_text()) == c.truth
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_truth_is_strict_json_and_records_the_plan():
    c = S.simulate(94, 0)
    t = json.loads(json.dumps(c.truth, allow_nan=False))
    assert t["participants"] == 94 and t["counts"]["sessions"] == 188
    assert t["visit_effect"]["d"] == S.TABLE_III_D
    assert t["scores"]["correlation_target"] == S.SCORE_CORRELATION.tolist()
    assert t["score_effect"]["r_max"] == {f: 0.35 for f in S.FIG2_FEATURES}
    assert set(t["anova"]) == {"phq9", "aces", "pss"}


def test_total_duration_is_exactly_the_sum_of_the_phases(big):
    sm = big.smiles
    parts = sm["onset_duration_s"] + sm["apex_duration_s"] + sm["offset_duration_s"]
    assert np.array_equal(sm["total_duration_s"].to_numpy(), parts.to_numpy())


def test_feature_values_are_on_the_smiles_service_scale(big):
    q = big.smiles[list(FEATURES)].quantile([0.05, 0.5, 0.95])
    for f in ("onset_amplitude", "offset_amplitude"):
        assert 0.03 < q.loc[0.05, f] and q.loc[0.95, f] < 0.6, f
    for f in ("max_onset_speed", "max_offset_speed"):
        assert 0.1 < q.loc[0.05, f] and q.loc[0.95, f] < 4, f
    for f in ("onset_duration_s", "apex_duration_s", "offset_duration_s"):
        assert 0.1 < q.loc[0.05, f] and q.loc[0.95, f] < 4, f
    # skewed: mean above median
    assert (big.smiles[list(FEATURES)].mean() > q.loc[0.5]).all()


# -- scores -------------------------------------------------------------------------


def test_score_marginals_match_table_one(big):
    for col, sc in SCALES.items():
        m = big.truth["scores"]["marginals"][col]
        assert m["mean"] == pytest.approx(sc.mean, abs=1e-6)
        assert m["sd"] == pytest.approx(sc.sd, abs=1e-6)
        v = big.scores[col].astype(float)
        assert v.mean() == pytest.approx(sc.mean, abs=0.1 * sc.sd), col
        assert v.std() == pytest.approx(sc.sd, rel=0.08), col
    phq = big.scores["phq9"].astype(float)
    assert (phq == 0).mean() > 0.2  # zero-inflated
    assert stats.skew(phq) > 1  # right-skewed
    assert stats.skew(big.scores["social_support"].astype(float)) < -1  # ceiling


def test_scale_correlations_match_the_planted_matrix(mid):
    target = S.SCORE_CORRELATION
    implied = np.array(mid.truth["scores"]["correlation_implied"])
    np.testing.assert_allclose(implied, target, atol=1e-6)
    sc = mid.scores
    r = np.mean(
        [sc[sc["visit_month"] == v][SCORE_COLUMNS].astype(float).corr().to_numpy() for v in (6, 12)], axis=0
    )
    dev = np.abs(r - target)[np.triu_indices(len(SCORE_COLUMNS), 1)]
    assert dev.max() < 0.1, dev
    # tighter on average: an uninverted copula (latent = target) would be off by ~0.05
    assert dev.mean() < 0.035, dev
    assert r[0, 2] > 0.5 and r[0, 4] < -0.3


def test_scores_are_stable_between_visits(mid):
    wide = mid.scores.pivot(index="participant_id", columns="visit_month")
    for col in SCORE_COLUMNS:
        a, b = wide[(col, 6)].astype(float), wide[(col, 12)].astype(float)
        r = np.corrcoef(a, b)[0, 1]
        lo = 0.74 if col != "pearls" else 0.7
        assert lo < r < 0.9, (col, r)
    aces = (wide[("aces", 6)] - wide[("aces", 12)]).astype(float).abs().mean()
    assert aces == pytest.approx(S.ACES_MEAN_ABS_CHANGE, abs=0.08)
    phq = np.corrcoef(wide[("phq9", 6)].astype(float), wide[("phq9", 12)].astype(float))[0, 1]
    assert phq == pytest.approx(0.8, abs=0.04)


# -- smile counts ------------------------------------------------------------------------


def test_smile_counts_have_mean_and_sd_about_five(big):
    per = big.smiles.groupby(KEYS).size()
    sessions = big.scores[KEYS].drop_duplicates()
    n = sessions.merge(per.rename("n").reset_index(), on=KEYS, how="left")["n"].fillna(0)
    assert len(n) == 6000
    assert n.mean() == pytest.approx(5, abs=0.3)
    assert n.std() == pytest.approx(5, abs=0.4)
    assert 0.08 < (n == 0).mean() < 0.2
    assert big.truth["counts"]["sessions_without_smiles"] == int((n == 0).sum())


# -- planted visit differences (Table III) -------------------------------------------------


def test_expected_d_se_formula():
    assert S.expected_d_se(50, 50, 0.0) == pytest.approx(0.2)
    assert S.expected_d_se(50, 50, 0.5) == pytest.approx(math.sqrt(0.04 + 0.25 / 200))
    assert S.expected_d_se(100, 300, 0.2) < S.expected_d_se(50, 150, 0.2)
    with pytest.raises(ValueError):
        S.expected_d_se(1, 10, 0.1)


def test_planted_total_d_is_solved_exactly():
    ve = S.simulate(10, 0).truth["visit_effect"]
    assert ve["total_d_implied"] == pytest.approx(0.22, abs=1e-9)
    assert all(1 / m**2 < 1 for m in ve["multiplier_12mo"].values())  # var6/var12 < 1
    # without a target the total's d is implied, not planted
    e = S.Effects(visit_d={k: v for k, v in S.TABLE_III_D.items() if k != "total_duration_s"})
    ve2 = S.simulate(10, 0, e).truth["visit_effect"]
    assert not ve2["d_planted"]["total_duration_s"]
    assert ve2["d"]["total_duration_s"] == ve2["total_d_implied"]
    assert ve2["d"]["total_duration_s"] != pytest.approx(0.22, abs=1e-4)
    assert 0.1 < ve2["d"]["total_duration_s"] < 0.3


def test_table_three_d_recovered_at_large_n(big):
    for f in FEATURES:
        d, n6, n12 = pooled_d(big.smiles, f)
        planted = S.TABLE_III_D[f]
        se = S.expected_d_se(n6, n12, planted)
        assert abs(d - planted) < 3 * se * big.truth["visit_effect"]["se_inflation"][f], (f, d, se)
    # the big effects are unmistakable, the near-nulls small
    assert pooled_d(big.smiles, "max_onset_speed")[0] > 0.4
    assert abs(pooled_d(big.smiles, "onset_duration_s")[0]) < 0.12


@pytest.mark.parametrize("participants", [94, 300])
def test_table_three_d_recovered_over_seeds(participants):
    z = {f: [] for f in FEATURES}
    for seed in range(20):
        c = S.simulate(participants, 100 + seed)
        for f in FEATURES:
            z[f].append(d_z(c, f))
    for f, zs in z.items():
        zs = np.array(zs)
        assert (np.abs(zs) < 3).mean() >= 0.9, (f, zs.round(2))
        assert abs(zs.mean()) < 1.0, (f, zs.mean())  # unbiased: 4.5 SE of the mean
    # the planted ordering survives at N=300: onset speed/amplitude > offset ones > durations
    if participants == 300:
        c = S.simulate(300, 1)
        assert pooled_d(c.smiles, "max_onset_speed")[0] > pooled_d(c.smiles, "onset_duration_s")[0]


def test_null_cohort_welch_false_positive_rate():
    hits = []
    for seed in range(50):
        c = S.simulate(94, 500 + seed, S.Effects.null())
        sm = c.smiles
        p = stats.ttest_ind(
            sm.loc[sm["visit_month"] == 12, "onset_amplitude"],
            sm.loc[sm["visit_month"] == 6, "onset_amplitude"],
            equal_var=False,
        ).pvalue
        hits.append(p < 0.05)
    assert np.mean(hits) <= 0.12, np.mean(hits)
    t = c.truth
    assert set(t["visit_effect"]["d"].values()) == {0.0}
    assert set(t["visit_effect"]["multiplier_12mo"].values()) == {1.0}
    assert t["score_effect"]["r_max"] == {}
    assert all(
        v["eta2"] == 0 for sc in t["anova"].values() for per in sc["features"].values() for v in per.values()
    )


def test_planted_cohort_welch_detects_onset_amplitude():
    sig = 0
    for seed in range(20):
        sm = S.simulate(94, 500 + seed).smiles
        p = stats.ttest_ind(
            sm.loc[sm["visit_month"] == 12, "onset_amplitude"],
            sm.loc[sm["visit_month"] == 6, "onset_amplitude"],
            equal_var=False,
        ).pvalue
        sig += p < 0.05
    assert sig >= 16  # d = 0.49 with ~470 smiles per visit: power ~ 0.99


# -- planted feature-score correlations (Fig. 2) and categories (Table IV) ---------------------


def test_feature_score_correlation_grows_with_smile_index(mid):
    sm = with_scores(mid)
    planted = mid.truth["score_effect"]["r_k"]["onset_amplitude"]
    r = {}
    for f in ("onset_amplitude", "onset_duration_s", "offset_duration_s", "max_onset_speed"):
        r[f] = []
        for k in range(1, 6):
            x = sm[sm["smile_id"] == k]
            r[f].append(np.corrcoef(x[f], x["phq9"].astype(float))[0, 1])
    assert planted == pytest.approx([0.07, 0.14, 0.21, 0.28, 0.35])
    for f in ("onset_amplitude", "onset_duration_s", "offset_duration_s"):
        assert r[f][4] - r[f][0] > 0.15, (f, r[f])
        assert np.allclose(r[f], planted, atol=0.1), (f, r[f])
    assert np.abs(r["max_onset_speed"]).max() < 0.1  # not loaded
    # the total inherits it; Social Support goes the other way (through the copula)
    implied = mid.truth["score_effect"]["implied_r_k"]
    assert implied["phq9"]["total_duration_s"]["6"][4] > 0.2
    assert implied["social_support"]["onset_amplitude"][4] < -0.1
    x = sm[sm["smile_id"] == 5]
    assert np.corrcoef(x["total_duration_s"], x["phq9"].astype(float))[0, 1] > 0.12


def test_score_category_effect_for_anova(big):
    anova = big.truth["anova"]["phq9"]
    eta = anova["features"]["onset_amplitude"]["6"]["eta2"]
    assert 0.02 < eta < 0.1
    assert anova["features"]["max_onset_speed"]["6"]["eta2"] == 0
    means = anova["features"]["onset_amplitude"]["6"]["category_means"]
    assert means == sorted(means)  # more severe, larger
    sm = with_scores(big)
    x = sm[sm["visit_month"] == 6].dropna(subset=["phq9"])
    cat = SCALES["phq9"].category(x["phq9"].astype(float))
    groups = [g["onset_amplitude"].to_numpy() for _, g in x.groupby(cat)]
    f, p = stats.f_oneway(*groups)
    grand = x["onset_amplitude"].mean()
    ss_b = sum(len(g) * (g.mean() - grand) ** 2 for g in groups)
    est = ss_b / ((x["onset_amplitude"] - grand) ** 2).sum()
    assert p < 1e-6
    assert est == pytest.approx(eta, abs=0.015)


def test_strong_preset_makes_windowed_means_predict_phq9():
    def r2(effects):
        c = S.simulate(600, 3, effects)
        w = 4
        sm = c.smiles[c.smiles["smile_id"] <= w]
        g = sm.groupby(KEYS)
        x = np.log(g[list(FEATURES)].mean()[g.size() >= w])
        d = x.join(c.scores.set_index(KEYS)["phq9"].astype(float))
        n = len(d)
        idx = np.random.default_rng(0).permutation(n)
        tr, te = idx[: n // 2], idx[n // 2 :]
        a = np.column_stack([np.ones(n), d[list(FEATURES)].to_numpy()])
        y = d["phq9"].to_numpy()
        beta = np.linalg.lstsq(a[tr], y[tr], rcond=None)[0]
        return 1 - np.mean((y[te] - a[te] @ beta) ** 2) / np.var(y[te])

    strong, null = r2(S.Effects.strong()), r2(S.Effects.null())
    assert strong > 0.5, strong
    assert null < 0.05, null


# -- input checking ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"participants": 0}, "participants"),
        ({"missing_rate": 1.0}, "missing_rate"),
        ({"effects": S.Effects(visit_d={"smile_width": 0.3})}, "unknown feature"),
        ({"effects": S.Effects(score_r_max={"total_duration_s": 0.3})}, "sum of the three"),
        ({"effects": S.Effects(score_r_max={"onset_amplitude": 0.99})}, "not reachable"),
        ({"effects": S.Effects(ramp_k=0)}, "ramp_k"),
    ],
)
def test_bad_arguments_are_refused(kw, msg):
    args = {"participants": 10, "seed": 0, **kw}
    with pytest.raises(ValueError, match=msg):
        S.simulate(**args)


def test_command_line_writes_a_cohort(tmp_path, capsys):
    assert S.main([str(tmp_path), "--participants", "12", "--effects", "null"]) == 0
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["effects"]["name"] == "null" and truth["participants"] == 12
    assert S.main([str(tmp_path), "--participants", "0"]) == 2
    assert "participants" in capsys.readouterr().err
