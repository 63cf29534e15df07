"""A cohort simulator that plants known effects, so the statistics can be tested.

Real questionnaire data is private, so the statistics are tested on cohorts
whose truth is known.  ``simulate(participants, seed, effects)`` returns a
``Cohort(scores, smiles, truth)``: the questionnaire table and the long smile
table in exactly the shapes ``scores.validate_scores`` / ``validate_smiles``
accept, and a JSON-serialisable ``truth`` dict recording every planted effect,
its parameters, the implied population values the statistics should recover,
the seed and the counts.  ``write(cohort, out_dir)`` writes ``scores.csv``,
``smiles.csv`` and ``truth.json``.

Every participant has a visit at 6 and at 12 months.

Scores (Table I of the seed paper)
----------------------------------
Each scale's marginal is a discrete distribution on the integers of its range:
a negative binomial truncated to ``[lo, hi]`` (renormalised, so no spike at the
maximum) whose two parameters are solved so that the truncated distribution has
*exactly* Table I's sample mean and SD (``scores.SCALES``).  Social Support
(82.80 +- 15.97 of 100, a ceiling-bound scale) is ``100 - NB``.  These are
right-skewed, zero-inflated counts: P(PHQ-9 = 0) ~ 0.29, P(PEARLS = 0) ~ 0.70.

The scales are joined by a Gaussian copula.  ``SCORE_CORRELATION`` is the
*observed* (Pearson) correlation matrix the scores are meant to show::

                    phq9   aces   pss  pearls  social_support
    phq9            1.00   0.30  0.60   0.25   -0.40
    aces            0.30   1.00  0.25   0.30   -0.20
    pss             0.60   0.25  1.00   0.25   -0.40
    pearls          0.25   0.30  0.25   1.00   -0.15
    social_support -0.40  -0.20 -0.40  -0.15    1.00

(depression and perceived stress go together; both go against social support;
childhood adversity (ACEs) goes with the current-adversity screener PEARLS).
Because the marginals are discrete and skewed, the latent copula correlation
differs from the observed one; each latent pair correlation is solved exactly
(Hermite expansion of the two step functions) so that the *observed* Pearson r
equals the table; both matrices are in ``truth["scores"]``.

Visits: the 12-month latent vector is ``G12 = D G6 + E`` with ``E ~ N(0, R -
D R D)``: each scale keeps its copula correlations at both visits, and its
latent test-retest correlation ``D`` is solved so that the observed test-retest
r is 0.80 (PHQ-9, PSS, PEARLS, Social Support) and, for ACEs, so that the mean
absolute change between visits is the paper's 0.89 points.

``missing_rate`` blanks each score cell independently (MCAR) with that
probability; smiles never go missing.

Smiles
------
Smiles per session ~ negative binomial with mean ``smiles_mean`` (5) and SD
``smiles_sd`` (5), independent of everything else (zeros happen: ~13% of
sessions); ``smile_id`` = 1..n.

The seven primary features are log-normal, ``X_f = exp(mu_f + s_f Z_f)``, with
``Z_f ~ N(0, 1)`` marginally for every smile (medians/log-SDs in
``FEATURE_MODEL``: amplitudes ~0.05-0.4 IR, maximum speeds ~0.2-3 IR/s, phase
durations ~0.2-3 s), and ``total_duration_s = onset + apex + offset`` exactly.
Within a smile the latents are correlated (``feature_correlation()``: a fast
onset is a big one; onset and offset amplitudes go together; a long onset run
is a slow one; the apex is what is left between the two runs, so its duration
correlates negatively with the onset and offset durations).  A participant's
smiles share a random effect (her smiling style, the same at both visits):
``W = sqrt(icc) U_participant + sqrt(1 - icc) E_smile``, ``U, E ~ N(0, R_W)``.

Planted effects
---------------
1. **Visit differences (Table III), planted on the raw scale the t-test sees.**
   Every 12-month smile's primary feature is multiplied by ``c_f >= 1``.  The
   6- and 12-month marginals are then the same log-normal up to scale, so the
   population Cohen's d with an (equal-weight) pooled SD is exactly::

       d = (c - 1) / (CV sqrt((1 + c^2) / 2)),   CV = sqrt(exp(s_f^2) - 1)

   and ``c_f`` is solved from the planted ``d_f`` in closed form.  (It also
   makes var(6 mo) / var(12 mo) = 1/c^2 < 1, as the paper reports for every
   feature.)  ``total_duration_s`` is a sum, so its d follows from the three
   duration multipliers *and* from the covariances of the three durations
   (which depend on the smile index k through effect 2 and on the count
   distribution); its target (0.22, more than any of its parts' 0.05/0.19/0.05)
   is reached by solving the latent correlation between the apex duration and
   the onset/offset durations (``apex_rho``, negative: the phases share the
   smile's time), computed exactly from log-normal covariances mixed over k.
   So the expected d of a Welch t-test on the smiles equals the planted d for
   all eight features (up to the O(1/n) bias of d).  ``onset_duration_s`` and
   ``offset_duration_s`` (d = 0.05) are near-nulls.  If ``total_duration_s``
   is absent from ``visit_d`` its d is not planted but implied (recorded).
2. **Feature-score correlations growing with smile index k (Fig. 2).**  For a
   loaded feature f the latent of the k-th smile is
   ``Z_f = b_f(k) G_anchor + sqrt(1 - b_f(k)^2) W_f`` where ``G_anchor`` is the
   copula latent of the anchor score (PHQ-9) at that visit.  ``b_f(k)`` is
   solved (closed form for a log-normal against a discrete score) so that the
   *observed* Pearson r between the feature of the k-th smile and the anchor
   score is ``r_k = r_max * min(1, k / ramp_k)``.  Default: onset amplitude,
   onset duration, offset duration, r_max = 0.35, ramp_k = 5; the total
   duration inherits a correlation (recorded per k).  Correlations with the
   other scales follow through the copula (recorded, e.g. negative for Social
   Support).  Features not loaded are independent of every score.
3. **Score categories (Table IV).**  Falls out of 2 when scores are cut into
   Table I's categories: for each categorical scale, feature and visit,
   ``truth["anova"]`` records the category proportions, the expected feature
   mean per category and the implied population eta^2 = between-category
   variance / total variance over all smiles (= the partial eta^2 a one-way
   ANOVA on the smiles estimates), computed in closed form.

``Effects()`` is the paper-like default; ``Effects.null()`` plants nothing
(visit multipliers 1, no loadings; the participant random effect stays, it is
nuisance structure not an effect); ``Effects.strong()`` plants large
correlations that start early (r up to 0.8 from the 2nd smile, more features,
no participant effect) so that windowed mean features predict PHQ-9 well.

Smiles of one participant are not independent (random effect, shared score
latent, varying smile count), so a smile-level test is slightly
anti-conservative: on the null cohort (icc 0.05) the Welch test rejects at
alpha = .05 in about 6% of cohorts (1000 seeds at N = 94).  ``expected_d_se``
is the textbook independent-observations SE; ``truth["visit_effect"]
["se_inflation"]`` is, per feature, the exact factor by which clustering
inflates the SE of the mean difference (1.08 for unloaded features, 1.32 for
the loaded ones, 1.21 for the total at the defaults; Monte Carlo agrees within
~5%, slightly conservative for the loaded features).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy import optimize, special, stats

from .scores import FEATURES, KEYS, SCALES, SCORE_COLUMNS, VISITS

# -- constants ------------------------------------------------------------------

#: Table III of the seed paper: Cohen's d, 12-month minus 6-month (12 larger).
TABLE_III_D: dict[str, float] = {
    "max_onset_speed": 0.51,
    "max_offset_speed": 0.37,
    "onset_amplitude": 0.49,
    "offset_amplitude": 0.29,
    "onset_duration_s": 0.05,
    "offset_duration_s": 0.05,
    "apex_duration_s": 0.19,
    "total_duration_s": 0.22,
}
#: The features Fig. 2 found correlated with the scores (total is implied).
FIG2_FEATURES = ("onset_amplitude", "onset_duration_s", "offset_duration_s")

#: Observed (Pearson) correlations between the scales, in SCORE_COLUMNS order.
SCORE_CORRELATION = np.array(
    [
        # phq9  aces   pss  pearls  social_support
        [1.00, 0.30, 0.60, 0.25, -0.40],
        [0.30, 1.00, 0.25, 0.30, -0.20],
        [0.60, 0.25, 1.00, 0.25, -0.40],
        [0.25, 0.30, 0.25, 1.00, -0.15],
        [-0.40, -0.20, -0.40, -0.15, 1.00],
    ]
)
#: Observed test-retest r between the visits (ACEs: see ACES_MEAN_ABS_CHANGE).
RETEST_R = {"phq9": 0.80, "pss": 0.80, "pearls": 0.80, "social_support": 0.80}
#: The paper: "ACEs changing by an average of only 0.89 points".
ACES_MEAN_ABS_CHANGE = 0.89

#: Primary smile features: (median, log-SD) of the log-normal.  Amplitudes in
#: IR units (r = |RT| / IR), speeds in IR per second, durations in seconds.
FEATURE_MODEL: dict[str, tuple[float, float]] = {
    "max_onset_speed": (0.80, 0.60),
    "max_offset_speed": (0.60, 0.60),
    "onset_amplitude": (0.15, 0.50),
    "offset_amplitude": (0.13, 0.55),
    "onset_duration_s": (0.50, 0.50),
    "apex_duration_s": (0.80, 0.70),
    "offset_duration_s": (0.60, 0.50),
}
PRIMARY = list(FEATURE_MODEL)
DURATIONS = ("onset_duration_s", "apex_duration_s", "offset_duration_s")
TOTAL = "total_duration_s"
assert set(PRIMARY) | {TOTAL} == set(FEATURES)

#: Within-smile latent correlations of the primary features (pairs not listed: 0;
#: apex vs onset/offset duration: ``apex_rho``, solved or APEX_RHO_DEFAULT).
FEATURE_PAIRS: dict[tuple[str, str], float] = {
    ("max_onset_speed", "max_offset_speed"): 0.40,
    ("max_onset_speed", "onset_amplitude"): 0.50,
    ("max_onset_speed", "offset_amplitude"): 0.30,
    ("max_offset_speed", "offset_amplitude"): 0.50,
    ("max_offset_speed", "onset_amplitude"): 0.30,
    ("onset_amplitude", "offset_amplitude"): 0.70,
    ("max_onset_speed", "onset_duration_s"): -0.30,
    ("max_offset_speed", "offset_duration_s"): -0.30,
    ("onset_amplitude", "onset_duration_s"): 0.20,
    ("offset_amplitude", "offset_duration_s"): 0.20,
    ("onset_duration_s", "offset_duration_s"): 0.20,
}
APEX_RHO_DEFAULT = -0.30


# -- effects --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Effects:
    """What is planted.  Every field can be switched off.

    visit_d: Cohen's d (12-month minus 6-month) per feature, on the raw smile
        scale; features left out get d = 0 (total_duration_s left out: implied).
    score_r_max: per primary feature, the observed Pearson r with the anchor
        score reached from smile ``ramp_k`` on; r_k = r_max * min(1, k/ramp_k).
    anchor: the score the loadings are on (the others follow via the copula).
    ramp_k: the smile index from which the correlation is full.
    participant_icc: latent share of a feature's variance that is the
        participant's (stable) smiling style: nuisance clustering, not an effect.
    """

    visit_d: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(TABLE_III_D))
    score_r_max: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {f: 0.35 for f in FIG2_FEATURES}
    )
    anchor: str = "phq9"
    ramp_k: int = 5
    participant_icc: float = 0.05
    name: str = "paper"

    @classmethod
    def paper(cls) -> Effects:
        """Table III's d's and Fig. 2's growing correlations (the default)."""
        return cls()

    @classmethod
    def null(cls, participant_icc: float = 0.05) -> Effects:
        """Nothing planted: no visit difference, no feature-score relation."""
        return cls(visit_d={}, score_r_max={}, participant_icc=participant_icc, name="null")

    @classmethod
    def strong(cls) -> Effects:
        """Large feature-PHQ-9 correlations from the 2nd smile on (for the MLP)."""
        return cls(
            score_r_max={
                "onset_amplitude": 0.80,
                "onset_duration_s": 0.70,
                "offset_duration_s": 0.70,
                "offset_amplitude": 0.60,
                "max_onset_speed": 0.50,
            },
            ramp_k=2,
            participant_icc=0.0,
            name="strong",
        )

    def check(self) -> None:
        bad = [f for f in self.visit_d if f not in FEATURES]
        if bad:
            raise ValueError(f"visit_d: unknown feature(s) {bad}; known: {list(FEATURES)}")
        for f, d in self.visit_d.items():
            if not (math.isfinite(d) and 0 <= d < 3):
                raise ValueError(f"visit_d[{f!r}] = {d}: must be in [0, 3) (12 months larger)")
        bad = [f for f in self.score_r_max if f not in PRIMARY]
        if bad:
            raise ValueError(
                f"score_r_max: {bad} cannot be loaded (choose from {PRIMARY}; "
                "total_duration_s is the sum of the three phase durations)"
            )
        for f, r in self.score_r_max.items():
            if not (math.isfinite(r) and -1 < r < 1):
                raise ValueError(f"score_r_max[{f!r}] = {r}: must be in (-1, 1)")
        if self.anchor not in SCALES:
            raise ValueError(f"anchor {self.anchor!r} is not a score ({SCORE_COLUMNS})")
        if int(self.ramp_k) != self.ramp_k or self.ramp_k < 1:
            raise ValueError(f"ramp_k = {self.ramp_k}: must be a whole number >= 1")
        if not 0 <= self.participant_icc < 1:
            raise ValueError(f"participant_icc = {self.participant_icc}: must be in [0, 1)")

    def key(self) -> str:
        return json.dumps(
            {
                "visit_d": dict(sorted(self.visit_d.items())),
                "score_r_max": dict(sorted(self.score_r_max.items())),
                "anchor": self.anchor,
                "ramp_k": int(self.ramp_k),
                "participant_icc": float(self.participant_icc),
                "name": self.name,
            },
            sort_keys=True,
        )


