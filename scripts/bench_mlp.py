"""Wall time of the Table II MLP grid (services/stats/mlp.py) on this machine.

    .venv/bin/python scripts/bench_mlp.py [--participants 94 300] [--seed 0] [--own]

For each cohort size: a synthetic cohort of P participants x 2 visits
(services/stats/simulate.py when it is importable, else - or with --own - the
small generator below: negative-binomial smile counts with mean 5.3 / SD 4.7
as in the paper, log-normal features with a per-session style, scores drawn
around Table I's means), then the full default grid: 5 scores x windows 1-5 x
epochs {50,100,150,200} x 5 seeds x 5 grouped folds (2,500 fits, trained as
one 200-epoch run per fit) plus the 5 hold-out fits per score. Prints the
wall time, the ratio to the 60 s budget, and Table II. No assertions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from services.stats import mlp  # noqa: E402
from services.stats.scores import FEATURES, SCALES, SCORE_COLUMNS, join  # noqa: E402

BUDGET_S = 60.0


def own_cohort(participants: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(smiles, scores): a simple cohort, the scores weakly tied to a smiling style."""
    rng = np.random.default_rng(seed)
    mean, sd = 5.3, 4.7
    r = mean**2 / (sd**2 - mean)  # negative binomial with that mean and SD
    smiles, scores = [], []
    for i in range(participants):
        pid = f"P{i:04d}"
        style = rng.normal(size=len(FEATURES))
        for visit in (6, 12):
            latent = style + 0.5 * rng.normal(size=len(FEATURES))
            row = {"participant_id": pid, "visit_month": visit}
            for j, (col, sc) in enumerate(SCALES.items()):
                z = 0.4 * latent[j % len(FEATURES)] + rng.normal()
                row[col] = float(np.clip(np.round(sc.mean + sc.sd * z), sc.lo, sc.hi))
            scores.append(row)
            n = rng.negative_binomial(r, r / (r + mean))
            for k in range(1, n + 1):
                f = np.exp(-1.0 + 0.3 * latent + 0.5 * rng.normal(size=len(FEATURES)))
                smiles.append(
                    {"participant_id": pid, "visit_month": visit, "smile_id": k, **dict(zip(FEATURES, f))}
                )
    return pd.DataFrame(smiles), pd.DataFrame(scores)


def cohort(participants: int, seed: int, own: bool) -> tuple[pd.DataFrame, str]:
    if not own:
        try:
            from services.stats.simulate import simulate

            c = simulate(participants, seed)
            joined, _ = join(c.smiles, c.scores)
            return joined, "services.stats.simulate"
        except Exception as e:  # noqa: BLE001 - any failure: fall back, say why
            print(f"(simulate unavailable: {type(e).__name__}: {e}; using the script's generator)")
    sm, sc = own_cohort(participants, seed)
    joined, _ = join(sm, sc)
    return joined, "bench_mlp.own_cohort"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--participants", type=int, nargs="+", default=[94, 300])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--own", action="store_true", help="use this script's generator")
    ap.add_argument("--group-size", type=int, default=None)
    a = ap.parse_args()
    kw = {} if a.group_size is None else {"group_size": a.group_size}
    for p in a.participants:
        joined, src = cohort(p, a.seed, a.own)
        n_sess = joined[["participant_id", "visit_month"]].drop_duplicates().shape[0]
        t0 = time.perf_counter()
        res = mlp.run_grid(joined, **kw)
        wall = time.perf_counter() - t0
        cv_fits = len(SCORE_COLUMNS) * 5 * 4 * 5 * 5
        print(f"\nN={p} participants ({n_sess} sessions, {len(joined)} smiles; data: {src})")
        ho = len(SCORE_COLUMNS) * 5
        print(
            f"  grid: {cv_fits} CV fits ({res.config['cv_fits']} networks, each trained once "
            f"for 200 epochs and scored at 50/100/150/200) + {ho} hold-out networks"
        )
        print(f"  wall {wall:.1f} s = {wall / BUDGET_S:.2f} x the {BUDGET_S:.0f} s budget")
        cols = [
            "score",
            "best_window",
            "best_epochs",
            "mae",
            "rmse",
            "baseline_mae",
            "baseline_rmse",
            "holdout_mae",
            "holdout_rmse",
            "n_samples",
        ]
        with pd.option_context("display.width", 160, "display.precision", 2):
            print(res.table[cols].to_string(index=False))


if __name__ == "__main__":
    main()
