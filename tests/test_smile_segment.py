"""Smile segmentation and features on constructed traces.

Frame tables are built so the radius r = |P48 - N| / IR follows a known
piecewise-linear profile (flat, rise, flat apex, fall, flat) and AU12 follows
it, leading it by 3 frames, so the AU12 window starts on rest frames and IR is
exactly the rest half-width W.  The standard smile (30 fps) has its onset on
frames 30..45 (+0.3 IR), apex 45..75, offset 75..99 (-0.3 IR).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dyadlab.frames import TableError
from services.smiles.features import drop_speech, smile_table
from services.smiles.plot import smile_figure
from services.smiles.segment import SmileParams, segment_smiles

FPS = 30
B = 0.4  # corner height below the nostril, in W
R0 = math.sqrt(1 + B * B)  # r at rest when IR = W
RAW = SmileParams(smooth_window_s=0)  # smoothing off: exact boundaries

R_STD = [(0, 0), (30, 0), (45, 0.3), (75, 0.3), (99, 0), (129, 0)]
AU_STD = [(0, 0), (27, 0), (45, 3.0), (75, 3.0), (102, 0), (129, 0)]


def table(
    n, r_knots, au12_knots, *, t=None, w=30.0, width_knots=None, left_gain=1.0, jitter=0.0, seed=0, au6=None
):
    """Frame table whose r = R0 + (piecewise linear in time through r_knots).

    Knots are (frame, value); values are interpolated over the timestamps, so
    r is linear in *time* between knots (VFR included).  The corners sit at
    P48 = N + (-a_R, B W), P54 = N + (a_L, B W) with a chosen so that
    |P48 - N| = r W; the left corner moves ``left_gain`` times as much.
    """
    frame = np.arange(n)
    t = frame / FPS if t is None else np.asarray(t, float)

    def interp(knots):
        return np.interp(t, t[[k[0] for k in knots]], [k[1] for k in knots])

    dr, au12 = interp(r_knots), interp(au12_knots)
    width = interp(width_knots) if width_knots else np.full(n, w)
    b = B * width
    a_r = np.sqrt(((R0 + dr) * width) ** 2 - b**2)
    a_l = np.sqrt(((R0 + left_gain * dr) * width) ** 2 - b**2)
    nx, ny = np.full(n, 321.25), np.full(n, 243.5)
    df = pd.DataFrame(
        {
            "frame": frame,
            "face_id": 0,
            "timestamp": t,
            "confidence": 0.98,
            "success": 1,
            "AU12_r": au12,
            "x_34": nx,
            "y_34": ny,
            "x_48": nx - a_r,
            "y_48": ny + b,
            "x_54": nx + a_l,
            "y_54": ny + b,
        }
    )
    if au6 is not None:
        df["AU06_r"] = au6(au12)
    if jitter:
        rng = np.random.default_rng(seed)
        for c in ("x_34", "y_34", "x_48", "y_48", "x_54", "y_54"):
            df[c] = df[c] + rng.normal(0.0, jitter, n)
    return df


def std_table(**kw):
    return table(130, R_STD, AU_STD, **kw)


def bounds(s):
    return (s.start_frame, s.onset_end_frame, s.offset_start_frame, s.end_frame)


def approx(x):
    return pytest.approx(x, rel=1e-9, abs=1e-9)


# --- exact phases -----------------------------------------------------------


def test_exact_phases_and_features_cfr():
    df = std_table()
    smiles = segment_smiles(df, RAW)
    assert len(smiles) == 1
    s = smiles[0]
    assert bounds(s) == (30, 45, 75, 99)
    assert s.complete and not s.start_cut
    assert (s.frames[0], s.frames[-1]) == (27, 102)  # AU12 valleys
    assert s.ir == approx(30.0)
    row = smile_table(df, smiles, [], face_id=7).iloc[0]
    expected = {
        "face_id": 7,
        "smile_id": 1,
        "start_s": 1.0,
        "onset_end_s": 1.5,
        "offset_start_s": 2.5,
        "end_s": 3.3,
        "onset_amplitude": 0.3,
        "offset_amplitude": 0.3,
        "onset_duration_s": 0.5,
        "apex_duration_s": 1.0,
        "offset_duration_s": 0.8,
        "total_duration_s": 2.3,
        "max_onset_speed": 0.6,
        "max_offset_speed": 0.375,
        "mean_onset_speed": 0.6,
        "mean_offset_speed": 0.375,
        "ir_px": 30.0,
        "au12_max": 3.0,
        "symmetry": 0.0,
        "n_frames": 70,
    }
    for k, v in expected.items():
        assert row[k] == approx(v), k
    assert not row["overlaps_speech"] and row["complete"]
    assert math.isnan(row["au6_apex_mean"]) and pd.isna(row["duchenne"])


def test_exact_phases_vfr_use_timestamps():
    rng = np.random.default_rng(3)
    dt = rng.uniform(0.8, 1.2, 129) / FPS  # jittered, never > 1.5x median
    t = np.concatenate([[0.0], np.cumsum(dt)]) + 12.0
    df = std_table(t=t)
    smiles = segment_smiles(df, RAW)
    assert len(smiles) == 1 and bounds(smiles[0]) == (30, 45, 75, 99)
    row = smile_table(df, smiles, []).iloc[0]
    assert row["start_s"] == approx(t[30]) and row["end_s"] == approx(t[99])
    assert row["onset_duration_s"] == approx(t[45] - t[30])
    assert row["apex_duration_s"] == approx(t[75] - t[45])
    assert row["offset_duration_s"] == approx(t[99] - t[75])
    assert row["max_onset_speed"] == approx(0.3 / (t[45] - t[30]))
    assert row["max_offset_speed"] == approx(0.3 / (t[99] - t[75]))
    # a fixed-fps assumption would give 0.6 / 0.375
    assert abs(row["max_onset_speed"] - 0.6) > 1e-3


def test_row_order_and_index_do_not_matter():
    df = std_table(au6=lambda au12: au12 * 2 / 3)
    shuffled = df.sample(frac=1.0, random_state=0)
    shuffled.index = np.zeros(len(df), int)  # duplicate labels
    a = smile_table(df, segment_smiles(df, RAW), [])
    b = smile_table(shuffled, segment_smiles(shuffled, RAW), [])
    pd.testing.assert_frame_equal(a, b)
    assert b["au6_apex_mean"].iloc[0] == approx(2.0)


def test_symmetry_and_duchenne():
    df = std_table(left_gain=0.5, au6=lambda au12: au12 * 2 / 3)
    row = smile_table(df, segment_smiles(df, RAW), []).iloc[0]
    assert row["symmetry"] == approx((0.3 - 0.15) / (0.3 + 0.15))
    assert row["au6_apex_mean"] == approx(2.0)
    assert bool(row["duchenne"]) is True
    df = std_table(au6=lambda au12: au12 * 0.2)
    row = smile_table(df, segment_smiles(df, RAW), []).iloc[0]
    assert row["au6_apex_mean"] == approx(0.6) and bool(row["duchenne"]) is False


# --- smoothing --------------------------------------------------------------


def test_smoothing_bounds_corner_effect_without_noise():
    df = std_table()
    smiles = segment_smiles(df)  # default Savitzky-Golay, 7 frames
    assert bounds(smiles[0]) == (28, 47, 73, 101)  # corner overshoot: 2 frames
    row = smile_table(df, smiles, []).iloc[0]
    assert row["onset_amplitude"] == pytest.approx(0.3, abs=0.01)
    assert row["max_onset_speed"] == pytest.approx(0.6, abs=0.03)


def test_smoothing_rescues_runs_broken_by_jitter():
    df = std_table(jitter=0.2, seed=2)  # 0.2 px per coordinate
    raw_r = np.hypot(df.x_48 - df.x_34, df.y_48 - df.y_34).to_numpy()
    assert np.any(np.diff(raw_r[31:45]) <= 0)  # the true rise breaks mid-way
    raw = segment_smiles(df, RAW)
    assert raw[0].start_frame - 30 > 3  # unsmoothed: onset truncated
    s = segment_smiles(df)
    # Savitzky-Golay overshoot widens runs by ~2 frames; noise adds a little
    assert len(s) == 1 and s[0].complete
    assert np.max(np.abs(np.subtract(bounds(s[0]), (30, 45, 75, 99)))) <= 3


def test_smoothing_helps_over_many_noise_draws():
    def hit(params, seed):
        s = segment_smiles(std_table(jitter=0.2, seed=seed), params)
        return (
            len(s) == 1 and s[0].complete and np.max(np.abs(np.subtract(bounds(s[0]), (30, 45, 75, 99)))) <= 3
        )

    smoothed = np.mean([hit(SmileParams(), k) for k in range(30)])
    raw = np.mean([hit(RAW, k) for k in range(30)])
    assert smoothed >= 0.75 and raw <= 0.1


def test_noise_within_apex_stays_one_smile():
    r = [(0, 0), (30, 0), (45, 0.3), (60, 0.3), (70, 0.1), (80, 0.25), (95, 0.25), (119, 0), (149, 0)]
    au = [(0, 0), (27, 0), (45, 3.0), (60, 3.0), (70, 2.0), (80, 2.8), (95, 2.8), (122, 0), (149, 0)]
    smiles = segment_smiles(table(150, r, au), RAW)
    assert len(smiles) == 1
    assert bounds(smiles[0]) == (30, 45, 95, 119)  # longest fall after the onset


def test_offset_is_sought_after_the_onset():
    # corners first pull in for 28 frames (longer than the 20-frame offset)
    r = [(0, 0), (27, 0), (55, -0.05), (70, 0.3), (90, 0.3), (110, 0), (139, 0)]
    au = [(0, 0), (27, 0), (70, 3.0), (90, 3.0), (113, 0), (139, 0)]
    smiles = segment_smiles(table(140, r, au), RAW)
    assert [bounds(s) for s in smiles] == [(55, 70, 90, 110)]


# --- smile existence, IR, cursor --------------------------------------------


def test_two_smiles_get_ids_and_their_own_ir():
    r = R_STD[:-1] + [(160, 0), (175, 0.3), (200, 0.3), (220, 0), (259, 0)]
    au = AU_STD[:-1] + [(157, 0), (175, 3.0), (200, 3.0), (223, 0), (259, 0)]
    width = [(0, 30.0), (130, 30.0), (150, 36.0), (259, 36.0)]  # face moves closer
    df = table(260, r, au, width_knots=width)
    smiles = segment_smiles(df, RAW)
    assert [bounds(s) for s in smiles] == [(30, 45, 75, 99), (160, 175, 200, 220)]
    assert [s.ir for s in smiles] == [approx(30.0), approx(36.0)]
    tab = smile_table(df, smiles, [])
    assert list(tab["smile_id"]) == [1, 2]
    # normalised by its own IR, the second smile has the same amplitude
    assert list(tab["onset_amplitude"]) == [approx(0.3), approx(0.3)]


@pytest.mark.parametrize(
    "active_frames, is_smile",
    [
        ((40,), False),  # a single spike
        ((40, 76), False),  # two activations 1.2 s apart
        ((40, 70), True),  # exactly 1.0 s apart
        ((40, 67), True),  # 0.9 s apart
    ],
)
def test_au12_twice_within_one_second(active_frames, is_smile):
    df = std_table()
    df["AU12_r"] = 0.0
    df.loc[list(active_frames), "AU12_r"] = 3.0
    smiles = segment_smiles(df, RAW)
    assert len(smiles) == int(is_smile)
    if is_smile:  # window = the two spikes' valleys; r still high
        assert smiles[0].start_frame == 39 and not smiles[0].complete


@pytest.mark.parametrize("mode", ["confidence", "success", "missing"])
def test_low_confidence_breaks_segment(mode):
    df = std_table()
    bad = list(range(60, 65))  # inside the apex
    if mode == "confidence":
        df.loc[bad, "confidence"] = 0.79
    elif mode == "success":
        df.loc[bad, "success"] = 0
    else:
        df = df.drop(index=bad)  # a time gap, no rows
    smiles = segment_smiles(df, RAW)
    assert len(smiles) == 1
    s = smiles[0]
    assert not s.complete and s.end_frame == 59 and s.offset is None
    assert not set(bad) & set(s.frames)


def test_confidence_at_threshold_is_kept():
    df = std_table()
    df.loc[60:64, "confidence"] = 0.8
    smiles = segment_smiles(df, RAW)
    assert len(smiles) == 1 and bounds(smiles[0]) == (30, 45, 75, 99)


@pytest.mark.parametrize("n", [61, 90])  # ends in the apex / mid-offset
def test_smile_cut_by_end_is_incomplete(n):
    df = std_table().iloc[:n]
    smiles = segment_smiles(df, RAW)
    assert len(smiles) == 1
    s = smiles[0]
    assert not s.complete and s.offset_start_frame is None
    assert math.isnan(s.offset_start_s)
    assert s.end_frame == n - 1 and s.end_s == approx((n - 1) / FPS)
    row = smile_table(df, smiles, []).iloc[0]
    assert not row["complete"]
    for k in (
        "offset_start_s",
        "offset_amplitude",
        "offset_duration_s",
        "max_offset_speed",
        "mean_offset_speed",
        "apex_duration_s",
    ):
        assert math.isnan(row[k]), k
    assert row["onset_amplitude"] == approx(0.3)
    assert row["total_duration_s"] == approx((n - 1) / FPS - 1.0)


def test_smile_at_segment_start_is_flagged_start_cut():
    df = std_table().iloc[38:].reset_index(drop=True)  # starts mid-onset
    smiles = segment_smiles(df, RAW)
    assert len(smiles) == 1 and smiles[0].start_cut
    assert smile_table(df, smiles, [])["start_cut"].tolist() == [True]


# --- table, speech ----------------------------------------------------------


def test_table_columns_in_order():
    df = std_table()
    tab = smile_table(df, segment_smiles(df, RAW), [])
    assert list(tab.columns[:15]) == [
        "face_id",
        "smile_id",
        "start_s",
        "onset_end_s",
        "offset_start_s",
        "end_s",
        "onset_amplitude",
        "offset_amplitude",
        "onset_duration_s",
        "apex_duration_s",
        "offset_duration_s",
        "total_duration_s",
        "max_onset_speed",
        "max_offset_speed",
        "overlaps_speech",
    ]
    assert {
        "complete",
        "mean_onset_speed",
        "mean_offset_speed",
        "ir_px",
        "au12_max",
        "au6_apex_mean",
        "duchenne",
        "symmetry",
        "n_frames",
    } <= set(tab.columns[15:])
    empty = smile_table(df, [], [])
    assert len(empty) == 0 and list(empty.columns) == list(tab.columns)


@pytest.mark.parametrize(
    "speech, overlaps",
    [
        ([], False),
        ([(0.0, 0.9)], False),  # before the smile [1.0, 3.3]
        ([(3.4, 5.0)], False),  # after it
        ([(3.2, 3.5)], True),
        ([(0.5, 1.0)], True),  # touches the start
        ([(2.0, 2.010)], False),  # 10 ms: not speech
        ([(2.0, 2.020)], True),  # 20 ms: speech
    ],
)
def test_speech_overlap(speech, overlaps):
    df = std_table()
    tab = smile_table(df, segment_smiles(df, RAW), speech)
    assert tab["overlaps_speech"].tolist() == [overlaps]
    assert len(drop_speech(tab)) == int(not overlaps)


def test_drop_speech_keeps_smile_ids():
    r = R_STD[:-1] + [(160, 0), (175, 0.3), (200, 0.3), (220, 0), (259, 0)]
    au = AU_STD[:-1] + [(157, 0), (175, 3.0), (200, 3.0), (223, 0), (259, 0)]
    df = table(260, r, au)
    tab = smile_table(df, segment_smiles(df, RAW), [(1.2, 1.4)])
    assert tab["overlaps_speech"].tolist() == [True, False]
    kept = drop_speech(tab)
    assert kept["smile_id"].tolist() == [2] and len(tab) == 2


# --- input checks, params, plot ---------------------------------------------


def test_params_defaults_follow_the_paper():
    p = SmileParams()
    assert (
        p.au12_threshold,
        p.min_activations,
        p.activation_window_s,
        p.min_confidence,
        p.smooth_window_s,
        p.smooth_polyorder,
    ) == (1.5, 2, 1.0, 0.8, 0.25, 2)


def test_bad_tables_raise():
    df = std_table()
    with pytest.raises(TableError, match="x_34"):
        segment_smiles(df.drop(columns=["x_34"]))
    two = pd.concat([df, df.assign(face_id=1)])
    with pytest.raises(TableError, match="one face"):
        segment_smiles(two)


def test_plot_writes_png(tmp_path):
    df = std_table()
    df.loc[110:115, "confidence"] = 0.3
    smiles = segment_smiles(df)
    path = tmp_path / "fig1.png"
    out = smile_figure(df, smiles, [(3.4, 3.6)], path, title="dyad 1")
    data = path.read_bytes()
    assert out == path
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert str(tmp_path).encode() not in data


def test_a_return_to_rest_between_activations_ends_the_smile():
    """A complete smile, 0.5 s of rest (less than the 1-s activation window),
    then a smile the recording cuts off. AU12 falls back to rest in between, so
    the first smile is complete and only the second is cut. (Found on real
    looped footage, where one 'smile' cut by the end spanned a whole minute.)"""
    r = [(0, 0), (10, 0), (20, 0.3), (40, 0.3), (50, 0), (65, 0), (75, 0.3), (129, 0.3)]
    au = [(0, 0), (8, 0), (20, 3.0), (40, 3.0), (52, 0), (63, 0), (75, 3.0), (129, 3.0)]
    smiles = segment_smiles(table(130, r, au), RAW)
    assert [s.complete for s in smiles] == [True, False]
    assert bounds(smiles[0]) == (10, 20, 40, 50)
    assert smiles[1].start_frame >= 52
    # Without the rule (release level 0), the activations chain into one cut smile.
    assert [
        s.complete
        for s in segment_smiles(table(130, r, au), SmileParams(smooth_window_s=0, release_level=0.0))
    ] == [False]
