"""Table II's sliding-window MLP (services/stats/mlp.py).

Logic tests use small grids; one test runs the full default grid at N=94.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import torch

from services.stats import mlp
from services.stats.scores import FEATURES, SCALES, SCORE_COLUMNS, join

FEATS = list(FEATURES)


# -- data ------------------------------------------------------------------------------------
def make_cohort(participants: int, seed: int, kind: str = "noise") -> pd.DataFrame:
    """A joined table (``scores.join``): P participants x visits 6 and 12, smiles per
    session negative binomial with the paper's mean 5.3 / SD 4.7. Every session has a
    latent 8-vector z; its smiles' features are z + N(0, 0.3^2). Scores:
    ``linear`` = an affine function of z (~ the window means) + noise of 10% of its SD;
    ``noise`` = independent of everything."""
    rng = np.random.default_rng(seed)
    r = 5.3**2 / (4.7**2 - 5.3)
    load = {c: rng.normal(size=len(FEATS)) for c in SCALES}
    smiles, scores = [], []
    for i in range(participants):
        pid = f"M{i:03d}"
        for visit in (6, 12):
            z = rng.normal(size=len(FEATS))
            row = {"participant_id": pid, "visit_month": visit}
            for col, sc in SCALES.items():
                mid, spread = (sc.lo + sc.hi) / 2, (sc.hi - sc.lo) / 8
                if kind == "linear":
                    a = load[col] / np.linalg.norm(load[col])
                    v = mid + spread * (z @ a + 0.1 * rng.normal())
                else:
                    v = mid + spread * rng.normal()
                row[col] = float(np.clip(v, sc.lo, sc.hi))
            scores.append(row)
            for k in range(1, rng.negative_binomial(r, r / (r + 5.3)) + 1):
                f = z + 0.3 * rng.normal(size=len(FEATS))
                smiles.append(
                    {"participant_id": pid, "visit_month": visit, "smile_id": k, **dict(zip(FEATS, f))}
                )
    joined, _ = join(pd.DataFrame(smiles), pd.DataFrame(scores))
    return joined


def random_fits(sizes, seed=1, n_test=9) -> list[mlp.Fit]:
    rng = np.random.default_rng(seed)
    fits = []
    for i, n in enumerate(sizes):
        X = rng.normal(size=(n, len(FEATS))) * 3 + 1
        y = 2 * X[:, 0] - X[:, 3] + rng.normal(size=n) + 10
        fits.append(
            mlp.Fit(
                (i, 7, 2, 3), X, y, rng.normal(size=(n_test, len(FEATS))) * 3 + 1, rng.normal(size=n_test)
            )
        )
    return fits


def reference(fit: mlp.Fit, epochs, batch_size=32, lr=1e-3, dtype=torch.float32) -> dict:
    """One fit trained the ordinary way: nn.Sequential + torch.optim.Adam + MSELoss, from
    the same initial weights and the same per-epoch batch orders as the batched trainer."""
    xtr, ytr, xte, ym, ys = mlp._standardise(fit)
    init = mlp.init_params(fit.key)
    where = {name: (shape, off) for name, shape, off in mlp.LAYOUT}
    dims = (len(FEATS), *mlp.HIDDEN, 1)
    layers = []
    for i in range(len(dims) - 1):
        lin = torch.nn.Linear(dims[i], dims[i + 1]).to(dtype)
        (a, b), o = where[f"W{i + 1}"]
        (_, c), ob = where[f"b{i + 1}"]
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(init[o : o + a * b].reshape(a, b).T))
            lin.bias.copy_(torch.from_numpy(init[ob : ob + c]))
        layers += [lin, torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1])  # no ReLU on the output
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    X = torch.from_numpy(xtr).to(dtype)
    Y = torch.from_numpy(ytr).to(dtype)[:, None]
    orders = np.concatenate(list(mlp.batch_orders(fit.key, len(ytr), max(epochs))))
    out = {}
    for e in range(max(epochs)):
        for k in range(0, len(ytr), batch_size):
            idx = torch.from_numpy(orders[e][k : k + batch_size])
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(X[idx]), Y[idx]).backward()
            opt.step()
        if e + 1 in epochs:
            with torch.no_grad():
                out[e + 1] = net(torch.from_numpy(xte).to(dtype))[:, 0].double().numpy() * ys + ym
    return out


SMALL = dict(scores=["phq9"], windows=(1, 2), epochs=(20, 40), seeds=range(2))


@pytest.fixture(scope="module")
def planted() -> pd.DataFrame:
    return make_cohort(60, seed=3, kind="linear")


@pytest.fixture(scope="module")
def noise() -> pd.DataFrame:
    return make_cohort(60, seed=4, kind="noise")


# -- windows ---------------------------------------------------------------------------------
def test_windows_hand_made_two_sessions():
    rows = []
    # session A (p1, month 6): smiles 1..3, given out of order; session B (p2, 12): one smile
    for pid, visit, k, base in [
        ("p1", 6, 3, 30.0),
        ("p1", 6, 1, 10.0),
        ("p2", 12, 1, 100.0),
        ("p1", 6, 2, 20.0),
    ]:
        rows.append(
            {
                "participant_id": pid,
                "visit_month": visit,
                "smile_id": k,
                **{f: base + j for j, f in enumerate(FEATS)},
                "phq9": 7.0 if pid == "p1" else 2.0,
            }
        )
    joined = pd.DataFrame(rows)

    w1, dropped = mlp.window_samples(joined, 1, ["phq9"])
    assert dropped == 0 and len(w1) == 4
    w2, _ = mlp.window_samples(joined, 2, ["phq9"])
    assert len(w2) == 2  # (1,2) and (2,3) of A; B too short
    assert list(w2["first_smile"]) == [1, 2] and list(w2["last_smile"]) == [2, 3]
    assert (w2["participant_id"] == "p1").all() and (w2["phq9"] == 7.0).all()
    for j, f in enumerate(FEATS):
        assert w2[f].tolist() == pytest.approx([15.0 + j, 25.0 + j], abs=1e-12)
    w3, _ = mlp.window_samples(joined, 3, ["phq9"])
    assert len(w3) == 1
    assert w3[FEATS].to_numpy()[0] == pytest.approx(20.0 + np.arange(len(FEATS)), abs=1e-12)
    w4, _ = mlp.window_samples(joined, 4, ["phq9"])
    assert len(w4) == 0

    # a missing feature value drops exactly the windows that contain it
    joined.loc[(joined["smile_id"] == 2) & (joined["participant_id"] == "p1"), "onset_amplitude"] = np.nan
    w2, dropped = mlp.window_samples(joined, 2, ["phq9"])
    assert dropped == 2 and len(w2) == 0
    w1, dropped = mlp.window_samples(joined, 1, ["phq9"])
    assert dropped == 1 and len(w1) == 3


def test_window_counts_match_sessions(noise):
    per_session = noise.groupby(["participant_id", "visit_month"]).size()
    for w in range(1, 6):
        samples, _ = mlp.window_samples(noise, w)
        assert len(samples) == int(np.maximum(per_session - w + 1, 0).sum())


# -- folds -----------------------------------------------------------------------------------
def test_participant_folds_balanced_and_seeded():
    ids = [f"M{i:02d}" for i in range(23)]
    f0 = mlp.participant_folds(ids + ids, 5, seed=0)  # duplicates (two visits) collapse
    assert set(f0) == set(ids)
    sizes = np.bincount(list(f0.values()), minlength=5)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 23
    assert f0 == mlp.participant_folds(list(reversed(ids)), 5, seed=0)
    assert f0 != mlp.participant_folds(ids, 5, seed=1)
    with pytest.raises(ValueError):
        mlp.participant_folds(ids[:3], 5, seed=0)
    ho = mlp.holdout_participants([f"M{i:02d}" for i in range(94)], seed=0)
    assert len(ho) == 19  # the paper's 19 of 94 mothers


def test_grouped_folds_never_split_a_participant(noise, monkeypatch):
    seen = []
    real = mlp.train_fits

    def spy(fits, epochs, **kw):
        seen.extend(fits)
        return real(fits, epochs, **kw)

    monkeypatch.setattr(mlp, "train_fits", spy)
    mlp.run_grid(noise, scores=["phq9", "pss"], windows=(1, 3), epochs=(2,), seeds=range(2))
    participants = set(noise["participant_id"])
    cv = [f for f in seen if f.key[3] != mlp.HOLDOUT % (1 << 32)]
    assert len(cv) == 2 * 2 * 2 * 5
    by_model: dict[tuple, list[set]] = {}
    for f in seen:
        tr, te = set(f.train_groups), set(f.test_groups)
        assert not tr & te, f"participant in both train and test of {f.key}"
        assert len(f.train_groups) == len(f.y_train) and len(f.test_groups) == len(f.y_test)
        if f.key[3] != mlp.HOLDOUT % (1 << 32):
            by_model.setdefault(f.key[:3], []).append(te)
        else:
            assert len(te) <= 12  # ~19/94 of 60 participants
    for tests in by_model.values():
        assert len(tests) == 5
        union = set().union(*tests)
        assert sum(len(t) for t in tests) == len(union)  # test folds are disjoint
        assert union <= participants and len(union) >= len(participants) - 8


# -- batching --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_batched_training_equals_unbatched_reference(dtype, tol):
    # sizes give 4, 3, 3, 3, 2, 2, 2 mini-batches: groups of 3 mix batch counts, so fits
    # drop out of the stack at the end of an epoch and carry their own Adam step counts
    fits = random_fits([100, 80, 75, 70, 64, 40, 33])
    epochs = (5, 20, 40)
    preds = mlp.train_fits(fits, epochs, dtype=dtype, group_size=3)
    for i in range(len(fits)):  # groups [100 80 75] [70 | 64 40] [33]: every position
        ref = reference(fits[i], epochs, dtype=dtype)
        for j, e in enumerate(epochs):
            np.testing.assert_allclose(preds[i][j], ref[e], rtol=tol, atol=tol)
        assert np.abs(ref[40] - ref[5]).max() > 1e-2  # it trained: the check has teeth


def test_python_fallback_equals_compiled_and_group_size_is_irrelevant():
    fits = random_fits([90, 64, 64, 33, 20], seed=5)
    a = mlp.train_fits(fits, (7,), group_size=2)
    b = mlp.train_fits(fits, (7,), group_size=1, workers=1, compiled=False)
    c = mlp.train_fits(fits, (7,), group_size=64, workers=1)
    for x, y, z in zip(a, b, c):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(x, z, rtol=1e-5, atol=1e-5)


def test_epochs_are_prefixes_of_one_run():
    fits = random_fits([70, 50, 33], seed=2)
    both = mlp.train_fits(fits, (3, 8))
    only3 = mlp.train_fits(fits, (3,))
    only8 = mlp.train_fits(fits, (8,))
    for b, p3, p8 in zip(both, only3, only8):
        np.testing.assert_array_equal(b[0], p3[0])
        np.testing.assert_array_equal(b[1], p8[0])
        assert np.abs(b[1] - b[0]).max() > 1e-3


def test_grid_epochs_prefix_and_determinism(noise):
    kw = dict(scores=["aces"], windows=(2,), seeds=range(2), holdout=False)
    r24 = mlp.run_grid(noise, epochs=(2, 4), **kw)
    r4 = mlp.run_grid(noise, epochs=(4,), **kw)
    again = mlp.run_grid(noise, epochs=(2, 4), **kw)
    a = r24.runs[r24.runs["epochs"] == 4].reset_index(drop=True)
    b = r4.runs.reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(r24.grid, again.grid)
    other = mlp.run_grid(noise, epochs=(2, 4), threads=1, group_size=3, **kw)
    np.testing.assert_allclose(other.grid["mse"], r24.grid["mse"], rtol=1e-5)


# -- does it learn? ---------------------------------------------------------------------------
def test_beats_mean_baseline_on_a_planted_relation(planted):
    res = mlp.run_grid(planted, **SMALL)
    row = res.table.iloc[0]
    assert row["mae"] <= 0.8 * row["baseline_mae"], row.to_dict()
    assert row["rmse"] <= 0.8 * row["baseline_rmse"], row.to_dict()
    assert row["holdout_mae"] <= 0.8 * row["holdout_baseline_mae"], row.to_dict()


def test_no_skill_on_pure_noise(noise):
    res = mlp.run_grid(noise, **SMALL)
    row = res.table.iloc[0]
    assert row["mae"] >= 0.95 * row["baseline_mae"], row.to_dict()
    assert row["rmse"] >= 0.95 * row["baseline_rmse"], row.to_dict()


# -- bookkeeping -----------------------------------------------------------------------------
def test_missing_scores_excluded_and_counted(noise):
    df = noise.copy()
    sessions = df[["participant_id", "visit_month"]].drop_duplicates().iloc[:7]
    hit = df.set_index(["participant_id", "visit_month"]).index.isin(pd.MultiIndex.from_frame(sessions))
    df.loc[hit, "pss"] = np.nan
    calls = []
    res = mlp.run_grid(
        df,
        scores=["pss", "phq9"],
        windows=(1,),
        epochs=(3,),
        seeds=range(1),
        progress=lambda d, t: calls.append((d, t)),
    )
    t = res.table.set_index("score")
    assert t.loc["pss", "excluded"] == 7 and t.loc["phq9", "excluded"] == 0
    n_sess = len(df[["participant_id", "visit_month"]].drop_duplicates())
    assert t.loc["pss", "n_sessions"] == n_sess - 7 and t.loc["phq9", "n_sessions"] == n_sess
    assert t.loc["pss", "n_samples"] == int((~hit).sum())
    assert any("7 session(s)" in n for n in res.notes)
    # progress: model-epochs, monotone, ends at the total (10 CV + 2 hold-out fits x 3)
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] == (10 + 2) * 3
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))


def test_bad_input_is_rejected(noise):
    with pytest.raises(ValueError, match="unknown score"):
        mlp.run_grid(noise, scores=["mood"])
    with pytest.raises(ValueError, match="participant"):
        mlp.run_grid(
            noise[noise["participant_id"].isin(["M000", "M001"])],
            scores=["phq9"],
            windows=(1,),
            epochs=(1,),
            seeds=range(1),
        )
    with pytest.raises(ValueError, match="missing columns"):
        mlp.run_grid(noise.drop(columns=["apex_duration_s"]), scores=["phq9"])


# -- the full grid ---------------------------------------------------------------------------
def test_full_default_grid_at_n94():
    joined = make_cohort(94, seed=0, kind="linear")
    t0 = time.perf_counter()
    res = mlp.run_grid(joined)
    wall = time.perf_counter() - t0
    print(
        f"\nfull default grid, N=94 participants ({len(joined)} smiles): {wall:.1f} s "
        f"({res.config['cv_fits']} networks = 2500 CV fits + hold-out)"
    )
    print(
        res.table[
            ["score", "best_window", "best_epochs", "mae", "rmse", "baseline_mae", "holdout_mae"]
        ].to_string(index=False)
    )
    t, g = res.table, res.grid
    assert list(t.columns[: len(mlp.TABLE_COLUMNS)]) == mlp.TABLE_COLUMNS
    assert list(t["score"]) == SCORE_COLUMNS
    assert len(g) == 5 * 5 * 4 and set(g["epochs"]) == {50, 100, 150, 200}
    assert res.config["cv_fits"] == 625
    assert len(res.runs) == (625 + 25) * 4
    assert t["best_window"].isin(range(1, 6)).all()
    assert t["best_epochs"].isin([50, 100, 150, 200]).all()
    for c in [
        "mae",
        "mae_sd",
        "rmse",
        "rmse_sd",
        "baseline_mae",
        "baseline_rmse",
        "holdout_mae",
        "holdout_rmse",
    ]:
        assert np.isfinite(t[c].astype(float)).all() and (t[c] >= 0).all(), c
    assert (t["rmse"] >= t["mae"]).all()
    for _, row in t.iterrows():  # the selection is the grid's minimum
        gs = g[g["score"] == row["score"]]
        assert row["mse"] == pytest.approx(gs["mse"].min())
        assert row["n_samples"] == gs[gs["window"] == row["best_window"]]["n_samples"].iloc[0]
        assert row["mae"] < row["baseline_mae"]  # every score is planted here