class Cohort(NamedTuple):
    scores: pd.DataFrame
    smiles: pd.DataFrame
    truth: dict


def expected_d_se(n6: int, n12: int, d: float) -> float:
    """Large-sample SE of Cohen's d between two independent groups of n6 and
    n12 observations (Hedges & Olkin): sqrt((n1+n2)/(n1 n2) + d^2 / (2 (n1+n2))).

    It assumes independent, normal observations; simulated smiles are
    log-normal and mildly clustered within mothers, so the real SE is larger
    by ``truth["visit_effect"]["se_inflation"][feature]`` (1.08-1.32 with the
    default effects)."""
    if n6 < 2 or n12 < 2:
        raise ValueError(f"need at least 2 observations per group (got {n6}, {n12})")
    n1, n2 = float(n6), float(n12)
    return math.sqrt((n1 + n2) / (n1 * n2) + d * d / (2 * (n1 + n2)))


# -- score marginals and copula ---------------------------------------------------

_CUT_LIMIT = 8.5  # latent cutpoints beyond this carry < 1e-16 probability
_HERMITE_TERMS = 300


@dataclasses.dataclass(frozen=True)
class _Marginal:
    values: np.ndarray  # lo..hi
    pmf: np.ndarray
    cuts: np.ndarray  # latent cutpoints between consecutive values (may be +-inf)
    mean: float
    sd: float
    params: dict


