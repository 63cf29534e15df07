"""Inter-coder agreement for smile events: what a methods section reports when
two codings of the same video are compared (two human coders, or dyadlab and
a coder).

A coding is a list of smile events, each a time interval [start_s, end_s] in
seconds on the video's clock (0 = first frame), start_s < end_s. A dyadlab
smile table (or any DataFrame with `start_s` and `end_s` columns) or a list of
`Event` is accepted. Phase columns (`onset_end_s`, `offset_start_s`) and
features may be present; they are carried along, not scored. Coding A is the
reference, coding B is compared against it.

Definitions, exactly as implemented
-----------------------------------
Overlap rule (event matching). The temporal intersection-over-union of two
events is |a ∩ b| / |a ∪ b| (lengths in seconds; 0 when they do not overlap).
A pair is *eligible* when IoU ≥ `min_iou` (compared with a tolerance of 1e-9,
so a pair built to sit exactly on the threshold counts). The default 0.3 is
deliberately lenient: a smile's start and end are soft (intensity rises and
decays gradually, and coders, or a coder and a detector, place them tenths of a
second apart), so for a 1 s smile a 0.3 s disagreement at each end still gives
IoU 0.4/1.6 ≈ 0.45 ≥ 0.3 while events that merely touch do not match; 0.5, the
usual value for objects in images, is available as the stricter rule. Matching
is one-to-one: among all sets of disjoint eligible pairs the one with the most
pairs is chosen, and among those the one with the largest total IoU (the
Hungarian algorithm, `scipy.optimize.linear_sum_assignment`, on the weight
M + IoU for eligible pairs and 0 otherwise, M = min(n_a, n_b) + 1, which makes
the count the first criterion and total IoU the second). Count first because
the event scores below count matches: maximising total IoU alone could keep
one 0.9 pair and drop two 0.4 pairs. Unlike greedy matching (each A event in
time order takes the first free B event it overlaps), this cannot let one long
event take the partner that only a neighbouring event could use.

For a matched pair, onset error = b.start_s − a.start_s and offset error =
b.end_s − a.end_s (positive: B later than A).

Event-level precision, recall, F1 of B against reference A: tp = number of
matched pairs, fp = n_b − tp ("extra": B events with no partner), fn = n_a − tp
("missed": A events with no partner); precision = tp/n_b, recall = tp/n_a,
F1 = 2·tp/(2·tp + fp + fn) (the harmonic mean of precision and recall).
0/0 cases: when both codings are empty, precision = recall = F1 = 1.0 (two
codings that agree there is nothing to code agree perfectly; a note says so);
when only one is empty, the undefined ratio is 0.0 (scikit-learn's
zero_division=0 convention), so every event score is 0.0.

Frame-level Cohen's kappa. Both codings are rasterised on a common grid of
`rate_hz` samples per second: sample k (k = 0, 1, ..., N − 1) is the time
t_k = k / rate_hz, N = ceil(duration_s · rate_hz), i.e. the grid points in
[0, duration_s) (one per video frame at that rate; a point at t = duration_s
would lie after the last frame). duration_s is given, or else the largest
end_s of both codings. A sample is "smiling" in a coding when t_k lies in
[start_s, end_s) of at least one of its events (so overlapping events within
one coding count as their union; events running past duration_s are cut at the
grid's end, with a note; they are matched in full). Comparisons of times with
grid points use a tolerance of 1e-9 sample periods, so 1.2 s at 10 Hz is sample
12 whatever the floating-point rounding. With c_a and c_b the smiling counts,
po = (samples where the codings agree) / N, pe = (c_a·c_b + (N − c_a)(N − c_b)) / N²
(chance agreement from each coding's own marginal), and
kappa = (po − pe) / (1 − pe), computed from the integer counts. When pe = 1
(both codings constant and equal over the grid, e.g. neither smiles) kappa is
1.0 if po = 1 and 0.0 otherwise (po is necessarily 1 then; a note says so).
When the grid is empty (N = 0: no duration and no events) po = kappa = 1.0,
with a note. po (percent agreement, as a proportion), pe and N are reported.

Timing errors over the matched pairs: median, 25th and 75th percentiles (the
IQR is reported as that pair of values) with numpy's default percentile
method (linear interpolation between order statistics, `np.percentile(...,
method="linear")`), and the mean absolute error; NaN when there is no match.

References: J. Cohen (1960), "A coefficient of agreement for nominal scales",
Educational and Psychological Measurement 20(1), 37-46 (kappa). Event-based
evaluation (one-to-one matching of events, then precision/recall/F1 over
events, separately from frame-based measures) as in J. A. Ward, P. Lukowicz
and H. W. Gellersen (2011), "Performance metrics for activity recognition",
ACM Transactions on Intelligent Systems and Technology 2(1), and the
event-based metrics of the sed_eval toolbox (A. Mesaros, T. Heittola and
T. Virtanen (2016), "Metrics for polyphonic sound event detection", Applied
Sciences 6(6), 162), here with an IoU criterion in place of onset/offset
collars.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

DEFAULT_MIN_IOU = 0.3
STRICT_MIN_IOU = 0.5
DEFAULT_RATE_HZ = 30.0
_IOU_TOL = 1e-9  # eligibility: IoU >= min_iou - _IOU_TOL
_GRID_TOL = 1e-9  # in sample periods: a time this close to a grid point is on it


@dataclass(frozen=True)
class Event:
    """One smile event, [start_s, end_s] in seconds; `id` names it in reports."""

    start_s: float
    end_s: float
    id: str = ""

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


Coding: TypeAlias = pd.DataFrame | Sequence[Event]


@dataclass(frozen=True)
class Match:
    """A matched pair: reference event `a`, compared event `b`."""

    a: Event
    b: Event
    iou: float

    @property
    def onset_error_s(self) -> float:
        return self.b.start_s - self.a.start_s

    @property
    def offset_error_s(self) -> float:
        return self.b.end_s - self.a.end_s


@dataclass(frozen=True)
class Matching:
    """The one-to-one matching of coding B against reference A."""

    matches: tuple[Match, ...]
    missed: tuple[Event, ...]  # in A, unmatched (false negatives)
    extra: tuple[Event, ...]  # in B, unmatched (false positives)
    min_iou: float


@dataclass(frozen=True)
class FrameAgreement:
    """Frame-level agreement on the common grid (see the module docstring)."""

    kappa: float
    po: float
    pe: float
    n_samples: int
    rate_hz: float
    duration_s: float
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Agreement:
    """Every agreement number for B against reference A (definitions: module docstring).

    `to_frame()` gives the scalar fields below as one row, in this order (n_a ...
    notes; `notes` joined with "; "); `matches_frame()` the pairs and the
    unmatched events.
    """

    n_a: int
    n_b: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    min_iou: float
    mean_iou: float  # over the matched pairs; NaN without matches
    kappa: float
    po: float  # frame-level percent agreement, as a proportion
    pe: float  # frame-level chance agreement
    n_samples: int
    rate_hz: float
    duration_s: float
    onset_median_s: float
    onset_q25_s: float
    onset_q75_s: float
    onset_mae_s: float
    offset_median_s: float
    offset_q25_s: float
    offset_q75_s: float
    offset_mae_s: float
    notes: tuple[str, ...] = ()
    matches: tuple[Match, ...] = field(default=(), repr=False)
    missed: tuple[Event, ...] = field(default=(), repr=False)
    extra: tuple[Event, ...] = field(default=(), repr=False)

    def to_frame(self) -> pd.DataFrame:
        """One row: n_a, n_b, tp, fp, fn, precision, recall, f1, min_iou, mean_iou,
        kappa, po, pe, n_samples, rate_hz, duration_s, onset_median_s,
        onset_q25_s, onset_q75_s, onset_mae_s, offset_median_s, offset_q25_s,
        offset_q75_s, offset_mae_s, notes (a string, "; "-joined)."""
        row: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("matches", "missed", "extra"):
                continue
            value = getattr(self, f.name)
            row[f.name] = "; ".join(value) if f.name == "notes" else value
        return pd.DataFrame([row])

    def matches_frame(self) -> pd.DataFrame:
        """One row per matched pair (status "match"), per missed A event ("missed")
        and per extra B event ("extra"), in time order: a_id, b_id, a_start_s,
        a_end_s, b_start_s, b_end_s, iou, onset_error_s, offset_error_s, status.
        The side an unmatched event lacks is None (ids) or NaN (numbers)."""
        nan = math.nan
        rows: list[dict[str, Any]] = []
        for m in self.matches:
            rows.append(_row(m.a, m.b, m.iou, m.onset_error_s, m.offset_error_s, "match"))
        for e in self.missed:
            rows.append(_row(e, None, nan, nan, nan, "missed"))
        for e in self.extra:
            rows.append(_row(None, e, nan, nan, nan, "extra"))
        frame = pd.DataFrame(rows, columns=MATCH_COLUMNS)
        if rows:
            first = frame[["a_start_s", "b_start_s"]].min(axis=1)
            frame = frame.assign(_t=first).sort_values("_t", kind="stable").drop(columns="_t")
            frame = frame.reset_index(drop=True)
        return frame

    def summary(self) -> str:
        """One sentence for a methods/results section."""
        return (
            f"F1 {self.f1:.2f} (P {self.precision:.2f}, R {self.recall:.2f}; IoU ≥ {self.min_iou:g}; "
            f"{self.tp} matched, {self.fn} missed, {self.fp} extra of {self.n_a} vs {self.n_b}), "
            f"κ {self.kappa:.2f} at {self.rate_hz:g} Hz, "
            f"onset error {_timing(self.onset_median_s, self.onset_q25_s, self.onset_q75_s)}, "
            f"offset error {_timing(self.offset_median_s, self.offset_q25_s, self.offset_q75_s)}"
        )


MATCH_COLUMNS = [
    "a_id",
    "b_id",
    "a_start_s",
    "a_end_s",
    "b_start_s",
    "b_end_s",
    "iou",
    "onset_error_s",
    "offset_error_s",
    "status",
]


def _row(
    a: Event | None, b: Event | None, iou: float, onset: float, offset: float, status: str
) -> dict[str, Any]:
    nan = math.nan
    return {
        "a_id": a.id if a else None,
        "b_id": b.id if b else None,
        "a_start_s": a.start_s if a else nan,
        "a_end_s": a.end_s if a else nan,
        "b_start_s": b.start_s if b else nan,
        "b_end_s": b.end_s if b else nan,
        "iou": iou,
        "onset_error_s": onset,
        "offset_error_s": offset,
        "status": status,
    }


def _signed(x: float) -> str:
    """+0.07 / −0.03 (a typographic minus, as in print)."""
    s = f"{x:+.2f}"
    return "+0.00" if s == "-0.00" else s.replace("-", "−")


def _timing(median: float, q25: float, q75: float) -> str:
    if math.isnan(median):
        return "n/a (no matches)"
    return f"median {_signed(median)} s (IQR {_signed(q25)} to {_signed(q75)})"


# --- input ---------------------------------------------------------------------------------------


def events(coding: Coding, side: str = "coding") -> list[Event]:
    """The coding as a list of validated `Event`s (ids: `smile_id` if the table
    has one, else the row's index label; for an `Event` with no id, its
    position). Raises ValueError naming the row for a missing/NaN/infinite or
    negative time, or end_s ≤ start_s; overlapping events are allowed."""
    out: list[Event] = []
    if isinstance(coding, pd.DataFrame):
        missing = [c for c in ("start_s", "end_s") if c not in coding.columns]
        if missing:
            raise ValueError(f"{side}: the table lacks column(s) {', '.join(missing)}")
        ids = coding["smile_id"] if "smile_id" in coding.columns else pd.Series(coding.index, coding.index)
        for pos, (label, start, end, ident) in enumerate(
            zip(coding.index, coding["start_s"], coding["end_s"], ids)
        ):
            where = f"{side}, row {pos} (index {label!r}" + (
                f", smile_id {ident!r})" if "smile_id" in coding.columns else ")"
            )
            s, e = _time(start, "start_s", where), _time(end, "end_s", where)
            _check(s, e, where)
            out.append(Event(s, e, str(ident)))
    else:
        for pos, ev in enumerate(coding):
            if not isinstance(ev, Event):
                raise ValueError(f"{side}, item {pos}: expected an Event, got {type(ev).__name__}")
            where = f"{side}, item {pos}" + (f" (id {ev.id!r})" if ev.id else "")
            s, e = _time(ev.start_s, "start_s", where), _time(ev.end_s, "end_s", where)
            _check(s, e, where)
            out.append(Event(s, e, ev.id or str(pos)))
    return out


def _time(value: Any, name: str, where: str) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} {value!r} is not a number") from None
    if not math.isfinite(t):
        raise ValueError(f"{where}: {name} is {value!r}, not a finite time")
    if t < 0:
        raise ValueError(f"{where}: {name} {t} is negative")
    return t


def _check(start: float, end: float, where: str) -> None:
    if end <= start:
        raise ValueError(f"{where}: end_s {end} is not after start_s {start}")


def _check_params(min_iou: float, rate_hz: float, duration_s: float | None) -> None:
    if not (0 < min_iou <= 1):
        raise ValueError(f"min_iou must be in (0, 1], got {min_iou}")
    if not (math.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"rate_hz must be a positive number, got {rate_hz}")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s >= 0):
        raise ValueError(f"duration_s must be a finite time ≥ 0, got {duration_s}")


# --- event matching ------------------------------------------------------------------------------


def iou_matrix(a: Sequence[Event], b: Sequence[Event]) -> np.ndarray:
    """Temporal IoU of every (A event, B event) pair, shape (len(a), len(b))."""
    sa = np.array([e.start_s for e in a], float)[:, None]
    ea = np.array([e.end_s for e in a], float)[:, None]
    sb = np.array([e.start_s for e in b], float)[None, :]
    eb = np.array([e.end_s for e in b], float)[None, :]
    inter = np.clip(np.minimum(ea, eb) - np.maximum(sa, sb), 0.0, None)
    union = (ea - sa) + (eb - sb) - inter
    return np.asarray(inter / union, dtype=float)


def match_events(a: Coding, b: Coding, *, min_iou: float = DEFAULT_MIN_IOU) -> Matching:
    """One-to-one matching of B against reference A under the overlap rule
    (module docstring): most pairs with IoU ≥ min_iou, then most total IoU."""
    _check_params(min_iou, DEFAULT_RATE_HZ, None)
    ea, eb = events(a, "coding A"), events(b, "coding B")
    return _match(ea, eb, min_iou)


def _match(ea: list[Event], eb: list[Event], min_iou: float) -> Matching:
    pairs: list[Match] = []
    if ea and eb:
        iou = iou_matrix(ea, eb)
        eligible = iou >= min_iou - _IOU_TOL
        big = min(len(ea), len(eb)) + 1.0
        weight = np.where(eligible, big + iou, 0.0)
        rows, cols = linear_sum_assignment(weight, maximize=True)
        kept = [(int(i), int(j)) for i, j in zip(rows, cols) if eligible[i, j]]
        pairs = [Match(ea[i], eb[j], float(iou[i, j])) for i, j in kept]
        used_a, used_b = {i for i, _ in kept}, {j for _, j in kept}
    else:
        used_a, used_b = set(), set()
    pairs.sort(key=lambda m: (m.a.start_s, m.a.end_s))
    return Matching(
        matches=tuple(pairs),
        missed=tuple(e for i, e in enumerate(ea) if i not in used_a),
        extra=tuple(e for j, e in enumerate(eb) if j not in used_b),
        min_iou=min_iou,
    )


# --- frame-level kappa ---------------------------------------------------------------------------


def n_samples(duration_s: float, rate_hz: float) -> int:
    """Grid points k / rate_hz in [0, duration_s)."""
    return max(0, math.ceil(duration_s * rate_hz - _GRID_TOL))


def rasterise(evs: Sequence[Event], duration_s: float, rate_hz: float = DEFAULT_RATE_HZ) -> np.ndarray:
    """Boolean samples on the grid t_k = k / rate_hz, k < N: True where t_k lies
    in [start_s, end_s) of any event (overlapping events: their union)."""
    n = n_samples(duration_s, rate_hz)
    raster = np.zeros(n, dtype=bool)
    for e in evs:
        k0 = max(0, math.ceil(e.start_s * rate_hz - _GRID_TOL))
        k1 = min(n, math.ceil(e.end_s * rate_hz - _GRID_TOL))
        if k1 > k0:
            raster[k0:k1] = True
    return raster


def frame_kappa(
    a: Coding, b: Coding, *, duration_s: float | None = None, rate_hz: float = DEFAULT_RATE_HZ
) -> FrameAgreement:
    """Cohen's kappa, po and pe of the two codings rasterised on the common grid."""
    _check_params(DEFAULT_MIN_IOU, rate_hz, duration_s)
    return _kappa(events(a, "coding A"), events(b, "coding B"), duration_s, rate_hz)


