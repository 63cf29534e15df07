"""The sliding-window MLP of "Behind the Smile" (Sections III.C, III.D; Table II).

What is modelled
----------------
For one score (PHQ-9, ACEs, PSS, PEARLS, Social Support) and one window size
``w`` (1..5), every run of ``w`` consecutive smiles of a session (participant,
visit) gives one sample: the mean of the 8 smile features (``FEATURES``) over
the window ("We calculated the mean of maternal smile features over each of
these windows"), with the session's score as target. "Consecutive" means
consecutive in ``smile_id`` order (gaps in the numbering, e.g. after
speech-confounded smiles were removed, are not breaks). Sessions with fewer
than ``w`` smiles give no sample for ``w``; sessions whose score is missing
are excluded and counted (``excluded``); a window containing a missing
feature value is dropped and counted in ``notes``.

Network (Section III.D): FC32-ReLU-FC32-ReLU-FC8-ReLU-Linear(1). The paper's
"a final layer of 8 neurons, and linear outputs were collected through a ReLU
activation function" is read as: the 8-unit bottleneck has a ReLU and the
regression output is a plain linear unit, as in a Keras ``Dense(8,
activation="relu")`` followed by ``Dense(1)``. A ReLU *on* the output would
clamp predictions at 0 and, once the output unit is negative for every input,
stop all gradients (a dead regression head); with standardised targets (below)
it could not even represent below-mean scores. Initialisation follows Keras'
defaults (Glorot-uniform weights, zero biases); optimiser Adam (lr 1e-3,
betas 0.9/0.999, eps 1e-8, PyTorch's update formula), loss MSE.

Standardisation: inputs are z-scored with the training fold's mean/SD, and so
is the target; predictions are mapped back and every error is reported in
score units. Standardising the target makes the fixed learning rate and the
50-200 epoch budget mean the same thing for a 0-10 scale (PEARLS, SD 0.9) and
a 0-100 scale (Social Support, mean 83): unstandardised, a network starting
near 0 spends its first epochs just climbing to Social Support's mean, so the
epoch grid would measure the scale of the score rather than the relation.
Standardised, an untrained network already predicts about the training mean,
i.e. it starts at the baseline.

Mini-batches: 32 samples, reshuffled every epoch, last batch partial and
averaged over its own size - Keras' ``fit`` defaults, which the paper's
"epochs" vocabulary suggests the authors used.

Evaluation
----------
Cross-validation folds are grouped by participant: a seeded shuffle of the
participant ids (``participant_folds``) deals them round-robin into ``folds``
folds, so both visits of a mother and all her windows are in the same fold
(windows of one session share its target and overlap in smiles; splitting
them across folds would leak). The same partition is used for every score and
window of a seed. Per (score, window, epochs, seed): fold MSE and MAE over the
fold's test windows, averaged over folds; RMSE = sqrt(that mean MSE). The grid
reports means over seeds (and SD across seeds). The (window, epochs) with the
minimum mean CV MSE is selected (the paper says MSE in Section IV.A and "mean
average error" in III.C; ``criterion`` switches); ties go to the smaller
window, then fewer epochs.

Baseline: predict the training fold's mean target (same folds, same windows)
- a network that does not beat it has learned nothing from the smiles.

Hold-out (the paper's "Out of the total of 94 mothers, we used 75 for model
training and the remaining 19 for model testing"): per seed, a seeded split of
*participants* with round(P * 19/94) of them in the test set - 19 of 94
mothers, each with both visits, when P = 94 (the paper's 94 are mothers; with
two visits each, we keep the mother as the unit so her two visits never
straddle the split). After CV selection, the selected window is trained on the
other participants (one run, scored at every epoch count; the table reports
the selected count) and tested on them; mean over seeds (and SD), with the
same split's mean-target baseline. CV selection saw all participants, so this
is the paper's protocol, not an unbiased estimate of the selected
configuration; the baseline is the honest check.

``excluded`` counts the sessions that have smiles but no value for the score.

Speed
-----
All CV fits (scores x windows x seeds x folds) train as stacked networks: fits
are sorted by mini-batches per epoch and chunked into groups of ``group_size``;
a group's parameters are (G, a, b) stacks, the forward pass is ``baddbmm``,
the backward pass is written out by hand (``bmm`` straight into the gradient
stacks) and Adam is PyTorch's fused kernel. At the k-th mini-batch of an epoch
the fits that still have one are a prefix of the stack and the step runs on
that prefix only, with one Adam step counter per bucket of fits with the same
batch count - so every fit takes exactly its own ceil(n/32) Adam steps per
epoch, as if trained alone (``tests/test_mlp.py`` checks a batched fit against
``torch.nn.Sequential`` + ``torch.optim.Adam`` on the same initial weights and
batches). An epoch of a group is one TorchScript call (no interpreter between
the ~30 small ops of a step, GIL released), and two worker threads train groups
side by side, each single-threaded inside. The epoch counts are prefixes of one
run of ``max(epochs)`` epochs (same seed, same batch order): test errors are
taken at each count. Each fit's initial weights and batch orders come from its
own random stream keyed by (seed, score, window, split), so a fit's result
does not depend on what it was batched with. The default grid (2,500 CV fits =
625 networks x 4 epoch counts, plus 25 hold-out networks) at 94 participants
takes ~15 s on 2 cores (``scripts/bench_mlp.py``).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from .scores import FEATURES, KEYS, SCALES, SCORE_COLUMNS

FEATURE_COLUMNS = list(FEATURES)
N_FEATURES = len(FEATURE_COLUMNS)
#: the paper's hold-out: 19 of 94 mothers for testing
HOLDOUT_FRACTION = 19 / 94
HOLDOUT = -1  # split code of the hold-out fit
HIDDEN = (32, 32, 8)  # FC32-FC32-FC8, then Linear(1)

_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8
_ORDER_CHUNK = 25  # epochs of batch orders drawn at a time per fit

TABLE_COLUMNS = [
    "score",
    "best_window",
    "best_epochs",
    "mae",
    "mae_sd",
    "rmse",
    "rmse_sd",
    "baseline_mae",
    "baseline_rmse",
    "holdout_mae",
    "holdout_rmse",
    "n_sessions",
    "n_samples",
    "excluded",
]
GRID_COLUMNS = [
    "score",
    "window",
    "epochs",
    "mse",
    "mse_sd",
    "mae",
    "mae_sd",
    "rmse",
    "rmse_sd",
    "baseline_mse",
    "baseline_mae",
    "baseline_rmse",
    "n_sessions",
    "n_samples",
    "excluded",
]


@dataclasses.dataclass
class MlpResult:
    #: Table II: one row per score (``TABLE_COLUMNS`` first, then extras)
    table: pd.DataFrame
    #: every (score, window, epochs): mean CV errors over seeds (and SD across seeds)
    grid: pd.DataFrame
    #: every fit and epoch count: score, window, seed, split (fold, or -1 = hold-out),
    #: epochs, mse, mae, baseline_mse, baseline_mae, n_train, n_test
    runs: pd.DataFrame
    notes: list[str]
    config: dict
    seconds: float


# -- samples -------------------------------------------------------------------------------
def _sessions(joined: pd.DataFrame) -> pd.DataFrame:
    need = KEYS + ["smile_id"] + FEATURE_COLUMNS
    missing = [c for c in need if c not in joined.columns]
    if missing:
        raise ValueError(f"joined table is missing columns: {', '.join(missing)}")
    df = joined.sort_values(KEYS + ["smile_id"], kind="stable").reset_index(drop=True)
    df["participant_id"] = df["participant_id"].astype(str)
    return df


def window_samples(
    joined: pd.DataFrame, window: int, scores: Sequence[str] = SCORE_COLUMNS
) -> tuple[pd.DataFrame, int]:
    """Every run of ``window`` consecutive smiles of every session: (table, windows dropped).

    The table has ``participant_id, visit_month, first_smile, last_smile``, the
    window means of the 8 features, and the session's scores (NaN where
    missing). Windows containing a missing feature value are dropped (counted)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    df = _sessions(joined)
    feats = df[FEATURE_COLUMNS].to_numpy(np.float64)
    sess = df.groupby(KEYS, sort=False).ngroup().to_numpy()
    n = len(df)
    # start i is valid when smile i+window-1 exists and belongs to the same session
    last = np.arange(n) + window - 1
    ok = last < n
    ok[ok] &= sess[last[ok]] == sess[np.flatnonzero(ok)]
    starts = np.flatnonzero(ok)
    acc = np.zeros((len(starts), N_FEATURES))
    for k in range(window):
        acc += feats[starts + k]
    means = acc / window
    finite = np.isfinite(means).all(axis=1)
    dropped = int((~finite).sum())
    starts, means = starts[finite], means[finite]
    out = pd.DataFrame(
        {
            "participant_id": df["participant_id"].to_numpy()[starts],
            "visit_month": df["visit_month"].to_numpy()[starts],
            "first_smile": df["smile_id"].to_numpy()[starts],
            "last_smile": df["smile_id"].to_numpy()[starts + window - 1],
        }
    )
    for j, c in enumerate(FEATURE_COLUMNS):
        out[c] = means[:, j]
    for s in scores:
        out[s] = (
            pd.to_numeric(df[s], errors="coerce").to_numpy(np.float64)[starts] if s in df.columns else np.nan
        )
    return out, dropped