def _nb_trunc_pmf(m: float, k: float, hi: int) -> np.ndarray:
    x = np.arange(hi + 1)
    p = stats.nbinom.pmf(x, k, k / (k + m))
    return p / p.sum()


@functools.cache
def _marginal(col: str) -> _Marginal:
    sc = SCALES[col]
    lo, hi = int(sc.lo), int(sc.hi)
    reverse = col == "social_support"
    target_mean = (hi - sc.mean) if reverse else (sc.mean - lo)
    span = hi - lo

    def moments(th):
        p = _nb_trunc_pmf(math.exp(th[0]), math.exp(th[1]), span)
        x = np.arange(span + 1)
        mu = float(p @ x)
        return mu, math.sqrt(float(p @ (x - mu) ** 2))

    k0 = target_mean**2 / max(sc.sd**2 - target_mean, 1e-3)
    sol = optimize.least_squares(
        lambda th: np.subtract(moments(th), (target_mean, sc.sd)),
        x0=[math.log(target_mean), math.log(k0)],
        xtol=1e-13,
        ftol=1e-13,
        gtol=1e-13,
    )
    m, k = math.exp(sol.x[0]), math.exp(sol.x[1])
    p = _nb_trunc_pmf(m, k, span)
    if reverse:
        p = p[::-1]
    values = np.arange(lo, hi + 1)
    cdf = np.cumsum(p)[:-1]
    with np.errstate(divide="ignore"):
        cuts = stats.norm.ppf(np.clip(cdf, 0, 1))
    mean = float(p @ values)
    sd = math.sqrt(float(p @ (values - mean) ** 2))
    if abs(mean - sc.mean) > 1e-6 or abs(sd - sc.sd) > 1e-6:
        raise RuntimeError(f"could not match {sc.label}'s mean/SD ({mean}, {sd})")
    params = {
        "family": ("100 - " if reverse else "") + "negative binomial truncated to range",
        "nb_mean": m,
        "nb_size": k,
        "mean": mean,
        "sd": sd,
        "p_min": float(p[0]),
        "p_max": float(p[-1]),
    }
    return _Marginal(values, p, cuts, mean, sd, params)


def _hermite_coefs(mg: _Marginal) -> np.ndarray:
    """c_n = E[g(G) h_n(G)], n = 1..N, with h_n = He_n / sqrt(n!) and g the
    step function G -> score: E[h_n 1{G > a}] = h_{n-1}(a) phi(a) / sqrt(n),
    so Cov(g1(G1), g2(G2)) = sum_n rho^n c_n d_n when corr(G1, G2) = rho."""
    ok = np.abs(mg.cuts) <= _CUT_LIMIT
    a = mg.cuts[ok]
    steps = np.diff(mg.values)[ok].astype(float)
    phi = stats.norm.pdf(a)
    out = np.empty(_HERMITE_TERMS)
    h_prev, h = np.zeros_like(a), np.ones_like(a)
    for n in range(1, _HERMITE_TERMS + 1):
        out[n - 1] = float(np.sum(steps * h * phi)) / math.sqrt(n)
        h_prev, h = h, (a * h - math.sqrt(n - 1) * h_prev) / math.sqrt(n)
    return out


