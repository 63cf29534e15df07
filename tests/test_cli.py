"""The `dyadlab` command as a user runs it: real processes, real sockets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dyadlab import frames as ft
from dyadlab.services import NAMES, SERVICES
from dyadlab.stack import free_port

from media import media_path

DYADLAB = str(Path(sys.executable).with_name("dyadlab"))
SMILE_COLUMNS = [
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


_PORTS: dict[Path, dict[str, str]] = {}
#: TorchServe's listeners (`up` starts it when java, torchserve and the model exist)
TS_VARS = [
    "DYADLAB_TORCHSERVE_GRPC",
    "DYADLAB_TORCHSERVE_GRPC_MANAGEMENT",
    "DYADLAB_TORCHSERVE_HTTP",
    "DYADLAB_TORCHSERVE_MANAGEMENT",
    "DYADLAB_TORCHSERVE_METRICS",
]


def run(home: Path, *args, check=True, timeout=300) -> subprocess.CompletedProcess:
    """`dyadlab ARGS` with its own home and its own free ports per home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYADLAB_")}
    env["DYADLAB_HOME"] = str(home)
    env.update(
        _PORTS.setdefault(
            Path(home), {var: f"127.0.0.1:{free_port()}" for var in [s.addr_env for s in SERVICES] + TS_VARS}
        )
    )
    p = subprocess.run([DYADLAB, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(
            f"dyadlab {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
        )
    return p


def _pids_alive(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


@pytest.fixture(scope="module")
def stack_home(tmp_path_factory):
    """`dyadlab up` in a fresh home; `dyadlab down` after."""
    home = tmp_path_factory.mktemp("cli-home")
    run(home, "up", "--no-metrics")
    try:
        yield home
    finally:
        run(home, "down", check=False)


def test_status_reports_every_service_serving(stack_home):
    p = run(stack_home, "status")
    lines = {line.split()[0]: line for line in p.stdout.splitlines()}
    assert all("SERVING" in lines[name] for name in NAMES)
    assert str(stack_home) in lines["store:"]


def test_extract_writes_openface_columns(stack_home, tmp_path):
    video = media_path("single_face.mp4")
    out = tmp_path / "frames.csv"
    p = run(stack_home, "extract", video, "--out", out)
    df = pd.read_csv(out)
    need = (
        [
            "frame",
            "face_id",
            "timestamp",
            "confidence",
            "success",
            "pose_Rx",
            "pose_Ry",
            "pose_Rz",
            "AU06_r",
            "AU12_r",
        ]
        + ft.X_COLS
        + ft.Y_COLS
    )
    assert not [c for c in need if c not in df.columns]
    assert len(df) == 72 and df["frame"].tolist() == list(range(1, 73))
    assert df["success"].mean() > 0.9
    assert "face 0: adult" in p.stderr
    parquet = tmp_path / "frames.parquet"
    run(stack_home, "extract", video, "--out", parquet)
    again = pd.read_parquet(parquet)
    assert (
        again["AU12_r"].round(4).equals(df["AU12_r"].round(4))
        or (again["AU12_r"] - df["AU12_r"]).abs().max() < 1e-4
    )


def test_extract_imports_openface_csv(stack_home, tmp_path):
    out = tmp_path / "imported.parquet"
    run(stack_home, "extract", media_path("OpenFace_Test.csv"), "--out", out)
    df = pd.read_parquet(out)
    assert len(df) == 100 and "AU12_r" in df.columns and "x_67" in df.columns


def test_a_stack_on_another_store_is_left_alone(stack_home, tmp_path):
    """A command whose DYADLAB_HOME (so store) differs from the running stack's,
    on the same ports, used to upload into its own store and then get NOT_FOUND
    from the other stack. It now sees the stack advertise another store and runs
    an embedded stack on free ports; `status` says what is happening."""
    other = tmp_path / "other-home"
    _PORTS[other] = dict(_PORTS[Path(stack_home)])  # the same ports as the running stack
    out = tmp_path / "of.csv"
    p = run(other, "extract", media_path("OpenFace_Test.csv"), "--out", out)
    assert "works on another store" in p.stderr and "starting an embedded one" in p.stderr
    assert out.exists() and len(pd.read_csv(out)) > 0
    st = run(other, "status")
    assert "another store" in st.stdout
    assert "another store" not in run(stack_home, "status").stdout
    # the running stack's own home still uses it, without an embedded stack
    p = run(stack_home, "extract", media_path("OpenFace_Test.csv"), "--out", tmp_path / "own.csv")
    assert "embedded" not in p.stderr


def test_smiles_table_and_plot(stack_home, tmp_path):
    out, png = tmp_path / "smiles.csv", tmp_path / "smiles.png"
    p = run(stack_home, "smiles", media_path("single_face.mp4"), "--out", out, "--plot", png)
    table = pd.read_csv(out)
    assert list(table.columns[: len(SMILE_COLUMNS)]) == SMILE_COLUMNS
    assert len(table) >= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "smiles found" in p.stdout


def test_bad_input_is_a_clear_error_not_a_traceback(stack_home, tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n")
    p = run(stack_home, "smiles", fake, "--out", tmp_path / "s.csv", check=False)
    assert p.returncode == 2
    assert "INVALID_ARGUMENT" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "s.csv").exists()
    p = run(stack_home, "smiles", tmp_path / "missing.mp4", "--out", tmp_path / "s.csv", check=False)
    assert p.returncode == 2 and "no such file" in p.stderr
    p = run(
        stack_home,
        "smiles",
        media_path("single_face.mp4"),
        "--out",
        tmp_path / "s.csv",
        "--face",
        "infant",
        check=False,
    )
    assert p.returncode == 2 and "infant" in p.stderr


def test_embedded_stack_runs_and_leaves_nothing_behind(tmp_path):
    """Without `dyadlab up`, a command starts its own stack and stops it after."""
    home = tmp_path / "home"
    before = _service_pids()
    p = run(home, "smiles", media_path("single_face.mp4"), "--out", tmp_path / "s.csv")
    assert "starting an embedded one" in p.stderr
    assert len(pd.read_csv(tmp_path / "s.csv")) >= 1
    assert _service_pids() == before
    assert not (home / "run" / "stack.json").exists()


def _service_pids() -> set[int]:
    out = subprocess.run(
        ["pgrep", "-f", "-- -m services\\.(extractor|smiles|stats)"], capture_output=True, text=True
    ).stdout
    return {int(x) for x in out.split()}


def test_down_stops_every_process(tmp_path):
    home = tmp_path / "home"
    run(home, "up", "--no-metrics")
    import json

    rec = json.loads((home / "run" / "stack.json").read_text())
    pids = list(rec["pids"].values())
    assert len(_pids_alive(pids)) == len(SERVICES)
    if rec.get("torchserve"):  # java (TorchServe's frontend) goes too
        pids.append(rec["torchserve"]["pid"])
    run(home, "down")
    assert _pids_alive(pids) == []
    assert run(home, "status", check=False).returncode == 3


def test_cohort_simulate_then_stats_writes_the_report(stack_home, tmp_path):
    sim = tmp_path / "sim"
    run(stack_home, "cohort", "simulate", "--participants", 40, "--seed", 7, "--out", sim)
    assert {p.name for p in sim.iterdir()} == {"scores.csv", "smiles.csv", "truth.json"}
    out = tmp_path / "report"
    p = run(
        stack_home,
        "stats",
        sim / "smiles.csv",
        "--scores",
        sim / "scores.csv",
        "--out",
        out,
        "--correction",
        "fdr_bh",
        "--seeds",
        1,
        "--folds",
        2,
    )
    names = {f.name for f in out.iterdir()}
    assert {
        "table2_mlp.csv",
        "table3_ttests.csv",
        "table4_anova.csv",
        "fig2_correlations.csv",
        "report.html",
        "table3.png",
    } <= names
    t3 = pd.read_csv(out / "table3_ttests.csv")
    assert t3["adjust"].eq("fdr_bh").all() and (t3["p_adj"] >= t3["p"] - 1e-12).all()
    assert "40 participants, 80 sessions" in p.stderr
    bad = tmp_path / "bad.csv"
    pd.read_csv(sim / "scores.csv").assign(pss=99).to_csv(bad, index=False)
    p = run(stack_home, "stats", sim / "smiles.csv", "--scores", bad, "--out", out, "--no-mlp", check=False)
    assert p.returncode == 2 and "column 'pss': 99 is outside PSS's range [0, 40]" in p.stderr


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    """`dyadlab status | head -1` (or `| grep -q`): the pipe closes while the
    command still writes; it stops quietly, as Unix tools do."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYADLAB_")}
    env["DYADLAB_HOME"] = str(tmp_path)
    env.update({var: f"127.0.0.1:{free_port()}" for var in (s.addr_env for s in SERVICES)})
    p = subprocess.run(
        f"'{DYADLAB}' status | head -c 1 >/dev/null",
        shell=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr


def test_extract_names_its_front_end_and_each_face_scale(stack_home, tmp_path):
    out = tmp_path / "frames.csv"
    p = run(stack_home, "extract", media_path("single_face.mp4"), "--out", out, "--no-speech")
    assert "face front-end mesh" in p.stderr and "AU12 scale: adult:" in p.stderr, p.stderr
    df = pd.read_csv(out)
    assert {"X_0", "Y_67", "Z_33"} <= set(df.columns)
    p = run(
        stack_home,
        "extract",
        media_path("single_face.mp4"),
        "--out",
        out,
        "--no-speech",
        "--frontend",
        "dlib",
    )
    assert "face front-end dlib" in p.stderr
    bad = run(
        stack_home,
        "extract",
        media_path("single_face.mp4"),
        "--out",
        out,
        "--frontend",
        "openface",
        check=False,
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_cli_front_end_choices_are_the_extractors():
    """The CLI imports no service, so it names the front-ends itself."""
    from dyadlab.cli import FRONTEND_CHOICES
    from services.extractor.frontends import FRONTENDS

    assert sorted(FRONTEND_CHOICES) == sorted(FRONTENDS)