# -- splits --------------------------------------------------------------------------------
def participant_folds(participants: Iterable[str], folds: int, seed: int) -> dict[str, int]:
    """Fold (0..folds-1) per participant: a seeded shuffle of the sorted ids dealt round-robin."""
    ids = sorted(set(map(str, participants)))
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if len(ids) < folds:
        raise ValueError(f"{len(ids)} participant(s) cannot fill {folds} folds")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xF01D]))
    perm = rng.permutation(len(ids))
    return {ids[p]: i % folds for i, p in enumerate(perm)}


def holdout_participants(
    participants: Iterable[str], seed: int, fraction: float = HOLDOUT_FRACTION
) -> set[str]:
    """The seed's hold-out test participants: round(P * fraction) of them (>= 1, < P)."""
    ids = sorted(set(map(str, participants)))
    if len(ids) < 2:
        raise ValueError("a hold-out split needs at least 2 participants")
    k = min(max(1, int(round(len(ids) * fraction))), len(ids) - 1)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x401D]))
    return {ids[i] for i in rng.permutation(len(ids))[:k]}


# -- one fit's random streams --------------------------------------------------------------
def fit_key(seed: int, score: str, window: int, split: int) -> tuple[int, int, int, int]:
    """The random-stream key of one fit (independent of how fits are batched)."""
    return (int(seed), zlib.crc32(score.encode()), int(window), int(split) % (1 << 32))