@functools.cache
def _coefs(col: str) -> np.ndarray:
    return _hermite_coefs(_marginal(col))


def _observed_r(c1: str, c2: str, rho: float) -> float:
    """Pearson r of two scores whose copula latents correlate rho."""
    a, b = _coefs(c1), _coefs(c2)
    n = np.arange(1, _HERMITE_TERMS + 1)
    cov = float(np.sum(rho**n * a * b))
    return cov / (_marginal(c1).sd * _marginal(c2).sd)


def _solve(f, target: float, lo: float, hi: float, what: str) -> float:
    flo, fhi = f(lo) - target, f(hi) - target
    if flo * fhi > 0:
        raise ValueError(f"{what}: target {target:g} is not reachable (range {f(lo):.3f} .. {f(hi):.3f})")
    return float(optimize.brentq(lambda x: f(x) - target, lo, hi, xtol=1e-12))


def _nearest_correlation(m: np.ndarray) -> tuple[np.ndarray, bool]:
    w, v = np.linalg.eigh(m)
    if w.min() > 1e-8:
        return m, False
    w = np.maximum(w, 1e-6)
    out = v @ np.diag(w) @ v.T
    dd = np.sqrt(np.diag(out))
    return out / np.outer(dd, dd), True


def _mean_abs_change(col: str, rho: float) -> float:
    """E|X6 - X12| for one scale whose latents correlate rho between visits."""
    mg = _marginal(col)
    s = math.sqrt(1 - rho * rho)
    edges = np.concatenate([[-_CUT_LIMIT], np.clip(mg.cuts, -_CUT_LIMIT, _CUT_LIMIT), [_CUT_LIMIT]])
    xg, wg = np.polynomial.legendre.leggauss(48)
    upper = np.clip(np.concatenate([mg.cuts, [np.inf]]), -40, 40)
    lower = np.clip(np.concatenate([[-np.inf], mg.cuts]), -40, 40)
    total = 0.0
    for i, v in enumerate(mg.values):
        a, b = edges[i], edges[i + 1]
        if b <= a:
            continue
        g = (a + b) / 2 + (b - a) / 2 * xg
        w = wg * (b - a) / 2 * stats.norm.pdf(g)
        pj = special.ndtr((upper[None, :] - rho * g[:, None]) / s) - special.ndtr(
            (lower[None, :] - rho * g[:, None]) / s
        )
        total += float(w @ (pj @ np.abs(v - mg.values)))
    return total


@functools.cache
def _score_model() -> dict:
    k = len(SCORE_COLUMNS)
    latent = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            ci, cj = SCORE_COLUMNS[i], SCORE_COLUMNS[j]
            latent[i, j] = latent[j, i] = _solve(
                lambda r, ci=ci, cj=cj: _observed_r(ci, cj, r),
                SCORE_CORRELATION[i, j],
                -0.99,
                0.99,
                f"correlation {ci}-{cj}",
            )
    latent, adjusted = _nearest_correlation(latent)
    retest_latent = {}
    for c in SCORE_COLUMNS:
        if c == "aces":
            retest_latent[c] = _solve(
                lambda r: -_mean_abs_change("aces", r), -ACES_MEAN_ABS_CHANGE, 0.0, 0.995, "ACEs mean change"
            )
        else:
            retest_latent[c] = _solve(
                lambda r, c=c: _observed_r(c, c, r), RETEST_R[c], 0.0, 0.995, f"{c} test-retest"
            )
    d = np.array([retest_latent[c] for c in SCORE_COLUMNS])
    innov = latent - np.outer(d, d) * latent
    w, v = np.linalg.eigh(innov)
    if w.min() < -1e-9:
        raise RuntimeError("retest innovation covariance is not positive semi-definite")
    innov_sqrt = v @ np.diag(np.sqrt(np.maximum(w, 0))) @ v.T
    observed_latent = np.array(
        [
            [
                _observed_r(SCORE_COLUMNS[i], SCORE_COLUMNS[j], latent[i, j]) if i != j else 1.0
                for j in range(k)
            ]
            for i in range(k)
        ]
    )
    return {
        "latent": latent,
        "adjusted": adjusted,
        "retest_latent": d,
        "innov_sqrt": innov_sqrt,
        "chol": np.linalg.cholesky(latent),
        "observed": observed_latent,
        "retest_observed": {c: _observed_r(c, c, retest_latent[c]) for c in SCORE_COLUMNS},
        "aces_mean_abs_change": _mean_abs_change("aces", retest_latent["aces"]),
    }


def _to_score(col: str, g: np.ndarray) -> np.ndarray:
    mg = _marginal(col)
    return mg.values[0] + np.searchsorted(mg.cuts, g, side="left")


# -- smile-feature model ------------------------------------------------------------


def feature_correlation(apex_rho: float = APEX_RHO_DEFAULT) -> np.ndarray:
    """The within-smile latent correlation matrix R_W of the primary features."""
    idx = {f: i for i, f in enumerate(PRIMARY)}
    r = np.eye(len(PRIMARY))
    for (a, b), v in FEATURE_PAIRS.items():
        r[idx[a], idx[b]] = r[idx[b], idx[a]] = v
    for f in ("onset_duration_s", "offset_duration_s"):
        r[idx[f], idx["apex_duration_s"]] = r[idx["apex_duration_s"], idx[f]] = apex_rho
    return r


def _lognormal(f: str) -> tuple[float, float, float, float]:
    """(mu, sigma, mean, sd) of feature f's log-normal at 6 months."""
    med, s = FEATURE_MODEL[f]
    mu = math.log(med)
    mean = math.exp(mu + s * s / 2)
    return mu, s, mean, mean * math.sqrt(math.exp(s * s) - 1)


