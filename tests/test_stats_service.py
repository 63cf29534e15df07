"""The stats service over real sockets, its APA report, and the report in Chromium."""

from __future__ import annotations

import io
import shutil
import subprocess

import grpc
import pandas as pd
import pytest

from dyadlab import client
from dyadlab.v1 import common_pb2, stats_pb2, stats_pb2_grpc
from services.stats import report

DEADLINE_S = 600.0


# -- APA numbers --------------------------------------------------------------------
def test_apa_formatting_follows_the_paper_and_apa_rules():
    assert report.apa_t(4.3712, 207.331, 0.00002, 0.5149) == "t(207.33) = 4.37, p < .001, d = 0.51"
    assert report.apa_t(-0.5, 354.53, 0.62) == "t(354.53) = -0.50, p = .620"
    assert report.apa_f(5.312, 2, 179, 0.0061, 0.0583) == "F(2, 179) = 5.31, p = .006, ηp² = .06"
    assert report.apa_p(0.0499) == "p = .050" and report.apa_p(0.9999) == "p > .999"
    assert report.apa_r(-0.3456, 52, 0.012) == "r(50) = -.35, p = .012"


# -- the service ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stats(services):
    ch = client.channel(services.addr("stats"))
    yield services, stats_pb2_grpc.StatsStub(ch)
    ch.close()


def _files(res) -> dict[str, str]:
    return {f.name: f.ref.key for f in res.files}


@pytest.fixture(scope="module")
def simulated(stats):
    rs, stub = stats
    res = stub.Simulate(stats_pb2.SimulateRequest(participants=94, seed=3), timeout=60)
    return _files(res)


@pytest.fixture(scope="module")
def analysed(stats, simulated):
    rs, stub = stats
    req = stats_pb2.CohortRequest(
        smiles=common_pb2.ObjectRef(key=simulated["smiles.csv"]),
        scores=common_pb2.ObjectRef(key=simulated["scores.csv"]),
        correction=stats_pb2.CORRECTION_HOLM,
        mlp=stats_pb2.MlpOptions(seeds=2, folds=3),
    )
    events = list(stub.AnalyzeCohort(req, timeout=DEADLINE_S))
    assert events[-1].HasField("result")
    return [e.progress for e in events[:-1]], events[-1].result


def test_simulate_writes_a_valid_cohort(stats, simulated):
    rs, _ = stats
    assert set(simulated) == {"scores.csv", "smiles.csv", "truth.json"}
    sc = pd.read_csv(io.BytesIO(rs.store.get_bytes(simulated["scores.csv"])))
    assert len(sc) == 188 and set(sc["visit_month"]) == {6, 12}


def test_analyze_cohort_writes_every_table_figure_and_the_report(stats, simulated, analysed):
    rs, _ = stats
    progress, res = analysed
    stages = {p.stage for p in progress}
    assert {"load", "tests", "mlp", "report"} <= stages
    mlp = [p for p in progress if p.stage == "mlp"]
    assert mlp[-1].done == mlp[-1].total > 0
    files = _files(res)
    assert {
        "table2_mlp.csv",
        "table3_ttests.csv",
        "table4_anova.csv",
        "fig2_correlations.csv",
        "table2.png",
        "table3.png",
        "table4.png",
        "fig2.png",
        "report.html",
    } <= set(files)
    t3 = pd.read_csv(io.BytesIO(rs.store.get_bytes(files["table3_ttests.csv"])))
    assert {"feature", "t", "df", "p", "cohens_d", "mean_6", "sd_6", "mean_12", "sd_12", "p_adj"} <= set(
        t3.columns
    )
    assert len(t3) == 8 and (t3["df"] % 1 != 0).any()  # Welch df are fractional
    # machine-readable tables keep full precision: the CSV's t is scipy's, to the last bit
    # (read back with round-trip parsing; pandas' default parser may differ in the last bit)
    t3 = pd.read_csv(io.BytesIO(rs.store.get_bytes(files["table3_ttests.csv"])), float_precision="round_trip")
    from services.stats import inference, scores

    sm = scores.validate_smiles(pd.read_csv(io.BytesIO(rs.store.get_bytes(simulated["smiles.csv"]))))
    direct = inference.welch_table(sm).set_index("feature")
    for _, row in t3.iterrows():
        assert row["t"] == direct.loc[row["feature"], "t"] and row["df"] == direct.loc[row["feature"], "df"]
    t4 = pd.read_csv(io.BytesIO(rs.store.get_bytes(files["table4_anova.csv"])))
    assert {"feature", "visit_month", "score", "F", "df1", "df2", "p", "partial_eta2"} <= set(t4.columns)
    assert len(t4) == 2 * 3 * 8  # visits x categorical scores x features, all listed
    t2 = pd.read_csv(io.BytesIO(rs.store.get_bytes(files["table2_mlp.csv"])))
    assert set(t2["score"]) == {"phq9", "aces", "pss", "pearls", "social_support"}
    assert res.participants == 94 and res.sessions == 188 and res.smiles > 500
    page = rs.store.get_bytes(files["report.html"]).decode()
    assert 'id="table3"' in page and 'id="table4"' in page and 'id="table2"' in page
    assert "t(" in page and "F(" in page and "ηp²" in page and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page  # readable offline