def _kappa(ea: list[Event], eb: list[Event], duration_s: float | None, rate_hz: float) -> FrameAgreement:
    notes: list[str] = []
    ends = [e.end_s for e in ea + eb]
    if duration_s is None:
        duration_s = max(ends, default=0.0)
    elif ends and max(ends) > duration_s:
        notes.append(f"events ending after duration_s {duration_s:g} s are cut at the grid's end for kappa")
    ra, rb = rasterise(ea, duration_s, rate_hz), rasterise(eb, duration_s, rate_hz)
    n = int(ra.size)
    if n == 0:
        notes.append("no samples (no duration and no events): po and kappa set to 1.0")
        return FrameAgreement(1.0, 1.0, 1.0, 0, rate_hz, duration_s, tuple(notes))
    agree = int(np.count_nonzero(ra == rb))
    ca, cb = int(np.count_nonzero(ra)), int(np.count_nonzero(rb))
    chance = ca * cb + (n - ca) * (n - cb)  # pe * n², exact
    po, pe = agree / n, chance / (n * n)
    if chance == n * n:
        kappa = 1.0 if agree == n else 0.0
        notes.append(
            "both codings are constant and equal over the grid (pe = 1): kappa set to "
            + ("1.0 (po = 1)" if agree == n else "0.0")
        )
    else:
        kappa = (agree * n - chance) / (n * n - chance)
    return FrameAgreement(kappa, po, pe, n, rate_hz, duration_s, tuple(notes))