def _multiplier(f: str, d: float) -> float:
    """c with (c - 1) / (CV sqrt((1 + c^2)/2)) = d (12-month scale factor)."""
    if d == 0:
        return 1.0
    s = FEATURE_MODEL[f][1]
    kappa = d * math.sqrt(math.exp(s * s) - 1)
    a = 1 - kappa * kappa / 2
    if a <= 0:
        raise ValueError(f"visit_d[{f!r}] = {d} is too large for this feature's spread")
    return (1 + math.sqrt(1 - a * a)) / a


def _count_params(mean: float, sd: float) -> tuple[float, float]:
    if not (mean > 0 and sd * sd > mean):
        raise ValueError(f"smile counts need mean > 0 and SD^2 > mean (got {mean}, {sd})")
    n = mean * mean / (sd * sd - mean)
    return n, n / (n + mean)


def _k_weights(mean: float, sd: float, ramp_k: int) -> np.ndarray:
    """Share of all smiles that are the k-th of their session, k = 1..ramp_k-1,
    then k >= ramp_k lumped (the loadings are constant from ramp_k on)."""
    n, p = _count_params(mean, sd)
    k = np.arange(1, ramp_k)
    w = stats.nbinom.sf(k - 1, n, p) / mean
    return np.append(w, 1 - w.sum())


def _loading(f: str, r: float, anchor: str) -> float:
    """Latent loading b giving observed Pearson r between the log-normal
    feature and the anchor score (closed form, see _feature_score_r)."""
    if r == 0:
        return 0.0
    return _solve(
        lambda b: _feature_score_r(FEATURE_MODEL[f][1], anchor, b),
        r,
        -0.999999,
        0.999999,
        f"r({f}, {anchor})",
    )


def _shifted_mean(mg: _Marginal, shift: float) -> float:
    """E[g(G + shift)] for the score's step function g, G ~ N(0, 1)."""
    up = np.concatenate([mg.cuts, [np.inf]])
    lo = np.concatenate([[-np.inf], mg.cuts])
    p = special.ndtr(up - shift) - special.ndtr(lo - shift)
    return float(p @ mg.values)


def _feature_score_r(s: float, col: str, beta: float) -> float:
    """Pearson r of exp(mu + s Z) with score(G) when corr(Z, G) = beta:
    E[exp(sZ) g(G)] = exp(s^2/2) E[g(G + s beta)], hence
    r = (E g(G + s beta) - E g) / (sqrt(exp(s^2) - 1) SD_g)."""
    if beta == 0:
        return 0.0
    mg = _marginal(col)
    return (_shifted_mean(mg, s * beta) - mg.mean) / (math.sqrt(math.exp(s * s) - 1) * mg.sd)


def _duration_cov(b: dict[str, float], r_w: np.ndarray) -> np.ndarray:
    """Covariance (raw scale, 6 months) of the three durations for loadings b."""
    idx = [PRIMARY.index(f) for f in DURATIONS]
    out = np.empty((3, 3))
    for i, f in enumerate(DURATIONS):
        for j, g in enumerate(DURATIONS):
            rho = (
                b[f] * b[g] + math.sqrt((1 - b[f] ** 2) * (1 - b[g] ** 2)) * r_w[idx[i], idx[j]]
                if i != j
                else 1.0
            )
            _, sf, mf, _ = _lognormal(f)
            _, sg, mg_, _ = _lognormal(g)
            out[i, j] = mf * mg_ * (math.exp(sf * sg * rho) - 1)
    return out


def _total_d(
    apex_rho: float, loadings: list[dict[str, float]], w: np.ndarray, mult: dict[str, float]
) -> float:
    r_w = feature_correlation(apex_rho)
    c = np.array([mult[f] for f in DURATIONS])
    m = np.array([_lognormal(f)[2] for f in DURATIONS])
    v6 = v12 = 0.0
    for wk, b in zip(w, loadings):
        cov = _duration_cov(b, r_w)
        v6 += wk * cov.sum()
        v12 += wk * (np.outer(c, c) * cov).sum()
    return float(((c - 1) @ m) / math.sqrt((v6 + v12) / 2))


def _apex_rho_range() -> tuple[float, float]:
    grid = np.linspace(-0.95, 0.95, 381)
    ok = [x for x in grid if np.linalg.eigvalsh(feature_correlation(x)).min() > 0.02]
    return min(ok), max(ok)


@functools.lru_cache(maxsize=64)
def _plan(effects_key: str, smiles_mean: float, smiles_sd: float) -> dict:
    """Everything the simulation and the truth need for one Effects."""
    e = json.loads(effects_key)
    ramp = e["ramp_k"]
    anchor = e["anchor"]
    ks = list(range(1, ramp + 1))
    w = _k_weights(smiles_mean, smiles_sd, ramp)
    r_max = {f: float(e["score_r_max"].get(f, 0.0)) for f in PRIMARY}
    r_k = {f: [r_max[f] * min(1.0, k / ramp) for k in ks] for f in PRIMARY}
    b_k = {f: [_loading(f, r, anchor) for r in r_k[f]] for f in PRIMARY}
    loadings = [{f: b_k[f][i] for f in PRIMARY} for i in range(ramp)]
    visit_d = {f: float(e["visit_d"].get(f, 0.0)) for f in FEATURES}
    mult = {f: _multiplier(f, visit_d[f]) for f in PRIMARY}
    planted_total = TOTAL in e["visit_d"] and any(visit_d[f] for f in DURATIONS)
    if TOTAL in e["visit_d"] and not planted_total and visit_d[TOTAL] != 0:
        raise ValueError("total_duration_s's d cannot be planted without a duration effect")
    if planted_total:
        lo, hi = _apex_rho_range()
        apex_rho = _solve(
            lambda x: _total_d(x, loadings, w, mult),
            visit_d[TOTAL],
            lo,
            hi,
            "total_duration_s d (via the apex-onset/offset latent correlation)",
        )
    else:
        apex_rho = APEX_RHO_DEFAULT
    r_w = feature_correlation(apex_rho)
    if np.linalg.eigvalsh(r_w).min() <= 0:
        raise ValueError("feature correlation matrix is not positive definite")
    return {
        "ks": ks,
        "w": w,
        "r_max": r_max,
        "r_k": r_k,
        "b_k": b_k,
        "loadings": loadings,
        "visit_d": visit_d,
        "mult": mult,
        "apex_rho": apex_rho,
        "r_w": r_w,
        "planted_total": planted_total,
        "total_d": _total_d(apex_rho, loadings, w, mult),
        "anchor": anchor,
        "ramp_k": ramp,
        "icc": e["participant_icc"],
        "effects": e,
        "smiles_mean": smiles_mean,
        "smiles_sd": smiles_sd,
    }