def _layout() -> list[tuple[str, tuple[int, int], int]]:
    """(name, shape, offset) of each parameter in a fit's flat parameter vector."""
    dims = (N_FEATURES, *HIDDEN, 1)
    out, off = [], 0
    for i in range(len(dims) - 1):
        for name, shape in ((f"W{i + 1}", (dims[i], dims[i + 1])), (f"b{i + 1}", (1, dims[i + 1]))):
            out.append((name, shape, off))
            off += shape[0] * shape[1]
    return out


LAYOUT = _layout()
N_PARAMS = sum(s[0] * s[1] for _, s, _ in LAYOUT)


def init_params(key: Sequence[int]) -> np.ndarray:
    """A fit's initial flat parameter vector: Glorot-uniform weights, zero biases (Keras)."""
    rng = np.random.default_rng(np.random.SeedSequence([*key, 0]))
    out = np.zeros(N_PARAMS)
    for name, (a, b), off in LAYOUT:
        if name.startswith("W"):
            lim = math.sqrt(6.0 / (a + b))
            out[off : off + a * b] = rng.uniform(-lim, lim, a * b)
    return out


def batch_orders(key: Sequence[int], n: int, n_epochs: int) -> Iterator[np.ndarray]:
    """A fit's per-epoch shuffles of its ``n`` training samples, ``_ORDER_CHUNK`` epochs at a time."""
    rng = np.random.default_rng(np.random.SeedSequence([*key, 1]))
    base = np.arange(n, dtype=np.int64)
    for e0 in range(0, n_epochs, _ORDER_CHUNK):
        m = min(_ORDER_CHUNK, n_epochs - e0)
        yield rng.permuted(np.broadcast_to(base, (m, n)), axis=1)