# --- everything ----------------------------------------------------------------------------------


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def _stats(errors: list[float]) -> tuple[float, float, float, float]:
    """median, 25th, 75th percentile (numpy linear), mean absolute error; NaN if empty."""
    if not errors:
        return (math.nan,) * 4
    x = np.asarray(errors, dtype=float)
    q25, med, q75 = np.percentile(x, [25, 50, 75], method="linear")
    return float(med), float(q25), float(q75), float(np.mean(np.abs(x)))


def agree(
    a: Coding,
    b: Coding,
    *,
    duration_s: float | None = None,
    min_iou: float = DEFAULT_MIN_IOU,
    rate_hz: float = DEFAULT_RATE_HZ,
) -> Agreement:
    """Coding B against reference A: event matching and scores, frame kappa and
    timing errors (definitions in the module docstring)."""
    _check_params(min_iou, rate_hz, duration_s)
    ea, eb = events(a, "coding A"), events(b, "coding B")
    return _agree(ea, eb, duration_s, min_iou, rate_hz)


def _agree(
    ea: list[Event], eb: list[Event], duration_s: float | None, min_iou: float, rate_hz: float
) -> Agreement:
    m = _match(ea, eb, min_iou)
    n_a, n_b, tp = len(ea), len(eb), len(m.matches)
    fp, fn = n_b - tp, n_a - tp
    notes: list[str] = []
    if n_a == 0 and n_b == 0:
        precision = recall = f1 = 1.0
        notes.append("both codings are empty: precision, recall and F1 set to 1.0")
    else:
        precision, recall, f1 = _ratio(tp, n_b), _ratio(tp, n_a), _ratio(2 * tp, 2 * tp + fp + fn)
        if n_a == 0 or n_b == 0:
            notes.append(f"coding {'A' if n_a == 0 else 'B'} is empty: its 0/0 event score set to 0.0")
    k = _kappa(ea, eb, duration_s, rate_hz)
    on = _stats([p.onset_error_s for p in m.matches])
    off = _stats([p.offset_error_s for p in m.matches])
    mean_iou = float(np.mean([p.iou for p in m.matches])) if m.matches else math.nan
    return Agreement(
        n_a=n_a,
        n_b=n_b,
        tp=tp,
        fp=fp,
        fn=fn,
        precision=precision,
        recall=recall,
        f1=f1,
        min_iou=min_iou,
        mean_iou=mean_iou,
        kappa=k.kappa,
        po=k.po,
        pe=k.pe,
        n_samples=k.n_samples,
        rate_hz=rate_hz,
        duration_s=k.duration_s,
        onset_median_s=on[0],
        onset_q25_s=on[1],
        onset_q75_s=on[2],
        onset_mae_s=on[3],
        offset_median_s=off[0],
        offset_q25_s=off[1],
        offset_q75_s=off[2],
        offset_mae_s=off[3],
        notes=tuple(notes) + k.notes,
        matches=m.matches,
        missed=m.missed,
        extra=m.extra,
    )