# -- implied population values (closed form) ------------------------------------------


def _se_inflation(plan: dict) -> dict[str, float]:
    """Per feature: sqrt(Var(mean12 - mean6) clustered / the same for independent
    smiles), from the exact raw-scale covariances between two smiles of one
    participant (same visit: shared score latent and random effect; across
    visits: the anchor's latent test-retest and the stable random effect),
    summed over the count distribution (linearised ratio estimator)."""
    kmax = 120
    n_par, p_par = _count_params(plan["smiles_mean"], plan["smiles_sd"])
    en = plan["smiles_mean"]
    j = np.arange(1, kmax + 1)
    p_ge = stats.nbinom.sf(j - 1, n_par, p_par)
    both = p_ge[np.maximum.outer(np.arange(kmax), np.arange(kmax))]
    cross = np.outer(p_ge, p_ge)
    kk = np.minimum(j, plan["ramp_k"]) - 1
    rho_a = float(_score_model()["retest_latent"][SCORE_COLUMNS.index(plan["anchor"])])
    icc, r_w = plan["icc"], plan["r_w"]
    out = {}
    for feat in FEATURES:
        comps = list(DURATIONS) if feat == TOTAL else [feat]
        var = {6: 0.0, 12: 0.0}
        var_t = {6: 0.0, 12: 0.0}
        cov_x = 0.0
        for f in comps:
            for g in comps:
                _, sf, mf, _ = _lognormal(f)
                _, sg, mg_, _ = _lognormal(g)
                bf = np.asarray(plan["b_k"][f])[kk]
                bg = np.asarray(plan["b_k"][g])[kk]
                rw = r_w[PRIMARY.index(f), PRIMARY.index(g)]
                qq = np.sqrt(np.outer(1 - bf**2, 1 - bg**2))
                bb = np.outer(bf, bg)
                within = bb + qq * icc * rw  # two smiles, one visit
                same = np.diag(bb) + np.diag(qq) * rw  # one smile
                across = bb * rho_a + qq * icc * rw  # two visits
                base = mf * mg_
                c_same = base * (np.exp(sf * sg * within) - 1)
                np.fill_diagonal(c_same, base * (np.exp(sf * sg * same) - 1))
                c_x = base * (np.exp(sf * sg * across) - 1)
                for v in VISITS:
                    cc = plan["mult"][f] * plan["mult"][g] if v == 12 else 1.0
                    var_t[v] += cc * float(np.sum(both * c_same))
                    var[v] += cc * float(np.diag(c_same) @ p_ge) / en  # marginal variance
                cov_x += plan["mult"][g] * float(np.sum(cross * c_x))
        clustered = (var_t[6] + var_t[12] - 2 * cov_x) / en**2
        independent = (var[6] + var[12]) / en
        out[feat] = math.sqrt(clustered / independent)
    return out


def _category_means(f: str, beta: float, mg: _Marginal, cats, mult: float) -> list[float]:
    _, s, mean, _ = _lognormal(f)
    out = []
    for lo_v, hi_v in cats:
        a = -np.inf if lo_v <= mg.values[0] else mg.cuts[int(lo_v - mg.values[0]) - 1]
        b = np.inf if hi_v >= mg.values[-1] else mg.cuts[int(hi_v - mg.values[0])]
        pc = special.ndtr(b) - special.ndtr(a)
        out.append(mult * mean * (special.ndtr(b - s * beta) - special.ndtr(a - s * beta)) / pc)
    return out


def _implied(plan: dict) -> dict:
    sm = _score_model()
    lat = sm["latent"]
    ai = SCORE_COLUMNS.index(plan["anchor"])
    r_w = plan["r_w"]
    w = plan["w"]
    mult = plan["mult"]
    dur_mean = np.array([_lognormal(f)[2] for f in DURATIONS])

    def total_var(b: dict, visit: int) -> float:
        c = np.array([mult[f] if visit == 12 else 1.0 for f in DURATIONS])
        return float((np.outer(c, c) * _duration_cov(b, r_w)).sum())

    # observed r of each feature of the k-th smile with each score, per visit
    corr = {}
    for col in SCORE_COLUMNS:
        mg = _marginal(col)
        rho_as = lat[ai, SCORE_COLUMNS.index(col)]
        per_f: dict[str, Any] = {}  # feature -> [r per smile]; TOTAL -> {visit: [r per smile]}
        for f in PRIMARY:
            s = FEATURE_MODEL[f][1]
            per_f[f] = [_feature_score_r(s, col, b * rho_as) for b in plan["b_k"][f]]
        for visit in VISITS:
            tot = []
            for b in plan["loadings"]:
                cov = sum(
                    (mult[f] if visit == 12 else 1.0)
                    * _lognormal(f)[2]
                    * (_shifted_mean(mg, FEATURE_MODEL[f][1] * b[f] * rho_as) - mg.mean)
                    for f in DURATIONS
                )
                tot.append(cov / (math.sqrt(total_var(b, visit)) * mg.sd))
            per_f.setdefault(TOTAL, {})[str(visit)] = tot
        corr[col] = per_f

    # one-way ANOVA across categories: population eta^2 over all smiles of a visit
    anova = {}
    for col in SCORE_COLUMNS:
        sc = SCALES[col]
        if sc.categories is None:
            continue
        mg = _marginal(col)
        rho_as = lat[ai, SCORE_COLUMNS.index(col)]
        cats = [(lo_v, hi_v) for _, lo_v, hi_v in sc.categories]
        shares = []
        for lo_v, hi_v in cats:
            sel = (mg.values >= lo_v) & (mg.values <= hi_v)
            shares.append(float(mg.pmf[sel].sum()))
        props = np.array(shares)
        entry = {
            "categories": [n for n, _, _ in sc.categories],
            "proportions": props.tolist(),
            "features": {},
        }
        for f in FEATURES:
            per_visit = {}
            for visit in VISITS:
                if f == TOTAL:
                    means = np.zeros(len(cats))
                    for wk, b in zip(w, plan["loadings"]):
                        for g in DURATIONS:
                            means += wk * np.array(
                                _category_means(g, b[g] * rho_as, mg, cats, mult[g] if visit == 12 else 1.0)
                            )
                    grand = float(dur_mean @ np.array([mult[g] if visit == 12 else 1.0 for g in DURATIONS]))
                    var = sum(wk * total_var(b, visit) for wk, b in zip(w, plan["loadings"]))
                else:
                    m_f = mult[f] if visit == 12 else 1.0
                    means = np.zeros(len(cats))
                    for wk, b in zip(w, plan["b_k"][f]):
                        means += wk * np.array(_category_means(f, b * rho_as, mg, cats, m_f))
                    grand = m_f * _lognormal(f)[2]
                    var = (m_f * _lognormal(f)[3]) ** 2
                eta2 = float(props @ (means - grand) ** 2) / var
                per_visit[str(visit)] = {
                    "category_means": means.tolist(),
                    "eta2": eta2 if eta2 > 1e-12 else 0.0,
                }
            entry["features"][f] = per_visit
        anova[col] = entry
    return {"correlation": corr, "anova": anova}