# -- batched training ----------------------------------------------------------------------
@dataclasses.dataclass
class Fit:
    """One network to train: raw (unstandardised) training and test data."""

    key: tuple[int, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    #: participant id of every training / test sample (for auditing the split)
    train_groups: np.ndarray | None = None
    test_groups: np.ndarray | None = None


def _standardise(fit: Fit) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    mu = fit.x_train.mean(axis=0)
    sd = fit.x_train.std(axis=0)
    sd[~(sd > 1e-12)] = 1.0
    ym = float(fit.y_train.mean())
    ys = float(fit.y_train.std())
    if not ys > 1e-12:
        ys = 1.0
    return (fit.x_train - mu) / sd, (fit.y_train - ym) / ys, (fit.x_test - mu) / sd, ym, ys


def _epoch(
    Xe: torch.Tensor,
    NYW: torch.Tensor,
    Wl: torch.Tensor,
    views: list[list[torch.Tensor]],
    adam: list[list[torch.Tensor]],
    S: torch.Tensor,
    mi: list[int],
    nab: list[int],
    B: int,
    lr: float,
) -> None:
    """One epoch of every fit in a group: forward, hand-written backward, Adam.

    ``Xe``/``NYW``/``Wl``: (G, NB*B, .) this epoch's shuffled inputs, -y*2/n_batch and
    2/n_batch. At mini-batch k the fits that still have a k-th batch are the first
    rows (fits are sorted by batches per epoch); ``views[mi[k]]`` are the parameter,
    gradient and activation stacks cut to those rows, ``adam[5*mi[k]:5*mi[k]+5]`` the
    fused-Adam tensor lists (one tensor per parameter block per bucket of fits with
    the same batch count, so each bucket carries its own step count ``S[j]``), and
    ``nab[k]`` the number of buckets still stepping. Compiled with TorchScript when
    available (one call per epoch, no Python between the ops, GIL released), else
    run as plain Python - the same ops either way."""
    for k in range(len(mi)):
        v = views[mi[k]]
        M = v[0].shape[0]
        b1, W1, b2, W2, b3, W3, b4, W4 = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
        gb1, gW1, gb2, gW2, gb3, gW3, gb4, gW4 = v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]
        A1, A2, A3, D1, D2, D3, D4 = v[16], v[17], v[18], v[19], v[20], v[21], v[22]
        xb = Xe[:M, k * B : (k + 1) * B]
        # forward
        torch.baddbmm(b1, xb, W1, out=A1).clamp_min_(0.0)
        torch.baddbmm(b2, A1, W2, out=A2).clamp_min_(0.0)
        torch.baddbmm(b3, A2, W3, out=A3).clamp_min_(0.0)
        torch.baddbmm(b4, A3, W4, out=D4)
        torch.addcmul(NYW[:M, k * B : (k + 1) * B], D4, Wl[:M, k * B : (k + 1) * B], out=D4)
        # backward (dLoss/dout = 2 (out - y) / batch size), straight into the gradient stacks
        torch.bmm(A3.transpose(1, 2), D4, out=gW4)
        torch.sum(D4, [1], True, out=gb4)
        torch.mul(D4, W4.transpose(1, 2), out=D3)
        torch.ops.aten.threshold_backward(D3, A3, 0.0, grad_input=D3)
        torch.bmm(A2.transpose(1, 2), D3, out=gW3)
        torch.sum(D3, [1], True, out=gb3)
        torch.bmm(D3, W3.transpose(1, 2), out=D2)
        torch.ops.aten.threshold_backward(D2, A2, 0.0, grad_input=D2)
        torch.bmm(A1.transpose(1, 2), D2, out=gW2)
        torch.sum(D2, [1], True, out=gb2)
        torch.bmm(D2, W2.transpose(1, 2), out=D1)
        torch.ops.aten.threshold_backward(D1, A1, 0.0, grad_input=D1)
        torch.bmm(xb.transpose(1, 2), D1, out=gW1)
        torch.sum(D1, [1], True, out=gb1)
        # Adam (PyTorch's fused kernel = torch.optim.Adam's formula), per-bucket step counts
        S[: nab[k]].add_(1.0)
        j = 5 * mi[k]
        torch._fused_adam_(
            adam[j],
            adam[j + 1],
            adam[j + 2],
            adam[j + 3],
            [],
            adam[j + 4],
            lr=lr,
            beta1=0.9,
            beta2=0.999,
            weight_decay=0.0,
            eps=1e-8,
            amsgrad=False,
            maximize=False,
        )


def _compiled_epoch():
    """``_epoch`` compiled by TorchScript (deprecated upstream but the only way to run a
    loop of small ops without the interpreter and the GIL); plain ``_epoch`` if that fails."""
    global _EPOCH
    if _EPOCH is None:
        with _EPOCH_LOCK:
            if _EPOCH is None:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        _EPOCH = torch.jit.script(_epoch)
                except Exception:  # noqa: BLE001 - TorchScript missing or changed: same ops
                    _EPOCH = _epoch
    return _EPOCH


_EPOCH = None
_EPOCH_LOCK = threading.Lock()
assert (_BETA1, _BETA2, _EPS) == (0.9, 0.999, 1e-8)  # spelled out in _epoch for TorchScript


