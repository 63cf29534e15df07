"""Dyad measures (services/smiles/dyad/): alignment, contingency, lagged
synchrony, shared affect, and their behaviour on constructed dyads."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from services.smiles.dyad import (
    EPISODE_COLUMNS,
    DyadError,
    align,
    aligned_from_arrays,
    analyse_dyad,
    contingency,
    draw_shifts,
    onset_indices,
    shared_affect,
    shift_onsets,
    simulate_dyad,
    smile_bumps,
    split_faces,
    summary,
    synchrony,
)

FPS = 30
LAG = 24  # 0.8 s at 30 fps


def sim(**kw):
    return simulate_dyad(180.0, FPS, **kw)


def lag_of(al, **kw):
    s = synchrony(al, shifts=kw.pop("shifts", 200), **kw)
    return s


# --- exactness of the estimators ---------------------------------------------------


def _pearson_pairs(x, y, lag):
    n = len(x)
    t = np.arange(max(0, -lag), min(n, n - lag))
    a, b = x[t], y[t + lag]
    ok = np.isfinite(a) & np.isfinite(b)
    return np.corrcoef(a[ok], b[ok])[0, 1], int(ok.sum())


def test_lagged_r_is_exact_masked_pearson():
    rng = np.random.default_rng(3)
    n = 900
    x = np.convolve(rng.normal(size=n + 20), np.ones(21) / 21, "valid")
    y = np.roll(x, 7) + 0.05 * rng.normal(size=n)
    x[rng.random(n) < 0.15] = np.nan
    y[200:420] = np.nan
    al = aligned_from_arrays(x, y, rate=30)
    s = synchrony(al, window_s=4.0, step_s=1.0, max_lag_s=0.5, shifts=50)
    assert list(s["lags"]) == list(range(-15, 16))
    for j, lag in enumerate(s["lags"]):
        r, npairs = _pearson_pairs(x, y, lag)
        assert s["r"][j] == pytest.approx(r, abs=1e-9)
        assert s["n_pairs"][j] == npairs
    assert s["peak_lag_frames"] == 7 and s["peak_lag_s"] == pytest.approx(7 / 30)
    # windowed TLCC: parent window fixed, infant slid by the lag
    win = 120
    for w in (0, 5, 17):
        a = int(round(s["window_start_s"][w] * 30))
        for j in (0, 10, 22, 30):
            lag = int(s["lags"][j])
            t = np.arange(a, a + win)
            t = t[(t + lag >= 0) & (t + lag < n)]
            xa, yb = x[t], y[t + lag]
            ok = np.isfinite(xa) & np.isfinite(yb)
            if ok.sum() < win / 2:
                assert np.isnan(s["tlcc"][w, j])
            else:
                assert s["tlcc"][w, j] == pytest.approx(np.corrcoef(xa[ok], yb[ok])[0, 1], abs=1e-8)
    # windows inside the infant's gap have too few pairs
    gap_w = np.flatnonzero((s["window_start_s"] >= 200 / 30) & (s["window_start_s"] + 4 <= 420 / 30))
    assert len(gap_w) and np.all(np.isnan(s["tlcc"][gap_w, 15]))
    assert s["tlcc"].shape == (len(s["window_start_s"]), 31)


def test_contingency_counts_responses_in_open_closed_window():
    n = 3000
    al = aligned_from_arrays(np.ones(n), np.ones(n), rate=30)
    # frames: parent 100, 400, 700, 1000; infant 130, 700, 1060 (= exactly 2 s after 1000)
    par = np.array([100, 400, 700, 1000]) / 30
    inf = np.array([130, 700, 1060]) / 30
    c = contingency(al, par, inf, window_s=2.0, shifts=300, seed=1)
    assert c["parent_to_infant"]["observed"] == 0.5  # 100->130 and 1000->1060; 700 is not (0, W]
    assert c["parent_to_infant"]["n_responded"] == 2
    assert c["infant_to_parent"]["observed"] == 0.0
    assert c["n_onsets_parent"] == 4 and c["n_onsets_infant"] == 3
    for d in ("parent_to_infant", "infant_to_parent"):
        null = c[d]["null"]
        assert len(null) == 300 and np.all((null >= 0) & (null <= 1))
        assert c[d]["p"] == pytest.approx((1 + np.sum(null >= c[d]["observed"])) / 301)
        assert c[d]["null_mean"] == pytest.approx(null.mean())
    assert c["infant_to_parent"]["p"] == 1.0


def test_shifts_exclude_small_and_stay_on_joint_time():
    rng = np.random.default_rng(0)
    s = draw_shifts(1000, 120, 5000, rng)
    assert s.min() >= 120 and s.max() <= 880
    assert s.min() < 130 and s.max() > 870  # uniform over the whole allowed range
    with pytest.raises(DyadError, match="too short"):
        draw_shifts(100, 60, 10, rng)
    joint = np.ones(500, bool)
    joint[100:200] = False
    joint[350:360] = False
    idx = np.array([10, 99, 200, 370, 499])
    out = shift_onsets(joint, idx, draw_shifts(int(joint.sum()), 30, 400, rng))
    assert out.shape == (400, 5) and joint[out].all()
    # relative order of the onsets on the compressed timeline is preserved (circularly)
    J = np.flatnonzero(joint)
    q = np.searchsorted(J, out)
    assert np.all(np.diff(np.sort((q - q[:, :1]) % len(J), axis=1), axis=1) > 0)


# --- constructed dyads ----------------------------------------------------------


@pytest.mark.parametrize("follower,sign", [("infant", +1), ("parent", -1)])
def test_follower_gives_lag_sign_and_contingency(follower, sign):
    d = sim(lag_s=0.8, follower=follower, seed=11)
    al = align(d.parent_df, d.infant_df)
    assert al.rate == 30 and al.n == 5401 and al.n_joint == 5401
    s = synchrony(al)  # real default: 1000 surrogates
    assert abs(s["peak_lag_frames"] - sign * LAG) <= 1
    assert np.sign(s["peak_lag_s"]) == sign
    assert s["significant"] and s["p"] < 0.01 and s["n_surrogates"] == 1000
    assert s["peak_r"] > s["threshold"] > 0
    c = contingency(al, d.parent_onsets_s, d.infant_onsets_s, window_s=2.0)
    answer, other = (
        ("parent_to_infant", "infant_to_parent")
        if follower == "infant"
        else ("infant_to_parent", "parent_to_infant")
    )
    assert c[answer]["p"] < 0.05 and c[answer]["observed"] > 0.9
    assert c[answer]["observed"] > c[answer]["null_mean"] + 3 * c[answer]["null_sd"]
    assert c[other]["p"] > 0.5  # onsets >= 3 s apart: nothing answers back
    assert c["shifts"] == 1000 and len(c[answer]["null"]) == 1000


def test_independent_dyads_reject_near_alpha():
    hits_c = hits_cr = hits_s = 0
    n = 100
    for seed in range(n):
        d = sim(lag_s=None, seed=1000 + seed)
        al = align(d.parent_df, d.infant_df)
        c = contingency(al, d.parent_onsets_s, d.infant_onsets_s, shifts=200, seed=seed)
        s = synchrony(al, shifts=200, seed=seed, step_s=2.0)
        hits_c += c["parent_to_infant"]["p"] < 0.05
        hits_cr += c["infant_to_parent"]["p"] < 0.05
        hits_s += s["significant"]
    for hits in (hits_c, hits_cr, hits_s):
        assert 0.0 <= hits / n <= 0.12, (hits_c, hits_cr, hits_s)


def test_vfr_timestamps_interpolate_and_recover_lag():
    rng = np.random.default_rng(5)
    n = 2000
    t = np.sort(np.arange(n) / FPS + rng.uniform(-0.2, 0.2, n) / FPS)
    t[0] = 0.0

    def f(x):
        return 2.0 + np.sin(2 * np.pi * x / 3.0)

    df = pd.DataFrame(
        {
            "frame": np.arange(n),
            "face_id": 0,
            "timestamp": t,
            "confidence": 0.95,
            "success": 1,
            "AU12_r": f(t),
        }
    )
    al = align(df, df.assign(AU12_r=f(t - 0.5)))
    assert al.rate == 30 and al.valid_parent.all()
    assert np.allclose(np.diff(al.t), 1 / 30)
    assert np.max(np.abs(al.au12_parent - f(al.t))) < 2e-3  # linear interp on the true clock
    assert np.max(np.abs(al.au12_infant - f(al.t - 0.5))) < 2e-3
    # a frame-count reading of the same data would be off by the jitter
    assert np.max(np.abs(df["AU12_r"].to_numpy()[: al.n] - f(al.t))) > 0.01
    # a dropped frame leaves a hole (neighbours 2 steps apart), not an interpolation
    holed = df.drop(index=1000)
    al2 = align(holed, holed)
    k = np.flatnonzero(~al2.valid_parent)
    assert 1 <= len(k) <= 2 and np.all(np.abs(al2.t[k] - t[1000]) < 1 / FPS)
    d = sim(lag_s=0.8, jitter=0.2, seed=4)
    s = synchrony(align(d.parent_df, d.infant_df), shifts=200)
    assert abs(s["peak_lag_frames"] - LAG) <= 1 and s["significant"]


def test_infant_missing_in_blocks_uses_joint_frames_only():
    d = sim(lag_s=0.8, seed=21)
    inf = d.infant_df.copy()
    ts = inf["timestamp"].to_numpy()
    blocks = [(10, 28), (50, 68), (100, 118), (140, 158)]  # 72 s of 180: 40%
    gone = np.zeros(len(inf), bool)
    for a, b in blocks:
        gone |= (ts >= a) & (ts < b)
    inf.loc[gone, "success"] = 0
    al = align(d.parent_df, inf)
    in_block = np.zeros(al.n, bool)
    for a, b in blocks:
        in_block |= (al.t >= a) & (al.t < b)
    assert not al.joint[in_block].any() and al.joint[~in_block].all()
    assert al.n_joint == int((~in_block).sum())
    assert 0.58 < al.n_joint / al.n < 0.62

    def outside(on):
        return int(sum(not any(a <= x < b for a, b in blocks) for x in on))

    c = contingency(al, d.parent_onsets_s, d.infant_onsets_s)
    assert c["n_onsets_parent"] == outside(d.parent_onsets_s) < len(d.parent_onsets_s)
    assert c["n_onsets_infant"] == outside(d.infant_onsets_s)
    assert c["n_joint_frames"] == al.n_joint
    assert c["parent_to_infant"]["p"] < 0.05
    s = synchrony(al, shifts=300)
    assert abs(s["peak_lag_frames"] - LAG) <= 1 and s["significant"]
    lag0 = int(np.flatnonzero(s["lags"] == 0)[0])
    assert s["n_pairs"][lag0] == al.n_joint
    a = shared_affect(al)
    assert a["n_joint_frames"] == al.n_joint
    assert all(not any(x <= e.start_s and e.end_s < y for x, y in blocks) for e in a["episodes"].itertuples())
    row = summary(al, d.parent_onsets_s, d.infant_onsets_s, shifts=200)
    assert row["n_joint_frames"] == al.n_joint and row["n_grid_frames"] == al.n
    assert row["n_valid_infant"] == al.n_joint and row["n_valid_parent"] == al.n
    assert row["parent_onsets_dropped"] == len(d.parent_onsets_s) - c["n_onsets_parent"] > 0


def test_no_joint_time_raises_with_counts():
    d = sim(lag_s=0.8, seed=2)
    par, inf = d.parent_df.copy(), d.infant_df.copy()
    par.loc[par["timestamp"] >= 90, "success"] = 0
    inf.loc[inf["timestamp"] < 90, "confidence"] = 0.5
    with pytest.raises(DyadError) as e:
        align(par, inf)
    msg = str(e.value)
    assert "parent valid in 2700 frames, infant in 2701, jointly in 0" in msg
    assert "need at least 60" in msg
    assert isinstance(e.value, ValueError)
    # a per-person min_confidence brings the infant's frames back
    al = align(par, inf, infant_min_confidence=0.4)
    assert al.n_joint == 2700 and al.infant_min_confidence == 0.4
    # too little (1 s) of joint time also fails, with the counts
    inf.loc[(inf["timestamp"] >= 89) & (inf["timestamp"] < 90), "confidence"] = 0.9
    with pytest.raises(
        DyadError,
        match=r"jointly in 30 \(of 5401 grid frames at 30 Hz\); "
        r"need at least 60 \(2 s\)",
    ):
        align(par, inf)
    with pytest.raises(DyadError, match="do not overlap"):
        align(d.parent_df, d.infant_df, offset_s=500.0)


def test_two_videos_with_offset():
    d = sim(lag_s=0.8, infant_offset_s=5.0, seed=8)
    assert d.infant_df["timestamp"].iloc[0] == 0.0  # infant's own clock
    al = align(d.parent_df, d.infant_df, offset_s=5.0)
    assert al.t[0] == pytest.approx(5.0) and al.n == 5251
    s = synchrony(al, shifts=300)
    assert abs(s["peak_lag_frames"] - LAG) <= 1 and s["significant"]
    c = contingency(al, d.parent_onsets_s, d.infant_onsets_s)  # infant onsets: own clock
    assert c["parent_to_infant"]["p"] < 0.05 and c["parent_to_infant"]["observed"] > 0.9
    # the offset is what makes it work: without it the lag is lost
    wrong = synchrony(align(d.parent_df, d.infant_df, offset_s=0.0), shifts=100)
    assert wrong["peak_r"] < 0.5 and abs(wrong["peak_lag_frames"] - LAG) > 3
    # onset mapping adds the offset to infant times only
    assert onset_indices(al, [10.0], "infant")[0] == 300  # parent time 15 s
    assert onset_indices(al, [10.0], "parent")[0] == 150


def test_lower_fps_infant_video_is_interpolated():
    d = sim(lag_s=0.8, infant_fps=15, seed=9)
    al = align(d.parent_df, d.infant_df)
    assert al.rate == 30 and al.valid_infant.all()
    s = synchrony(al, shifts=200)
    assert abs(s["peak_lag_frames"] - LAG) <= 1


def test_shared_affect_fraction_and_episodes():
    n = 3000
    p = np.zeros(n)
    i = np.zeros(n)
    p[:1500], i[750:2250] = 2.0, 3.0
    a = shared_affect(aligned_from_arrays(p, i, rate=30))
    assert a["p_parent"] == 0.5 and a["p_infant"] == 0.5
    assert a["fraction"] == 0.25 and a["expected"] == 0.25 and a["ratio"] == 1.0
    assert a["n_episodes"] == 0  # flat tops: nobody builds to a peak
    a = shared_affect(aligned_from_arrays(p, i, rate=30), infant_threshold=3.5)
    assert a["fraction"] == 0.0 and a["p_infant"] == 0.0 and np.isnan(a["ratio"])
    # together: peaks within 1 s -> episodes; 1.6 s apart -> none
    near = shared_affect(align(*_dfs(sim(lag_s=0.5, seed=31))))
    far = shared_affect(align(*_dfs(sim(lag_s=1.6, seed=31))))
    assert near["n_episodes"] >= 10 and far["n_episodes"] == 0
    ep = near["episodes"]
    assert list(ep.columns) == EPISODE_COLUMNS
    assert np.all(np.abs(ep["peak_gap_s"]) <= 1.0 + 1e-9)
    assert abs(ep["peak_gap_s"].median() - 0.5) < 0.15  # infant peaks 0.5 s later
    assert np.all((ep["parent_peak_s"] >= ep["start_s"]) & (ep["infant_peak_s"] <= ep["end_s"]))
    assert near["ratio"] > 2 and near["fraction"] > near["expected"]


def _dfs(d):
    return d.parent_df, d.infant_df


def test_summary_row():
    d = sim(lag_s=0.8, seed=12)
    al = align(d.parent_df, d.infant_df, parent_min_confidence=0.9, infant_min_confidence=0.7)
    row = summary(al, d.parent_onsets_s, d.infant_onsets_s, shifts=200, dyad_id="D01")
    need = [
        "dyad_id",
        "n_grid_frames",
        "n_joint_frames",
        "joint_fraction",
        "rate_hz",
        "parent_onsets",
        "infant_onsets",
        "contingency_p2i_observed",
        "contingency_p2i_null_mean",
        "contingency_p2i_p",
        "contingency_i2p_observed",
        "contingency_i2p_null_mean",
        "contingency_i2p_p",
        "peak_lag_s",
        "peak_r",
        "sync_threshold",
        "sync_significant",
        "shared_fraction",
        "shared_expected",
        "shared_ratio",
        "shared_episodes",
        "parent_threshold",
        "infant_threshold",
        "parent_min_confidence",
        "infant_min_confidence",
        "contingency_window_s",
        "max_lag_s",
        "sync_window_s",
        "shifts",
    ]
    assert not [k for k in need if k not in row]
    assert row["dyad_id"] == "D01" and row["shifts"] == 200 and row["rate_hz"] == 30
    assert row["parent_min_confidence"] == 0.9 and row["infant_min_confidence"] == 0.7
    assert row["peak_lag_s"] == pytest.approx(0.8, abs=0.034) and row["sync_significant"]
    assert row["contingency_p2i_p"] < 0.05 < row["contingency_i2p_p"]
    assert row["parent_onsets"] == len(d.parent_onsets_s)
    assert row["shared_ratio"] == pytest.approx(row["shared_fraction"] / row["shared_expected"])
    pd.DataFrame([row])  # one flat row: a cohort table


def _with_landmarks(df):
    """Lip corners spread with AU12 (enough for segment_smiles)."""
    au = df["AU12_r"].to_numpy()
    return df.assign(
        x_34=300.0,
        y_34=250.0,
        x_48=270.0 - 3 * au,
        y_48=275.0 - 2 * au,
        x_54=330.0 + 3 * au,
        y_54=275.0 - 2 * au,
    )


def test_smile_objects_and_end_to_end():
    from services.smiles.segment import segment_smiles

    d = sim(lag_s=0.8, seed=13, noise_sd=0.05)
    par, inf = _with_landmarks(d.parent_df), _with_landmarks(d.infant_df)
    al = align(par, inf)
    smiles = segment_smiles(par)
    assert len(smiles) >= 0.8 * len(d.parent_onsets_s)
    idx = onset_indices(al, smiles)
    assert np.array_equal(idx, onset_indices(al, [s.start_s for s in smiles]))
    out = analyse_dyad(par, inf, shifts=200)
    row = out["summary"]
    assert row["contingency_p2i_p"] < 0.05 and abs(row["peak_lag_frames"] - LAG) <= 1
    assert row["parent_onsets"] == len(out["smiles"]["parent"]) > 5
    # one video, two faces
    both = pd.concat([par, inf], ignore_index=True)
    p2, i2 = split_faces(both)
    assert (p2["role"] == "adult").all() and (i2["role"] == "infant").all()


def test_bad_input_is_explained():
    d = sim(lag_s=0.8, seed=1)
    both = pd.concat([d.parent_df, d.infant_df], ignore_index=True)
    with pytest.raises(ValueError, match=re.escape("several faces")):
        align(both, d.infant_df)
    with pytest.raises(ValueError, match="AU12_r"):
        align(d.parent_df.drop(columns="AU12_r"), d.infant_df)
    assert smile_bumps(np.array([0.0, 1.0, 2.0]), [0.0], [2.0], [2.0])[1] == pytest.approx(2.0)