# -- simulation -------------------------------------------------------------------


def simulate(
    participants: int,
    seed: int,
    effects: Effects | None = None,
    *,
    missing_rate: float = 0.0,
    smiles_mean: float = 5.0,
    smiles_sd: float = 5.0,
) -> Cohort:
    """A cohort of ``participants`` mothers, each with a 6- and a 12-month visit.

    ``effects`` None means ``Effects()`` (the paper's effects); use
    ``Effects.null()`` for a cohort with nothing planted.  Deterministic in
    ``seed``: scores, missingness, counts, participant effects and smile noise
    come from independent child streams, so e.g. changing ``missing_rate``
    leaves the scores and smiles unchanged."""
    if isinstance(participants, bool) or int(participants) != participants or participants < 1:
        raise ValueError(f"participants = {participants!r}: must be a whole number >= 1")
    if not 0 <= missing_rate < 1:
        raise ValueError(f"missing_rate = {missing_rate}: must be in [0, 1)")
    participants = int(participants)
    effects = Effects() if effects is None else effects
    effects.check()
    plan = _plan(effects.key(), float(smiles_mean), float(smiles_sd))
    sm = _score_model()
    rng_scores, rng_missing, rng_counts, rng_person, rng_smiles = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
    )

    # scores: latent copula at 6 months, autoregressive to 12 months
    n_sc = len(SCORE_COLUMNS)
    g6 = rng_scores.standard_normal((participants, n_sc)) @ sm["chol"].T
    g12 = g6 * sm["retest_latent"] + rng_scores.standard_normal((participants, n_sc)) @ sm["innov_sqrt"].T
    width = max(3, len(str(participants)))
    pids = np.array([f"P{i + 1:0{width}d}" for i in range(participants)])
    latent = {6: g6, 12: g12}
    rows = []
    for v in VISITS:
        block = pd.DataFrame({"participant_id": pids, "visit_month": v})
        for j, col in enumerate(SCORE_COLUMNS):
            block[col] = _to_score(col, latent[v][:, j])
        rows.append(block)
    scores = pd.concat(rows, ignore_index=True)
    scores = scores.sort_values(KEYS, kind="stable").reset_index(drop=True)
    mask = rng_missing.random((len(scores), n_sc)) < missing_rate
    for j, col in enumerate(SCORE_COLUMNS):
        scores[col] = scores[col].astype("Int64")
        scores.loc[mask[:, j], col] = pd.NA

    # smile counts, index k, and the anchor latent per smile
    n_par, p_par = _count_params(smiles_mean, smiles_sd)
    counts = rng_counts.negative_binomial(n_par, p_par, size=(participants, 2))
    sess_p = np.repeat(np.arange(participants), 2)
    sess_v = np.tile(np.array(VISITS), participants)
    sess_n = counts.reshape(-1)
    sm_p = np.repeat(sess_p, sess_n)
    sm_v = np.repeat(sess_v, sess_n)
    starts = np.repeat(np.cumsum(sess_n) - sess_n, sess_n)
    sm_k = np.arange(len(sm_p)) - starts + 1
    ai = SCORE_COLUMNS.index(plan["anchor"])
    g_anchor = np.where(sm_v == 6, g6[sm_p, ai], g12[sm_p, ai])

    # primary features
    chol_w = np.linalg.cholesky(plan["r_w"])
    icc = plan["icc"]
    u = rng_person.standard_normal((participants, len(PRIMARY))) @ chol_w.T
    e = rng_smiles.standard_normal((len(sm_p), len(PRIMARY))) @ chol_w.T
    wlat = math.sqrt(icc) * u[sm_p] + math.sqrt(1 - icc) * e
    kk = np.minimum(sm_k, plan["ramp_k"]) - 1
    smiles = pd.DataFrame({"participant_id": pids[sm_p], "visit_month": sm_v, "smile_id": sm_k})
    for j, f in enumerate(PRIMARY):
        b = np.asarray(plan["b_k"][f])[kk]
        z = b * g_anchor + np.sqrt(1 - b * b) * wlat[:, j]
        mu, s, _, _ = _lognormal(f)
        smiles[f] = np.exp(mu + s * z) * np.where(sm_v == 12, plan["mult"][f], 1.0)
    smiles[TOTAL] = smiles["onset_duration_s"] + smiles["apex_duration_s"] + smiles["offset_duration_s"]
    smiles = smiles[KEYS + ["smile_id"] + list(FEATURES)]

    truth = _truth(
        plan, effects, participants, seed, missing_rate, smiles_mean, smiles_sd, scores, smiles, counts, mask
    )
    return Cohort(scores, smiles, truth)