def train_fits(
    fits: Sequence[Fit],
    epochs: Sequence[int],
    *,
    batch_size: int = 32,
    lr: float = 1e-3,
    dtype: torch.dtype = torch.float32,
    group_size: int = 64,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
    compiled: bool = True,
) -> list[np.ndarray]:
    """Train every fit; per fit an array (len(epochs), n_test) of test predictions in score
    units after each epoch count (prefixes of one run of max(epochs) epochs).

    Fits are sorted by mini-batches per epoch and chunked into groups of
    ``group_size`` stacked networks; ``workers`` threads train groups concurrently,
    each group single-threaded inside (torch's intra-op threads are set to 1 for the
    duration): a stacked step's ops take tens of microseconds, too little to split
    across cores, and intra-op threads spin-wait at every op, which collapses
    (measured 30x slower) as soon as another process holds a core. Denormals are
    flushed to zero in the worker threads (Adam's first moment of a dead ReLU unit
    decays geometrically into the denormal range, where float ops cost ~100x).
    ``progress(k)`` is called with k model-epochs just completed (serialised)."""
    epochs = sorted(set(int(e) for e in epochs))
    if not epochs or epochs[0] < 1:
        raise ValueError(f"epoch counts must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for f in fits:
        if len(f.y_train) < 1:
            raise ValueError(f"fit {f.key} has no training samples")
    order = sorted(range(len(fits)), key=lambda i: -len(fits[i].y_train))
    size = max(1, group_size)
    n_groups = min(len(order), max(-(-len(order) // size), max(1, workers)))  # >= 1 per worker
    groups = [list(c) for c in np.array_split(np.array(order, dtype=int), n_groups)] if order else []
    out: list[np.ndarray] = [np.empty((len(epochs), 0))] * len(fits)
    lock = threading.Lock()
    epoch_fn = _compiled_epoch() if compiled else _epoch

    def tick(k: int) -> None:
        assert progress is not None  # tick is handed on only when there is a progress
        with lock:
            progress(k)

    def work(idx: list[int]) -> None:
        torch.set_flush_denormal(True)  # this worker thread only
        torch.set_num_threads(1)  # OpenMP thread counts are per calling thread
        preds = _train_group(
            [fits[i] for i in idx],
            epochs,
            batch_size,
            lr,
            dtype,
            tick if progress is not None else None,
            epoch_fn,
        )
        for i, p in zip(idx, preds):
            out[i] = p

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="mlp") as pool:
            for fut in [pool.submit(work, g) for g in groups]:  # biggest groups first
                fut.result()
    finally:
        torch.set_num_threads(prev)
    return out


def _train_group(
    fits: Sequence[Fit], epochs: list[int], B: int, lr: float, dtype: torch.dtype, progress, epoch_fn
) -> list[np.ndarray]:
    """Train one group of stacked networks (sorted by mini-batches per epoch, descending)."""
    G = len(fits)
    n = np.array([len(f.y_train) for f in fits])
    nt = np.array([len(f.y_test) for f in fits])
    nb = -(-n // B)  # mini-batches per epoch, per fit
    if (np.diff(nb) > 0).any():
        raise ValueError("a group's fits must be sorted by mini-batches per epoch")
    NB, Nmax, Tmax = int(nb[0]), int(n.max()), max(1, int(nt.max()))
    L = NB * B
    active = [int((nb > k).sum()) for k in range(NB)]  # fits with a k-th batch: a prefix
    bucket_nb, bucket_start = np.unique(-nb, return_index=True)
    bucket_nb = -bucket_nb  # descending batch counts
    bucket_end = np.append(bucket_start[1:], G)

    xtr = np.zeros((G, Nmax, N_FEATURES))
    ytr = np.zeros((G, Nmax))
    xte = np.zeros((G, Tmax, N_FEATURES))
    ym, ys = np.zeros(G), np.ones(G)
    wl = np.zeros((G, L))  # 2 / (size of the sample's batch)
    for g, f in enumerate(fits):
        x_tr, y_tr, x_te, ym[g], ys[g] = _standardise(f)
        xtr[g, : n[g]], ytr[g, : n[g]], xte[g, : nt[g]] = x_tr, y_tr, x_te
        pos = np.arange(n[g])
        wl[g, : n[g]] = 2.0 / np.minimum(B, n[g] - (pos // B) * B)
    t: dict[str, Any] = dict(dtype=dtype)
    Xflat = torch.from_numpy(xtr.reshape(G * Nmax, N_FEATURES)).to(**t)
    Yflat = torch.from_numpy(ytr.reshape(G * Nmax, 1)).to(**t)
    Xte = torch.from_numpy(xte).to(**t)
    Wl = torch.from_numpy(wl).to(**t).unsqueeze(-1)
    negWl = -Wl
    Xe = torch.empty(G, L, N_FEATURES, **t)  # this epoch's shuffled samples
    Ye = torch.empty(G, L, 1, **t)
    NYW = torch.empty(G, L, 1, **t)  # -y * 2/n_batch for this epoch

    # parameters layer-major: each parameter of all G fits is one contiguous (G, a, b)
    # stack, so a prefix of fits is contiguous too (bmm writes gradients in place)
    init = np.stack([init_params(f.key) for f in fits])  # (G, N_PARAMS) fit-major
    P = torch.empty(G * N_PARAMS, **t)
    Gr, Mo, Vo = torch.zeros_like(P), torch.zeros_like(P), torch.zeros_like(P)
    names = ["b1", "W1", "b2", "W2", "b3", "W3", "b4", "W4"]
    blocks: dict[str, tuple[torch.Tensor, ...]] = {}
    o2 = 0
    for nm, (a, b), off in LAYOUT:
        blocks[nm] = tuple(x[o2 : o2 + G * a * b].view(G, a, b) for x in (P, Gr, Mo, Vo))
        blocks[nm][0].copy_(torch.from_numpy(init[:, off : off + a * b].reshape(G, a, b)))
        o2 += G * a * b
    acts = [torch.empty(G, B, h, **t) for h in HIDDEN] + [torch.empty(G, B, h, **t) for h in (*HIDDEN, 1)]
    S = torch.zeros(len(bucket_nb), dtype=torch.float32)  # Adam step per bucket
    views: list[list[torch.Tensor]] = []
    adam: list[list[torch.Tensor]] = []
    m_index: dict[int, int] = {}
    for M in sorted(set(active)):
        m_index[M] = len(views)
        views.append(
            [blocks[k][0][:M] for k in names] + [blocks[k][1][:M] for k in names] + [x[:M] for x in acts]
        )
        nbk = int((bucket_start < M).sum())
        for part in range(4):
            adam.append([blocks[k][part][bucket_start[j] : bucket_end[j]] for j in range(nbk) for k in names])
        adam.append([S[j] for j in range(nbk) for _ in names])
    mi = [m_index[M] for M in active]
    nab = [int((bucket_nb > k).sum()) for k in range(NB)]

    streams = [batch_orders(f.key, int(n[g]), epochs[-1]) for g, f in enumerate(fits)]
    offsets = (np.arange(G) * Nmax)[:, None]
    preds = [np.empty((len(epochs), nt[g])) for g in range(G)]
    checkpoints = {e: i for i, e in enumerate(epochs)}
    b1, W1, b2, W2, b3, W3, b4, W4 = (blocks[k][0] for k in names)
    chunk: torch.Tensor | None = None
    for e in range(epochs[-1]):
        if e % _ORDER_CHUNK == 0:
            m = min(_ORDER_CHUNK, epochs[-1] - e)
            o = np.zeros((m, G, L), np.int64)
            for g, st in enumerate(streams):
                o[:, g, : n[g]] = next(st)
            o += offsets  # padded slots point at the fit's row 0
            chunk = torch.from_numpy(o.reshape(m, G * L))
        assert chunk is not None  # made at e == 0
        flat = chunk[e % _ORDER_CHUNK]
        torch.index_select(Xflat, 0, flat, out=Xe.view(G * L, N_FEATURES))
        torch.index_select(Yflat, 0, flat, out=Ye.view(G * L, 1))
        torch.mul(Ye, negWl, out=NYW)
        epoch_fn(Xe, NYW, Wl, views, adam, S, mi, nab, B, lr)
        if e + 1 in checkpoints:
            z = torch.baddbmm(b1, Xte, W1).clamp_min_(0)
            z = torch.baddbmm(b2, z, W2).clamp_min_(0)
            z = torch.baddbmm(b3, z, W3).clamp_min_(0)
            zn = torch.baddbmm(b4, z, W4)[..., 0].to(torch.float64).numpy()
            j = checkpoints[e + 1]
            for g in range(G):
                preds[g][j] = zn[g, : nt[g]] * ys[g] + ym[g]
        if progress is not None:
            progress(G)
    return preds


# -- the grid ------------------------------------------------------------------------------
def _metrics(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if len(y) == 0:
        return math.nan, math.nan
    err = pred - y
    return float(np.mean(err**2)), float(np.mean(np.abs(err)))


def run_grid(
    joined: pd.DataFrame,
    scores: Sequence[str] = SCORE_COLUMNS,
    windows: Iterable[int] = range(1, 6),
    epochs: Sequence[int] = (50, 100, 150, 200),
    seeds: Iterable[int] = range(5),
    folds: int = 5,
    progress: Callable[[int, int], None] | None = None,
    *,
    batch_size: int = 32,
    lr: float = 1e-3,
    holdout: bool = True,
    criterion: str = "mse",
    group_size: int = 64,
    threads: int = 2,
    dtype: torch.dtype = torch.float32,
) -> MlpResult:
    """Table II: the sliding-window MLP over windows x epochs x seeds x grouped folds.

    ``joined`` is ``scores.join``'s output (one row per smile with its session's
    scores). ``progress(done, total)`` streams model-epochs trained (one network
    trained for max(epochs) epochs is max(epochs) units; its shorter epoch counts
    are prefixes of that run): CV networks, then the hold-out networks. It is
    called from the worker threads (serialised), so it must not block.

    ``threads`` worker threads train groups of ``group_size`` stacked networks;
    ``batch_size``/``lr`` are the Keras defaults; ``criterion`` ("mse" or "mae")
    picks the (window, epochs); ``holdout=False`` skips the 75/19 evaluation;
    ``dtype=torch.float64`` trains in double precision (slower)."""
    t0 = time.perf_counter()
    scores, windows = list(scores), sorted(set(int(w) for w in windows))
    epochs, seeds = sorted(set(int(e) for e in epochs)), [int(s) for s in seeds]
    unknown = [s for s in scores if s not in SCALES]
    if unknown:
        raise ValueError(f"unknown score(s): {', '.join(unknown)}; known: {', '.join(SCALES)}")
    missing = [s for s in scores if s not in joined.columns]
    if missing:
        raise ValueError(f"joined table is missing score column(s): {', '.join(missing)}")
    if not scores or not windows or not epochs or not seeds:
        raise ValueError("scores, windows, epochs and seeds must each be non-empty")
    if windows[0] < 1 or epochs[0] < 1:
        raise ValueError("windows and epochs must be >= 1")
    if criterion not in ("mse", "mae"):
        raise ValueError(f"criterion must be 'mse' or 'mae', got {criterion!r}")

    df = _sessions(joined)
    participants = sorted(df["participant_id"].unique())
    fold_of = {s: participant_folds(participants, folds, s) for s in seeds}
    test_of = {s: holdout_participants(participants, s) for s in seeds} if holdout else {}
    sess = df.drop_duplicates(KEYS)
    notes: list[str] = []
    excluded = {}
    for s in scores:
        excluded[s] = int(pd.to_numeric(sess[s], errors="coerce").isna().sum())
        if excluded[s]:
            notes.append(f"{SCALES[s].label}: {excluded[s]} session(s) with a missing score excluded")

    data: dict[int, tuple[np.ndarray, np.ndarray, pd.DataFrame]] = {}
    counts: dict[tuple[str, int], tuple[int, int, int]] = {}
    for w in windows:
        samples, dropped = window_samples(df, w, scores)
        if dropped:
            notes.append(f"window {w}: {dropped} window(s) with a missing feature value dropped")
        pid = samples["participant_id"].to_numpy()
        data[w] = (samples[FEATURE_COLUMNS].to_numpy(np.float64), pid, samples)
        for s in scores:
            ok = np.isfinite(samples[s].to_numpy())
            counts[(s, w)] = (
                int(samples.loc[ok, KEYS].drop_duplicates().shape[0]),
                int(ok.sum()),
                len(set(pid[ok])),
            )
            if not ok.any():
                notes.append(f"{SCALES[s].label}, window {w}: no samples")

    def build(jobs):
        """jobs: (score, window, seed, split, test-mask) -> fits and their bookkeeping rows."""
        fits, meta = [], []
        for s, w, seed, split, is_test in jobs:
            X, pid, samples = data[w]
            y = samples[s].to_numpy()
            ok = np.isfinite(y)
            tr, te = ok & ~is_test, ok & is_test
            if tr.sum() < 2 or te.sum() < 1:
                meta.append((s, w, seed, split, int(tr.sum()), int(te.sum()), None))
                continue
            bmse, bmae = _metrics(np.full(te.sum(), y[tr].mean()), y[te])
            meta.append((s, w, seed, split, int(tr.sum()), int(te.sum()), (bmse, bmae)))
            fits.append(Fit(fit_key(seed, s, w, split), X[tr], y[tr], X[te], y[te], pid[tr], pid[te]))
        return fits, meta

    cv_jobs = []
    for w in windows:
        pid = data[w][1]
        for seed in seeds:
            fold = np.array([fold_of[seed][p] for p in pid], dtype=int)
            cv_jobs += [(s, w, seed, k, fold == k) for s in scores for k in range(folds)]
    cv_fits, cv_meta = build(cv_jobs)
    n_ho = len(scores) * len(seeds) if holdout else 0
    total = (len(cv_fits) + n_ho) * epochs[-1]
    done = [0]
    if progress is not None:
        progress(0, total)

    def tick(k: int) -> None:
        assert progress is not None  # tick is handed on only when there is a progress
        done[0] += k
        progress(done[0], total)

    train: dict[str, Any]
    train = dict(
        batch_size=batch_size,
        lr=lr,
        dtype=dtype,
        group_size=group_size,
        workers=threads or 1,
        progress=tick if progress else None,
    )
    runs = _runs(cv_meta, cv_fits, train_fits(cv_fits, epochs, **train), epochs)
    grid = _grid(runs, counts, excluded)
    best = _select(grid, criterion, scores)

    if holdout:  # the paper's 75/19 split, for the selected window of each score
        ho_jobs = []
        for s, (w, _) in best.items():
            pid = data[w][1]
            ho_jobs += [(s, w, seed, HOLDOUT, np.isin(pid, sorted(test_of[seed]))) for seed in seeds]
        ho_fits, ho_meta = build(ho_jobs)
        runs = pd.concat(
            [runs, _runs(ho_meta, ho_fits, train_fits(ho_fits, epochs, **train), epochs)], ignore_index=True
        )
        if progress is not None and done[0] < total:
            progress(total, total)
    table = _table(grid, runs, best, counts, excluded, scores, holdout)
    for s in scores:
        if s not in best:
            notes.append(f"{SCALES[s].label}: no window had enough samples for {folds}-fold CV")
    config = dict(
        scores=scores,
        windows=windows,
        epochs=epochs,
        seeds=seeds,
        folds=folds,
        batch_size=batch_size,
        lr=lr,
        holdout=holdout,
        holdout_fraction=HOLDOUT_FRACTION if holdout else None,
        criterion=criterion,
        hidden=HIDDEN,
        cv_fits=len(cv_fits),
        participants=len(participants),
        threads=threads,
        group_size=group_size,
        dtype=str(dtype),
        torchscript=_compiled_epoch() is not _epoch,
    )
    return MlpResult(table, grid, runs, notes, config, time.perf_counter() - t0)


RUN_COLUMNS = [
    "score",
    "window",
    "seed",
    "split",
    "epochs",
    "mse",
    "mae",
    "baseline_mse",
    "baseline_mae",
    "n_train",
    "n_test",
]


def _runs(meta, fits, preds, epochs) -> pd.DataFrame:
    rows, it = [], iter(zip(fits, preds))
    for s, w, seed, split, ntr, nte, base in meta:
        if base is None:
            rows += [(s, w, seed, split, e, math.nan, math.nan, math.nan, math.nan, ntr, nte) for e in epochs]
            continue
        f, p = next(it)
        for j, e in enumerate(epochs):
            mse, mae = _metrics(p[j], f.y_test)
            rows.append((s, w, seed, split, e, mse, mae, base[0], base[1], ntr, nte))
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def _select(grid: pd.DataFrame, criterion: str, scores) -> dict[str, tuple[int, int]]:
    """Per score: the (window, epochs) with the smallest mean CV criterion (ties: smaller
    window, then fewer epochs)."""
    out = {}
    for s in scores:
        g = grid[(grid["score"] == s) & grid[criterion].notna()]
        if len(g):
            b = g.sort_values([criterion, "window", "epochs"], kind="stable").iloc[0]
            out[s] = (int(b["window"]), int(b["epochs"]))
    return out


def _per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (score, window, epochs, seed): fold means of MSE/MAE; RMSE = sqrt(mean MSE)."""
    ps = (
        runs.groupby(["score", "window", "epochs", "seed"], sort=True)[
            ["mse", "mae", "baseline_mse", "baseline_mae"]
        ]
        .mean()
        .reset_index()
    )
    ps["rmse"] = np.sqrt(ps["mse"])
    ps["baseline_rmse"] = np.sqrt(ps["baseline_mse"])
    return ps


def _grid(runs: pd.DataFrame, counts, excluded) -> pd.DataFrame:
    cv = runs[runs["split"] != HOLDOUT]
    ps = _per_seed(cv)
    agg = (
        ps.groupby(["score", "window", "epochs"], sort=False)
        .agg(
            mse=("mse", "mean"),
            mse_sd=("mse", "std"),
            mae=("mae", "mean"),
            mae_sd=("mae", "std"),
            rmse=("rmse", "mean"),
            rmse_sd=("rmse", "std"),
            baseline_mse=("baseline_mse", "mean"),
            baseline_mae=("baseline_mae", "mean"),
            baseline_rmse=("baseline_rmse", "mean"),
        )
        .reset_index()
    )
    agg["n_sessions"] = [counts[(s, w)][0] for s, w in zip(agg["score"], agg["window"])]
    agg["n_samples"] = [counts[(s, w)][1] for s, w in zip(agg["score"], agg["window"])]
    agg["excluded"] = [excluded[s] for s in agg["score"]]
    return agg[GRID_COLUMNS]


def _table(
    grid: pd.DataFrame, runs: pd.DataFrame, best: dict, counts, excluded, scores: Sequence[str], holdout: bool
) -> pd.DataFrame:
    ho = _per_seed(runs[runs["split"] == HOLDOUT]) if holdout else None
    rows = []
    for s in scores:
        row = dict(score=s, best_window=np.nan, best_epochs=np.nan)
        if s in best:
            w, e = best[s]
            b = grid[(grid["score"] == s) & (grid["window"] == w) & (grid["epochs"] == e)].iloc[0]
            row.update(
                best_window=w,
                best_epochs=e,
                mse=b["mse"],
                **{c: b[c] for c in ("mae", "mae_sd", "rmse", "rmse_sd", "baseline_mae", "baseline_rmse")},
            )
            row.update(
                n_sessions=counts[(s, w)][0], n_samples=counts[(s, w)][1], n_participants=counts[(s, w)][2]
            )
            if ho is not None:
                h = ho[(ho["score"] == s) & (ho["window"] == w) & (ho["epochs"] == e)]
                row.update(
                    holdout_mae=h["mae"].mean(),
                    holdout_rmse=h["rmse"].mean(),
                    holdout_mae_sd=h["mae"].std(),
                    holdout_rmse_sd=h["rmse"].std(),
                    holdout_baseline_mae=h["baseline_mae"].mean(),
                    holdout_baseline_rmse=h["baseline_rmse"].mean(),
                )
        row["excluded"] = excluded[s]
        rows.append(row)
    table = pd.DataFrame(rows)
    extras = [
        "mse",
        "n_participants",
        "holdout_mae_sd",
        "holdout_rmse_sd",
        "holdout_baseline_mae",
        "holdout_baseline_rmse",
    ]
    for c in TABLE_COLUMNS + extras:
        if c not in table.columns:
            table[c] = np.nan
    table["label"] = [SCALES[s].label for s in table["score"]]
    return table[TABLE_COLUMNS + extras + ["label"]]
