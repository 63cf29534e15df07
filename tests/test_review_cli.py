"""`dyadlab review` as a user runs it, on a real video, against a real stack
(`dyadlab up`): ELAN export, a coder's edited file imported into a reviewed
smile table, agreement between the two codings, and the review page in a
real browser saving corrections that `dyadlab smiles --reviewed` then uses."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from test_review_page import _keys, _open, _smile_el, _smiles, _status, _wait, driver  # noqa: F401

from dyadlab.services import SERVICES
from dyadlab.stack import free_port

from media import media_path

pympi = pytest.importorskip("pympi", reason="pympi-ling (a runtime pin) is not installed")

DYADLAB = str(Path(sys.executable).with_name("dyadlab"))
VIDEO = "WolfgangLanger_Pexels.mp4"


def _env(home: Path, ports: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYADLAB_")}
    return {**env, "DYADLAB_HOME": str(home), "DYADLAB_TORCHSERVE": "off", **ports}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """`dyadlab up` (no TorchServe) in a fresh home; `dyadlab down` after."""
    h = tmp_path_factory.mktemp("review-home")
    ports = {s.addr_env: f"127.0.0.1:{free_port()}" for s in SERVICES}
    env = _env(h, ports)
    subprocess.run([DYADLAB, "up", "--no-metrics"], env=env, check=True, capture_output=True, timeout=300)
    try:
        yield SimpleNamespace(path=h, env=env)
    finally:
        subprocess.run([DYADLAB, "down"], env=env, capture_output=True, timeout=120)


def run(home, *args, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([DYADLAB, *map(str, args)], env=home.env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(
            f"dyadlab {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
        )
    return p


@pytest.fixture(scope="module")
def exported(home, tmp_path_factory):
    d = tmp_path_factory.mktemp("eaf")
    video = d / VIDEO  # the EAF links the video next to it
    shutil.copy(media_path(VIDEO), video)
    run(home, "review", "export", video, "--eaf", d / "auto.eaf")
    run(home, "smiles", video, "--keep-speech", "--out", d / "auto.csv")
    return SimpleNamespace(dir=d, video=video, eaf=d / "auto.eaf", auto=pd.read_csv(d / "auto.csv"))


def test_export_writes_what_elan_opens(exported):
    e = pympi.Elan.Eaf(str(exported.eaf))
    assert {"smiles-parent", "phases-parent", "speech"} <= set(e.get_tier_names())
    anns = sorted(e.get_annotation_data_for_tier("smiles-parent"))
    auto = exported.auto
    assert [(a, b, int(v)) for a, b, v in anns] == [
        (round(r.start_s * 1000), round(r.end_s * 1000), int(r.smile_id)) for r in auto.itertuples()
    ]
    linked = [d["MEDIA_URL"] for d in e.media_descriptors]
    assert linked and linked[0].endswith(VIDEO)
    assert (exported.dir / "auto_au12.csv").exists() and (exported.dir / "auto_tsconf.xml").exists()


def test_an_edited_eaf_imports_with_exactly_its_changes_and_agreement_says_so(home, exported):
    auto = exported.auto
    assert len(auto) >= 2
    e = pympi.Elan.Eaf(str(exported.eaf))
    anns = sorted(e.get_annotation_data_for_tier("smiles-parent"))
    (a0, b0, v0), (a1, b1, v1) = anns[0], anns[1]
    e.remove_annotation("smiles-parent", (a0 + b0) // 2)  # the coder deletes the first smile
    e.remove_annotation("smiles-parent", (a1 + b1) // 2)
    e.add_annotation("smiles-parent", a1 - 150, b1, v1)  # and starts the second 150 ms earlier
    added = (b0 - 600, b0)  # and codes a smile inside the deleted one's time
    e.add_annotation("smiles-parent", *added, "")
    edited = exported.dir / "coder.eaf"
    e.to_file(str(edited))
    out = exported.dir / "reviewed.csv"
    p = run(home, "review", "import", edited, "--video", exported.video, "--out", out)
    assert f"{len(auto) - 2} kept, 1 moved, 1 added, 1 removed" in p.stderr
    t = pd.read_csv(out)
    assert int(v0) not in set(t["smile_id"]) and len(t) == len(auto)
    moved = t[t.smile_id == int(v1)].iloc[0]
    assert (moved.start_s, moved.end_s) == ((a1 - 150) / 1000, b1 / 1000)  # the coder's times, to the ms
    assert moved.review_status == "edited" and moved.start_s <= moved.onset_end_s <= moved.end_s
    new = t[t.review_status == "added"].iloc[0]
    assert (new.start_s, new.end_s) == (added[0] / 1000, added[1] / 1000) and new.measured
    assert pd.notna(new.onset_amplitude)  # measured again from the frames inside
    # agreement: the automatic coding against the coder's
    agree = exported.dir / "agreement.csv"
    p = run(home, "review", "agree", exported.eaf, edited, "--out", agree)
    row = pd.read_csv(agree).iloc[0]
    n = len(auto)
    # the coder's new smile lies inside the one they deleted (IoU >= 0.3), so the
    # one-to-one matching pairs the two: every event has a partner
    assert (row.tp, row.fn, row.fp) == (n, 0, 0)
    pairs = pd.read_csv(exported.dir / "agreement_matches.csv")
    moved_pair = pairs[pairs.a_id.astype(str) == str(int(v1))].iloc[0]
    assert moved_pair.onset_error_s == pytest.approx(-0.150, abs=1e-9)  # the coder started 150 ms earlier
    assert "F1" in p.stdout and (exported.dir / "agreement_matches.csv").exists()
    # --reviewed gives the imported review
    p = run(home, "smiles", exported.video, "--reviewed", "--keep-speech", "--out", exported.dir / "r.csv")
    assert "human review v1" in p.stdout
    assert pd.read_csv(exported.dir / "r.csv")["smile_id"].tolist() == t["smile_id"].tolist()


def test_the_review_page_on_a_real_stack(home, exported, driver, tmp_path):  # noqa: F811
    """The page from `dyadlab review VIDEO`: the latest review's smiles, a
    deletion and an addition by keyboard, saved through the smiles service,
    there after a reload and in `dyadlab smiles --reviewed`."""
    proc = subprocess.Popen(
        [DYADLAB, "review", exported.video, "--no-browser", "--keep-speech"],
        env=home.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = ""
        while not url.startswith("http://127.0.0.1:"):
            url = proc.stdout.readline().strip()
            assert url or proc.poll() is None, proc.stderr.read()
        page = SimpleNamespace(url=url)
        _open(driver, page)
        before = [s[1] for s in _smiles(driver)]
        reviewed = (
            pd.read_csv(exported.dir / "reviewed.csv") if (exported.dir / "reviewed.csv").exists() else None
        )
        if reviewed is not None:  # the import above saved v1: the page shows it
            assert sorted(before, key=int) == sorted(map(str, reviewed["smile_id"]), key=int)
        first = before[0]
        _smile_el(driver, first).click()
        _keys(driver, "d")
        _wait(lambda: first not in [s[1] for s in _smiles(driver)], "the deletion")
        driver.execute_script("document.getElementById('video').currentTime = 1.0")
        _wait(lambda: abs(driver.execute_script("return document.getElementById('video').currentTime") - 1) < 0.1,
              "the seek")  # fmt: skip
        _keys(driver, "n", "s")
        _wait(lambda: "saved v" in _status(driver), "the save", timeout=60)
        after = [s[1] for s in _smiles(driver)]
        assert first not in after and len(after) == len(before)
        driver.get(url)
        _wait(lambda: driver.execute_script("return document.body.dataset.ready === '1'"), "the reload")
        assert sorted(s[1] for s in _smiles(driver)) == sorted(after)
        shot = tmp_path / "review.png"
        shot.write_bytes(driver.get_screenshot_as_png())
        if os.environ.get("DYADLAB_REVIEW_SCREENSHOT"):
            shutil.copy(shot, os.environ["DYADLAB_REVIEW_SCREENSHOT"])
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "review page stopped" in err
    p = run(home, "smiles", exported.video, "--reviewed", "--keep-speech", "--out", tmp_path / "r.csv")
    t = pd.read_csv(tmp_path / "r.csv")
    assert int(first) not in set(t["smile_id"]) and (t["review_status"] == "added").any()
    assert "human review v" in p.stdout