def _f(x) -> float:
    return float(x)


@functools.lru_cache(maxsize=64)
def _population(effects_key: str, smiles_mean: float, smiles_sd: float) -> str:
    """The implied population values for one plan, as JSON (cached; copied per cohort)."""
    plan = _plan(effects_key, smiles_mean, smiles_sd)
    return json.dumps({**_implied(plan), "se_inflation": _se_inflation(plan)})


def _truth(
    plan, effects, participants, seed, missing_rate, smiles_mean, smiles_sd, scores, smiles, counts, mask
) -> dict:
    sm = _score_model()
    imp = json.loads(_population(effects.key(), float(smiles_mean), float(smiles_sd)))
    n_smiles = {str(v): int((smiles["visit_month"] == v).sum()) for v in VISITS}
    ks = plan["ks"]
    ramp = plan["ramp_k"]
    k_labels = [str(k) if k < ramp else f">={k}" for k in ks]
    return {
        "generator": "services.stats.simulate",
        "version": 1,
        "seed": int(seed),
        "participants": participants,
        "seed_streams": ["scores", "missing", "counts", "participant_effects", "smiles"],
        "counts": {
            "sessions": 2 * participants,
            "smiles": n_smiles,
            "smiles_total": int(len(smiles)),
            "sessions_without_smiles": int((counts == 0).sum()),
            "missing_scores": {c: int(mask[:, j].sum()) for j, c in enumerate(SCORE_COLUMNS)},
        },
        "effects": {"name": effects.name, **plan["effects"]},
        "scores": {
            "columns": SCORE_COLUMNS,
            "marginals": {c: _marginal(c).params for c in SCORE_COLUMNS},
            "correlation_target": SCORE_CORRELATION.tolist(),
            "correlation_latent": sm["latent"].tolist(),
            "correlation_latent_adjusted_to_pd": bool(sm["adjusted"]),
            "correlation_implied": sm["observed"].tolist(),
            "retest_latent": {c: _f(x) for c, x in zip(SCORE_COLUMNS, sm["retest_latent"])},
            "retest_r_implied": {c: _f(x) for c, x in sm["retest_observed"].items()},
            "aces_mean_abs_change_implied": _f(sm["aces_mean_abs_change"]),
            "missing_rate": float(missing_rate),
            "missing_mechanism": "MCAR, each score cell independently",
        },
        "smile_counts": {
            "distribution": "negative binomial",
            "mean": float(smiles_mean),
            "sd": float(smiles_sd),
            "same_at_both_visits": True,
            "share_of_smiles_at_index_k": dict(zip(k_labels, map(_f, plan["w"]))),
        },
        "features": {
            "lognormal_6mo": {
                f: {
                    "median": FEATURE_MODEL[f][0],
                    "log_sd": FEATURE_MODEL[f][1],
                    "mean": _lognormal(f)[2],
                    "sd": _lognormal(f)[3],
                }
                for f in PRIMARY
            },
            "derived": {TOTAL: "onset_duration_s + apex_duration_s + offset_duration_s"},
            "latent_order": PRIMARY,
            "latent_correlation": plan["r_w"].tolist(),
            "apex_rho": _f(plan["apex_rho"]),
            "apex_rho_solved": bool(plan["planted_total"]),
            "participant_icc": float(plan["icc"]),
        },
        "visit_effect": {
            "contrast": "12-month minus 6-month, Cohen's d with pooled SD over smiles",
            "d": {
                f: (plan["visit_d"][f] if f != TOTAL or plan["planted_total"] else _f(plan["total_d"]))
                for f in FEATURES
            },
            "d_planted": {
                f: (f != TOTAL and plan["visit_d"][f] != 0) or (f == TOTAL and bool(plan["planted_total"]))
                for f in FEATURES
            },
            "multiplier_12mo": {f: _f(plan["mult"][f]) for f in PRIMARY},
            "total_d_implied": _f(plan["total_d"]),
            "variance_ratio_6_over_12": {f: _f(1 / plan["mult"][f] ** 2) for f in PRIMARY},
            "se_inflation": imp["se_inflation"],
            "se_inflation_note": "true SE of d ~ expected_d_se(n6, n12, d) * se_inflation: "
            "smiles of one mother are correlated (shared score latent, "
            "random effect) and her smile count varies",
        },
        "score_effect": {
            "anchor": plan["anchor"],
            "ramp_k": ramp,
            "rule": "r_k = r_max * min(1, k / ramp_k): observed Pearson r between the feature "
            "of the k-th smile of a session and the anchor score of that visit",
            "k": k_labels,
            "r_max": {f: r for f, r in plan["r_max"].items() if r},
            "r_k": {f: list(map(_f, plan["r_k"][f])) for f in PRIMARY if plan["r_max"][f]},
            "latent_loading_k": {f: list(map(_f, plan["b_k"][f])) for f in PRIMARY if plan["r_max"][f]},
            "implied_r_k": imp["correlation"],
        },
        "anova": imp["anova"],
    }


# -- output -------------------------------------------------------------------------


def write(cohort: Cohort, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write scores.csv, smiles.csv and truth.json into out_dir (created);
    each file appears whole or not at all (temporary name, then rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"scores": out / "scores.csv", "smiles": out / "smiles.csv", "truth": out / "truth.json"}
    payloads = {
        "scores": lambda p: cohort.scores.to_csv(p, index=False),
        "smiles": lambda p: cohort.smiles.to_csv(p, index=False),
        "truth": lambda p: p.write_text(json.dumps(cohort.truth, indent=2, allow_nan=False)),
    }
    for name, path in paths.items():
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            payloads[name](tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m services.stats.simulate", description="Simulate a cohort with known planted effects."
    )
    ap.add_argument("out_dir")
    ap.add_argument("--participants", type=int, default=94)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--effects", choices=["paper", "null", "strong"], default="paper")
    ap.add_argument("--missing-rate", type=float, default=0.0)
    a = ap.parse_args(argv)
    try:
        cohort = simulate(a.participants, a.seed, getattr(Effects, a.effects)(), missing_rate=a.missing_rate)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in write(cohort, a.out_dir).values():
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
