"""Inter-coder agreement (dyadlab.review.agreement): constructed codings whose
answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dyadlab.review.agreement import (
    Agreement,
    Event,
    agree,
    agree_by_face,
    frame_kappa,
    match_events,
    rasterise,
)

# four 1.5 s smiles over 20 s
A = [(1.0, 2.5), (5.0, 6.5), (9.0, 10.5), (14.0, 15.5)]


def table(intervals, face=None, first_id=1):
    t = pd.DataFrame(intervals, columns=["start_s", "end_s"])
    t.insert(0, "smile_id", range(first_id, first_id + len(t)))
    if face is not None:
        t.insert(0, "face_id", face)
    return t


def shifted(intervals, d):
    return [(s + d, e + d) for s, e in intervals]


def test_identical_codings_agree_perfectly():
    r = agree(table(A), table(A), duration_s=20)
    assert (r.precision, r.recall, r.f1, r.kappa, r.po) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert (r.n_a, r.n_b, r.tp, r.fp, r.fn) == (4, 4, 4, 0, 0)
    assert r.mean_iou == 1.0 and r.n_samples == 600
    for name in ("onset", "offset"):
        for stat in ("median", "q25", "q75", "mae"):
            assert getattr(r, f"{name}_{stat}_s") == 0.0
    assert r.notes == ()


def test_shift_by_0_2_s():
    r = agree(table(A), table(shifted(A, 0.2)), duration_s=20)
    assert (r.precision, r.recall, r.f1, r.tp) == (1.0, 1.0, 1.0, 4)
    for name in ("onset", "offset"):
        for stat in ("median", "q25", "q75", "mae"):
            assert getattr(r, f"{name}_{stat}_s") == pytest.approx(0.2, abs=1e-9)
    assert r.mean_iou == pytest.approx(1.3 / 1.7)
    assert r.kappa < 1


def test_kappa_by_hand():
    # one 1 s event over 3 s at 10 Hz: 30 samples t = 0.0 ... 2.9
    # A smiles at t in [1.0, 2.0): samples 10..19; B in [1.2, 2.2): samples 12..21
    # disagreement at samples 10, 11, 20, 21 -> po = 26/30
    # pA = pB = 10/30 = 1/3 -> pe = 1/3 * 1/3 + 2/3 * 2/3 = 5/9
    # kappa = (26/30 - 5/9) / (1 - 5/9) = (78/90 - 50/90) / (40/90) = 28/40 = 0.7
    a, b = [Event(1.0, 2.0)], [Event(1.2, 2.2)]
    r = agree(a, b, duration_s=3.0, rate_hz=10.0)
    po, pe = 26 / 30, 5 / 9
    assert r.n_samples == 30
    assert r.po == pytest.approx(po, abs=1e-12) and r.pe == pytest.approx(pe, abs=1e-12)
    assert r.kappa == pytest.approx((po - pe) / (1 - pe), abs=1e-12)
    assert r.kappa == pytest.approx(0.7, abs=1e-12)
    assert r.onset_median_s == pytest.approx(0.2, abs=1e-9)
    k = frame_kappa(a, b, duration_s=3.0, rate_hz=10.0)
    assert (k.kappa, k.po, k.pe, k.n_samples) == (r.kappa, r.po, r.pe, 30)


def test_grid_is_half_open_and_overlaps_are_a_union():
    # samples t_k = k/10 in [0, 1): [0.2, 0.5) covers k = 2, 3, 4; [0.4, 0.7) covers 4, 5, 6
    r = rasterise([Event(0.2, 0.5), Event(0.4, 0.7)], 1.0, 10.0)
    assert r.tolist() == [k in (2, 3, 4, 5, 6) for k in range(10)]
    # duration from the events when not given: max end 0.7 s -> 7 samples at 10 Hz
    assert frame_kappa([Event(0.2, 0.5)], [Event(0.4, 0.7)], rate_hz=10).n_samples == 7


def test_one_event_missed():
    r = agree(table(A), table(A[:2] + A[3:]), duration_s=20)
    assert (r.tp, r.fp, r.fn) == (3, 0, 1)
    assert r.recall == 3 / 4 and r.precision == 1.0
    assert r.f1 == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert [e.start_s for e in r.missed] == [9.0] and r.extra == ()


def test_one_extra_event():
    r = agree(table(A), table(A + [(18.0, 19.0)]), duration_s=20)
    assert (r.tp, r.fp, r.fn) == (4, 1, 0)
    assert r.precision == 4 / 5 and r.recall == 1.0
    assert [e.start_s for e in r.extra] == [18.0]


def test_shift_beyond_the_iou_rule_is_one_missed_and_one_extra():
    # 1.5 s event shifted by 1.2 s: intersection 0.3, union 2.7, IoU 1/9 < 0.3
    b = A[:3] + [(15.2, 16.7)]
    r = agree(table(A), table(b), duration_s=20)
    assert (r.tp, r.fp, r.fn) == (3, 1, 1)
    assert r.precision == 3 / 4 and r.recall == 3 / 4
    assert r.missed[0].start_s == 14.0 and r.extra[0].start_s == 15.2
    # a 0.5 s shift (IoU 1/2) passes 0.3, and the strict 0.5 exactly on the threshold; 0.6 s fails it
    b = A[:3] + [(14.5, 16.0)]
    assert agree(table(A), table(b)).tp == 4
    assert agree(table(A), table(b), min_iou=0.5).tp == 4
    assert agree(table(A), table(A[:3] + [(14.6, 16.1)]), min_iou=0.5).tp == 3


def test_hungarian_beats_greedy_first_overlap():
    # A: one long event a1 = [0, 10] and a short a2 = [0.5, 3.5]
    # B: b1 = [0, 4], b2 = [5, 10]
    # IoU: a1-b1 4/10 = 0.4, a1-b2 5/10 = 0.5, a2-b1 3/4 = 0.75, a2-b2 0
    # greedy (each A event in time order takes the first free B event it overlaps):
    #   a1 takes b1, a2 is left with nothing -> 1 match, a2 missed, b2 extra.
    # one-to-one optimum: a1-b2 and a2-b1 -> 2 matches, total IoU 1.25
    a = [Event(0.0, 10.0, "a1"), Event(0.5, 3.5, "a2")]
    b = [Event(0.0, 4.0, "b1"), Event(5.0, 10.0, "b2")]
    m = match_events(a, b)
    assert sorted((p.a.id, p.b.id) for p in m.matches) == [("a1", "b2"), ("a2", "b1")]
    assert sum(p.iou for p in m.matches) == pytest.approx(1.25)
    assert m.missed == () and m.extra == ()


def test_more_matches_before_more_total_iou():
    # a1 = [0, 10], b1 = [0, 9]: IoU 0.9; a1-b2 ([6, 10]) 0.4; a2 ([0, 3.6])-b1 0.4
    # most total IoU alone would keep {a1-b1} (0.9 > 0.8) and lose a match;
    # the rule counts matches first: {a1-b2, a2-b1}
    a = [Event(0.0, 10.0, "a1"), Event(0.0, 3.6, "a2")]
    b = [Event(0.0, 9.0, "b1"), Event(6.0, 10.0, "b2")]
    r = agree(a, b)
    assert (r.tp, r.fp, r.fn) == (2, 0, 0)
    assert sorted((p.a.id, p.b.id) for p in r.matches) == [("a1", "b2"), ("a2", "b1")]
    assert r.mean_iou == pytest.approx(0.4)


def test_empty_codings():
    r = agree([], [], duration_s=10)
    assert (r.precision, r.recall, r.f1, r.kappa, r.po, r.pe) == (1.0,) * 6
    assert (r.n_a, r.n_b, r.tp, r.fp, r.fn, r.n_samples) == (0, 0, 0, 0, 0, 300)
    assert math.isnan(r.onset_median_s) and math.isnan(r.offset_mae_s) and math.isnan(r.mean_iou)
    assert any("both codings are empty" in n for n in r.notes)
    assert any("pe = 1" in n for n in r.notes)
    # no duration, no events: an empty grid
    r = agree(pd.DataFrame(columns=["start_s", "end_s"]), [])
    assert (r.f1, r.kappa, r.po, r.n_samples) == (1.0, 1.0, 1.0, 0)

    # empty B against a non-empty A: every event score 0, kappa 0
    # (A smiles in 10 of 100 samples, B never: po = 0.9, pe = 0.9, kappa 0)
    r = agree([Event(1.0, 2.0)], [], duration_s=10, rate_hz=10)
    assert (r.precision, r.recall, r.f1, r.tp, r.fn, r.fp) == (0.0, 0.0, 0.0, 0, 1, 0)
    assert r.po == pytest.approx(0.9) and r.pe == pytest.approx(0.9) and r.kappa == 0.0
    r = agree([], [Event(1.0, 2.0)], duration_s=10, rate_hz=10)
    assert (r.precision, r.recall, r.f1, r.tp, r.fn, r.fp) == (0.0, 0.0, 0.0, 0, 0, 1)
    assert r.kappa == 0.0 and math.isnan(r.onset_median_s)
    assert "n/a (no matches)" in r.summary()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [(1.0, 2.0), (3.0, 3.0)],
            r"coding B, row 1 \(index 1, smile_id 2\): end_s 3.0 is not after start_s 3.0",
        ),
        ([(1.0, 2.0), (4.0, 3.0)], r"row 1 .*end_s 3.0 is not after start_s 4.0"),
        ([(-0.5, 2.0)], r"row 0 .*start_s -0.5 is negative"),
        ([(1.0, float("nan"))], r"row 0 .*end_s is nan"),
        ([(1.0, float("inf"))], r"row 0 .*end_s is inf"),
    ],
)
def test_invalid_times_name_the_row(rows, message):
    with pytest.raises(ValueError, match=message):
        agree(table(A), table(rows))


def test_other_validation():
    with pytest.raises(ValueError, match=r"coding A, item 0 \(id 'x'\): end_s 1.0 is not after"):
        agree([Event(2.0, 1.0, "x")], [])
    with pytest.raises(ValueError, match="lacks column"):
        agree(pd.DataFrame({"start_s": [1.0]}), [])
    with pytest.raises(ValueError, match="not a number"):
        agree(pd.DataFrame({"start_s": ["soon"], "end_s": [2.0]}), [])
    for kw in ({"min_iou": 0.0}, {"min_iou": 1.5}, {"rate_hz": 0.0}, {"duration_s": -1.0}):
        with pytest.raises(ValueError):
            agree([], [], **kw)
    with pytest.raises(ValueError, match="face_id"):
        agree_by_face(table(A), table(A, face=1))


def test_overlapping_events_within_one_coding_are_allowed():
    # B codes one smile as two overlapping pieces: matching uses each, kappa their union
    a = [Event(1.0, 3.0)]
    b = [Event(1.0, 2.2), Event(1.8, 3.0)]
    r = agree(a, b, duration_s=4, rate_hz=10)
    assert (r.tp, r.fp, r.fn) == (1, 1, 0)
    assert r.kappa == 1.0 and r.po == 1.0


def test_agree_by_face():
    a = pd.concat([table(A, face=1), table(A[:2], face=2)], ignore_index=True)
    b = pd.concat([table(shifted(A, 0.2), face=1), table([(3.0, 4.0)], face=3)], ignore_index=True)
    out = agree_by_face(a, b, duration_s=20)
    assert list(out) == [1, 2, 3]
    assert all(isinstance(r, Agreement) for r in out.values())
    assert (out[1].tp, out[1].fp, out[1].fn) == (4, 0, 0)
    assert out[1].onset_median_s == pytest.approx(0.2, abs=1e-9)
    assert (out[2].n_a, out[2].n_b, out[2].tp, out[2].fn, out[2].fp) == (2, 0, 0, 2, 0)
    assert (out[3].n_a, out[3].n_b, out[3].tp, out[3].fn, out[3].fp) == (0, 1, 0, 0, 1)
    assert out[2].recall == 0.0 and out[3].precision == 0.0
    # without a duration every face shares the grid up to the largest end of both tables
    out = agree_by_face(a, b, rate_hz=10)
    assert {r.n_samples for r in out.values()} == {157}  # 15.7 s at 10 Hz
    bad = table(A, face=1)
    bad.loc[2, "face_id"] = np.nan
    with pytest.raises(ValueError, match=r"coding B, row 2 .*face_id is missing"):
        agree_by_face(table(A, face=1), bad)


def test_frames_and_summary():
    b = A[:2] + [(9.2, 10.7)] + [(18.0, 19.0)]  # one shifted match, one missed, one extra
    r = agree(table(A), table(b, first_id=11), duration_s=20)
    f = r.to_frame()
    assert len(f) == 1
    assert list(f.columns) == [
        "n_a",
        "n_b",
        "tp",
        "fp",
        "fn",
        "precision",
        "recall",
        "f1",
        "min_iou",
        "mean_iou",
        "kappa",
        "po",
        "pe",
        "n_samples",
        "rate_hz",
        "duration_s",
        "onset_median_s",
        "onset_q25_s",
        "onset_q75_s",
        "onset_mae_s",
        "offset_median_s",
        "offset_q25_s",
        "offset_q75_s",
        "offset_mae_s",
        "notes",
    ]
    assert f.loc[0, "tp"] == 3 and f.loc[0, "notes"] == ""

    m = r.matches_frame()
    assert m["status"].value_counts().to_dict() == {"match": 3, "missed": 1, "extra": 1}
    assert list(m.columns) == [
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
    assert m["a_start_s"].fillna(m["b_start_s"]).is_monotonic_increasing  # time order
    missed = m[m["status"] == "missed"].iloc[0]
    assert missed["a_id"] == "4" and missed["b_id"] is None and math.isnan(missed["iou"])
    extra = m[m["status"] == "extra"].iloc[0]
    assert extra["b_id"] == "14" and extra["a_id"] is None
    third = m[m["status"] == "match"].iloc[2]
    assert (third["a_id"], third["b_id"]) == ("3", "13")
    assert third["onset_error_s"] == pytest.approx(0.2) and third["offset_error_s"] == pytest.approx(0.2)
    assert agree([], []).matches_frame().empty

    # timing: errors 0, 0, +0.2 -> median 0, q25 0, q75 0.1 (linear), MAE 0.2/3
    assert r.onset_median_s == 0.0 and r.onset_q25_s == 0.0
    assert r.onset_q75_s == pytest.approx(0.1) and r.onset_mae_s == pytest.approx(0.2 / 3)
    s = r.summary()
    assert s.startswith("F1 0.75 (P 0.75, R 0.75; IoU ≥ 0.3")
    assert "at 30 Hz" in s and "onset error median +0.00 s (IQR +0.00 to +0.10)" in s
    assert "offset error median" in s
    s = agree([Event(1.0, 2.0)], [Event(0.9, 1.8)]).summary()
    assert "onset error median −0.10 s (IQR −0.10 to −0.10)" in s
    assert "offset error median −0.20 s" in s
    assert "median +0.00 s" in agree([Event(1.0, 2.0)], [Event(0.999, 2.0)]).summary()  # no "−0.00"