def agree_by_face(
    a: pd.DataFrame,
    b: pd.DataFrame,
    *,
    duration_s: float | None = None,
    min_iou: float = DEFAULT_MIN_IOU,
    rate_hz: float = DEFAULT_RATE_HZ,
) -> dict[Any, Agreement]:
    """`agree` per face: {face_id: Agreement} over the faces of either table
    (sorted). A face in one table only is compared with an empty coding, so its
    events are all missed (only in A) or extra (only in B). Without duration_s,
    every face uses the same grid: up to the largest end_s of both whole tables.
    Both tables must have a `face_id` column (ValueError otherwise)."""
    for side, t in (("coding A", a), ("coding B", b)):
        if not isinstance(t, pd.DataFrame) or "face_id" not in t.columns:
            raise ValueError(f"{side}: agree_by_face needs a table with a face_id column")
    _check_params(min_iou, rate_hz, duration_s)
    ea_all, eb_all = events(a, "coding A"), events(b, "coding B")  # validates every row, names it
    if duration_s is None:
        duration_s = max((e.end_s for e in ea_all + eb_all), default=0.0)
    for side, t in (("coding A", a), ("coding B", b)):
        bad = np.flatnonzero(pd.isna(t["face_id"]).to_numpy())
        if bad.size:
            raise ValueError(f"{side}, row {int(bad[0])} (index {t.index[bad[0]]!r}): face_id is missing")
    seen = list(pd.unique(pd.concat([a["face_id"], b["face_id"]], ignore_index=True)))
    try:
        faces = sorted(seen)
    except TypeError:  # mixed id types: keep first-seen order
        faces = seen
    out: dict[Any, Agreement] = {}
    for face in faces:
        fa = [e for e, f in zip(ea_all, a["face_id"]) if f == face]
        fb = [e for e, f in zip(eb_all, b["face_id"]) if f == face]
        out[face] = _agree(fa, fb, duration_s, min_iou, rate_hz)
    return out