def test_bad_questionnaire_is_invalid_argument_with_row_and_column(stats, simulated, tmp_path):
    rs, stub = stats
    sc = pd.read_csv(io.BytesIO(rs.store.get_bytes(simulated["scores.csv"])))
    sc.loc[4, "phq9"] = 31
    key = "inputs/bad-scores.csv"
    rs.store.put_bytes(key, sc.to_csv(index=False).encode())
    req = stats_pb2.CohortRequest(
        smiles=common_pb2.ObjectRef(key=simulated["smiles.csv"]),
        scores=common_pb2.ObjectRef(key=key),
        mlp=stats_pb2.MlpOptions(skip=True),
    )
    with pytest.raises(grpc.RpcError) as e:
        list(stub.AnalyzeCohort(req, timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "row 5, column 'phq9': 31 is outside PHQ-9's range [0, 27]" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(
            stub.AnalyzeCohort(
                stats_pb2.CohortRequest(
                    smiles=common_pb2.ObjectRef(key="inputs/none.csv"), scores=common_pb2.ObjectRef(key=key)
                ),
                timeout=60,
            )
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_per_session_references_give_the_same_tables(stats, simulated):
    """Sessions as separate smile tables (the smiles service's output) = one long table."""
    rs, stub = stats
    long = pd.read_csv(io.BytesIO(rs.store.get_bytes(simulated["smiles.csv"])))
    sessions = []
    for (pid, visit), one in long.groupby(["participant_id", "visit_month"]):
        key = f"inputs/session-{pid}-{visit}.csv"
        rs.store.put_bytes(
            key, one.drop(columns=["participant_id", "visit_month"]).to_csv(index=False).encode()
        )
        sessions.append(
            stats_pb2.SessionSmiles(
                participant_id=str(pid), visit_month=int(visit), smiles=common_pb2.ObjectRef(key=key)
            )
        )
    scores = common_pb2.ObjectRef(key=simulated["scores.csv"])
    results = []
    for req in (
        stats_pb2.CohortRequest(
            sessions=stats_pb2.SessionList(sessions=sessions),
            scores=scores,
            mlp=stats_pb2.MlpOptions(skip=True),
        ),
        stats_pb2.CohortRequest(
            smiles=common_pb2.ObjectRef(key=simulated["smiles.csv"]),
            scores=scores,
            mlp=stats_pb2.MlpOptions(skip=True),
        ),
    ):
        res = list(stub.AnalyzeCohort(req, timeout=DEADLINE_S))[-1].result
        results.append(pd.read_csv(io.BytesIO(rs.store.get_bytes(_files(res)["table3_ttests.csv"]))))
    pd.testing.assert_frame_equal(results[0], results[1])


# -- the report in a real browser ------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)",
)
def test_report_renders_in_headless_chromium(stats, analysed, tmp_path):
    rs, _ = stats
    page = tmp_path / "report.html"
    page.write_bytes(rs.store.get_bytes(_files(analysed[1])["report.html"]))
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    # The browser's own DOM: tables parsed, with rows, and every figure decoded.
    assert dom.count("<table") == 3 and "Table III." in dom and "Table IV." in dom
    assert dom.count("<tr") > 8 + 48 + 5
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*common, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from matplotlib.image import imread

    img = imread(shot)
    assert img.shape[0] == 1600 and img.shape[1] == 1200
    ink = (img[..., :3].mean(axis=2) < 0.5).mean()
    assert 0.01 < ink < 0.5, f"screenshot looks blank or broken (dark share {ink:.3f})"
    # The first table sits near the top: dark rule lines across the page's width.
    rows_dark = (img[..., :3].mean(axis=2) < 0.3).mean(axis=1)
    assert (rows_dark > 0.3).any()


def test_a_cohort_too_small_for_some_analyses_still_gets_a_report(tmp_path):
    """Two sessions: no correlation can be estimated; the report says so instead of failing."""
    from services.stats import inference
    from services.stats import scores as sc

    rows = [
        {
            "participant_id": "A",
            "visit_month": v,
            "smile_id": k,
            **{f: 0.1 * k + (v == 12) * 0.05 for f in sc.FEATURES},
        }
        for v in (6, 12)
        for k in (1, 2, 3)
    ]
    smiles = sc.validate_smiles(pd.DataFrame(rows))
    table, _ = sc.validate_scores(
        pd.DataFrame(
            {
                "participant_id": ["A", "A"],
                "visit_month": [6, 12],
                "phq9": [3, 4],
                "aces": [1, 1],
                "pss": [10, 12],
                "pearls": [0, 0],
                "social_support": [80, 85],
            }
        )
    )
    joined, _ = sc.join(smiles, table)
    corr = inference.correlation_table(joined)
    files = report.write_all(
        tmp_path,
        None,
        inference.welch_table(smiles),
        inference.anova_table(joined),
        corr,
        [],
        {"summary": "tiny"},
    )
    assert files["fig2.png"].read_bytes()[:4] == b"\x89PNG"
    assert "Table III." in files["report.html"].read_text()
