"""ELAN round trips (dyadlab/review/eaf.py): what export_eaf writes, read back with
pympi itself; a coder's edits made with pympi come back through read_eaf and
edited_smiles; bad input gives a clear ValueError. Whether ELAN itself opens the
files (and plots the AU12 track) is for a person to check: ELAN is not here."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pympi.Elan import Eaf

from dyadlab.review.eaf import (
    CONTINUOUS,
    CSV_PROVIDER,
    DISCONTINUOUS,
    edited_smiles,
    export_eaf,
    media_mime,
    read_eaf,
)

from media import media_path

# times that are not whole milliseconds, so rounding is exercised
SMILES = pd.DataFrame(
    {
        "face_id": [0, 0, 0, 0],
        "smile_id": [1, 2, 3, 4],
        "start_s": [0.5004, 2.0336, 4.1, 6.66666],
        "onset_end_s": [0.9, 2.4665, 4.5, 7.0],
        "offset_start_s": [1.2, 2.4665, 5.2, np.nan],  # 2: no apex (zero length); 4: incomplete
        "end_s": [1.7335, 3.0, 5.9996, 7.5],
    }
)
SPEECH = [(0.0, 0.25), (3.1, 3.9), (3.5, 4.0), (8.0, 9.0)]  # two overlap: merged


def trace(n: int = 300, fps: float = 30.0, drop: slice | None = None) -> pd.DataFrame:
    t = np.arange(n) / fps
    df = pd.DataFrame(
        {
            "timestamp": t,
            "AU12_r": np.clip(2 + 2 * np.sin(t), 0, 5),
            "AU06_r": np.clip(1 + np.cos(t), 0, 5),
            "confidence": np.full(n, 0.98),
        }
    )
    df.loc[5, "AU06_r"] = np.nan
    return df.drop(index=df.index[drop]) if drop is not None else df


def export(tmp_path: Path, **kw) -> list[Path]:
    args: dict = dict(media=tmp_path / "clip.mp4", smiles=SMILES, speech=SPEECH, trace=trace())
    args.update(kw)
    return export_eaf(tmp_path / "session.eaf", **args)


def ms(t: float) -> int:
    return round(t * 1000)


def anns(eaf: Eaf, tier: str) -> list[tuple[int, int, str]]:
    return sorted(eaf.get_annotation_data_for_tier(tier))


# -- export --------------------------------------------------------------------------------
def test_export_writes_the_eaf_the_trace_and_its_configuration(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"")
    paths = export(tmp_path)
    eaf_path, csv_path, conf_path = paths
    assert paths == [tmp_path / "session.eaf", tmp_path / "session_au12.csv", tmp_path / "session_tsconf.xml"]
    assert all(p.is_file() for p in paths)
    assert not list(tmp_path.glob("*.bak")) and not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "plain.txt").write_text("x")  # written files get ordinary permissions (umask)
    mode = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert all(p.stat().st_mode & 0o777 == mode for p in paths)

    eaf = Eaf(str(eaf_path))
    assert set(eaf.get_tier_names()) == {"smiles-parent", "phases-parent", "speech"}
    # ELAN numbers new annotations from lastUsedAnnotation: it must be the highest id in use
    highest = max(int(a[1:]) for a in eaf.annotations)
    assert dict(eaf.properties)["lastUsedAnnotation"] == str(highest)
    (media,) = eaf.media_descriptors
    assert media["MEDIA_URL"] == "file://" + str((tmp_path / "clip.mp4").resolve())
    assert media["RELATIVE_MEDIA_URL"] == "./clip.mp4"
    assert media["MIME_TYPE"] == "video/mp4"

    # smiles: one per smile, value = smile_id, times round(t*1000) exactly
    assert anns(eaf, "smiles-parent") == [
        (ms(a), ms(b), str(i)) for i, a, b in zip(SMILES.smile_id, SMILES.start_s, SMILES.end_s)
    ]
    # 0.5004 -> 500; 1.7335 -> 1733.5 -> 1734 (Python's round: half to even)
    assert anns(eaf, "smiles-parent")[0][:2] == (500, 1734)
    # phases: zero-length apex of smile 2 and the missing offset of smile 4 are left out
    expected = []
    for r in SMILES.itertuples():
        expected.append((ms(r.start_s), ms(r.onset_end_s), "onset"))
        apex_end = r.end_s if np.isnan(r.offset_start_s) else r.offset_start_s
        if ms(apex_end) > ms(r.onset_end_s):
            expected.append((ms(r.onset_end_s), ms(apex_end), "apex"))
        if not np.isnan(r.offset_start_s):
            expected.append((ms(r.offset_start_s), ms(r.end_s), "offset"))
    assert anns(eaf, "phases-parent") == sorted(expected)
    assert [v for *_, v in anns(eaf, "phases-parent")].count("apex") == 3
    assert [v for *_, v in anns(eaf, "phases-parent")].count("offset") == 3
    # speech: overlapping segments merged, value "speech"
    assert anns(eaf, "speech") == [(0, 250, "speech"), (3100, 4000, "speech"), (8000, 9000, "speech")]

    # the trace files are linked as secondary files
    links = {Path(d["LINK_URL"]).name: d for d in eaf.linked_file_descriptors}
    assert set(links) == {"session_au12.csv", "session_tsconf.xml"}
    csv_link, conf_link = links["session_au12.csv"], links["session_tsconf.xml"]
    assert csv_link["LINK_URL"] == "file://" + str(csv_path.resolve())
    assert csv_link["RELATIVE_LINK_URL"] == "./session_au12.csv" and csv_link["MIME_TYPE"] == "unknown"
    assert csv_link["ASSOCIATED_WITH"] == media["MEDIA_URL"]
    assert conf_link["RELATIVE_LINK_URL"] == "./session_tsconf.xml" and conf_link["MIME_TYPE"] == "text/xml"

    # CSV: a '#' header ELAN skips, then one row per trace sample, time in seconds
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "#time,AU12,AU06,confidence"
    assert all("." in line.split(",")[0] for line in lines[1:])  # ELAN's "sec.msec" time format
    back = pd.read_csv(csv_path, float_precision="round_trip")
    tr = trace()
    assert len(back) == len(tr)
    np.testing.assert_allclose(back["#time"], tr["timestamp"], atol=1e-6)
    np.testing.assert_allclose(back["AU12"], tr["AU12_r"], rtol=0, atol=0)
    assert back["AU06"].isna().sum() == 1 and lines[6].split(",")[2] == "NaN"

    # tsconf: ELAN's timeseries configuration, pointing at the CSV
    root = ET.parse(conf_path).getroot()
    assert root.tag == "timeseries" and root.get("version") == "1.0" and root.get("date")
    (src,) = root.findall("tracksource")
    assert src.get("source-url") == csv_link["LINK_URL"]
    assert src.get("time-column") == "0" and src.get("sample-type") == CONTINUOUS
    assert src.find("property").attrib == {"key": "provider", "value": CSV_PROVIDER}
    tracks = src.findall("track")
    header = lines[0].lstrip("#").split(",")
    assert [t.get("name") for t in tracks] == ["AU12", "AU06", "confidence"]
    for t in tracks:
        pos = t.find("sample-position/pos")
        assert header[int(pos.get("col"))] == t.get("name") and pos.get("row") == "0"
        assert t.get("derivative") == "0"
        assert t.find("property").attrib == {"key": "detect-range", "value": "false"}
        assert t.find("units").text and t.find("description").text
        assert len(t.find("color").text.split(",")) == 3
    au12 = tracks[0]
    assert au12.find("range").attrib == {"max": "5.0", "min": "0.0"}
    assert au12.find("units").text == "intensity" and "AU12" in au12.find("description").text


def test_trace_with_gaps_is_discontinuous_and_only_present_columns_are_written(tmp_path):
    gappy = trace(drop=slice(100, 130))[["timestamp", "AU12_r"]]
    _, csv_path, conf_path = export(tmp_path, trace=gappy)
    assert csv_path.read_text().splitlines()[0] == "#time,AU12"
    assert len(pd.read_csv(csv_path)) == len(gappy)
    src = ET.parse(conf_path).getroot().find("tracksource")
    assert src.get("sample-type") == DISCONTINUOUS
    assert [t.get("name") for t in src.findall("track")] == ["AU12"]


def test_without_trace_or_speech_only_the_eaf(tmp_path):
    paths = export(tmp_path, trace=None, speech=None, face_label="")
    assert paths == [tmp_path / "session.eaf"]
    eaf = Eaf(str(paths[0]))
    assert set(eaf.get_tier_names()) == {"smiles", "phases"}
    assert eaf.linked_file_descriptors == []


def test_speech_table_and_empty_speech(tmp_path):
    speech = pd.DataFrame({"start_s": [1.0, 2.0], "end_s": [1.5, 2.0005], "duration_s": [0.5, 0.0005]})
    (eaf_path,) = export(tmp_path, speech=speech, trace=None)
    assert anns(Eaf(str(eaf_path)), "speech") == [(1000, 1500, "speech"), (2000, 2000 + 1, "speech")]
    (eaf_path,) = export(tmp_path, speech=[], trace=None)
    eaf = Eaf(str(eaf_path))
    assert "speech" in eaf.get_tier_names() and anns(eaf, "speech") == []


def test_several_faces_get_one_tier_each(tmp_path):
    two = pd.concat([SMILES, SMILES.assign(face_id=1, start_s=SMILES.start_s + 10, end_s=SMILES.end_s + 10)])
    two["onset_end_s"] = two["onset_end_s"].where(two.face_id == 0, two.onset_end_s + 10)
    two["offset_start_s"] = two["offset_start_s"].where(two.face_id == 0, two.offset_start_s + 10)
    (eaf_path,) = export(tmp_path, smiles=two, trace=None)
    eaf = Eaf(str(eaf_path))
    assert set(eaf.get_tier_names()) == {
        "smiles-face0",
        "phases-face0",
        "smiles-face1",
        "phases-face1",
        "speech",
    }
    assert len(anns(eaf, "smiles-face1")) == 4 and anns(eaf, "smiles-face1")[0][0] == 10500
    with pytest.raises(ValueError, match=r"2 tiers named like 'smiles\*'.*smiles-face0.*smiles-face1"):
        read_eaf(eaf_path)
    assert list(read_eaf(eaf_path, "smiles-face1")["smile_id"]) == ["1", "2", "3", "4"]


def test_media_in_another_folder_gets_a_parent_relative_url(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "review").mkdir()
    video = tmp_path / "videos" / "visit 1.MP4"
    paths = export_eaf(tmp_path / "review" / "s.eaf", media=video, smiles=SMILES, speech=None, trace=trace())
    eaf = Eaf(str(paths[0]))
    (media,) = eaf.media_descriptors
    assert media["RELATIVE_MEDIA_URL"] == "../videos/visit 1.MP4"  # as ELAN writes it: not percent-encoded
    assert media["MEDIA_URL"] == "file://" + str(video.resolve()) and media["MIME_TYPE"] == "video/mp4"
    assert {d["RELATIVE_LINK_URL"] for d in eaf.linked_file_descriptors} == {"./s_au12.csv", "./s_tsconf.xml"}
    assert media_mime(Path("a.mov")) == "video/quicktime" and media_mime(Path("a.wav")) == "audio/x-wav"
    assert media_mime(Path("a.mkv")) in ("video/*", "unknown") and media_mime(Path("a.xyz")) == "unknown"


def test_real_video_is_linked(tmp_path):
    video = media_path("single_face.mp4")
    (eaf_path,) = export_eaf(tmp_path / "real.eaf", media=video, smiles=SMILES, speech=None, trace=None)
    (media,) = Eaf(str(eaf_path)).media_descriptors
    assert media["MEDIA_URL"] == "file://" + str(video.resolve())
    assert media["MIME_TYPE"] == "video/mp4"
    rel = media["RELATIVE_MEDIA_URL"]
    assert (tmp_path / rel).resolve() == video.resolve()
    assert os.path.samefile(tmp_path / rel, video)


def test_unusable_smile_tables_are_refused(tmp_path):
    with pytest.raises(ValueError, match="missing columns: smile_id"):
        export(tmp_path, smiles=SMILES.drop(columns="smile_id"))
    overlapping = SMILES.copy()
    overlapping.loc[1, "start_s"] = 1.5
    with pytest.raises(ValueError, match="smiles 1 and 2 overlap"):
        export(tmp_path, smiles=overlapping)
    with pytest.raises(ValueError, match="smile 3 end_s is not a finite time"):
        export(tmp_path, smiles=SMILES.assign(end_s=SMILES.end_s.where(SMILES.smile_id != 3)))
    with pytest.raises(ValueError, match="smile_id values repeat: 1"):
        export(tmp_path, smiles=SMILES.assign(smile_id=[1, 1, 2, 3]))
    with pytest.raises(ValueError, match="several faces"):
        export(tmp_path, trace=pd.concat([trace().assign(face_id=0), trace().assign(face_id=1)]))


# -- round trip ----------------------------------------------------------------------------
def test_unedited_export_reads_back_all_kept(tmp_path):
    eaf_path = export(tmp_path)[0]
    table = read_eaf(eaf_path)
    assert list(table.columns) == ["start_s", "end_s", "smile_id"]
    assert list(table["smile_id"]) == ["1", "2", "3", "4"]
    assert [ms(t) for t in table["start_s"]] == [ms(t) for t in SMILES.start_s]
    edits = edited_smiles(SMILES, table)
    assert list(edits.columns) == ["smile_id", "start_s", "end_s", "status"]
    assert set(edits["status"]) == {"kept"}
    pd.testing.assert_series_equal(edits["start_s"], SMILES["start_s"], check_names=False)


def test_a_coders_edits_come_back(tmp_path):
    eaf_path = export(tmp_path)[0]
    tier = "smiles-parent"
    eaf = Eaf(str(eaf_path))
    eaf.remove_annotation(tier, 2500)  # smile 2 removed
    eaf.remove_annotation(tier, 4500)  # smile 3: end moved to 6.25 s
    eaf.add_annotation(tier, ms(4.1), 6250, "3")
    eaf.add_annotation(tier, 8000, 9200, "")  # a smile dyadlab missed, value left empty
    eaf.to_file(str(eaf_path))

    table = read_eaf(eaf_path)
    assert list(table["smile_id"]) == ["1", "3", "4", "new-1"]
    assert list(table["start_s"]) == sorted(table["start_s"])

    edits = edited_smiles(SMILES, table).set_index("smile_id")
    assert edits["status"].value_counts().to_dict() == {"kept": 2, "moved": 1, "added": 1, "removed": 1}
    assert edits.loc["2", "status"] == "removed"
    assert tuple(edits.loc["2", ["start_s", "end_s"]]) == (2.0336, 3.0)
    assert edits.loc["3", "status"] == "moved" and tuple(edits.loc["3", ["start_s", "end_s"]]) == (4.1, 6.25)
    assert edits.loc["new-1", "status"] == "added"
    assert tuple(edits.loc["new-1", ["start_s", "end_s"]]) == (8.0, 9.2)
    assert set(edits.loc[["1", "4"], "status"]) == {"kept"}
    assert edits.loc["4", "start_s"] == 6.66666  # kept rows keep the original (sub-ms) times


def test_new_ids_do_not_collide_and_repeated_ids_are_refused(tmp_path):
    eaf_path = export(tmp_path, trace=None)[0]
    eaf = Eaf(str(eaf_path))
    eaf.add_annotation("smiles-parent", 8000, 8500, "new-1")
    eaf.add_annotation("smiles-parent", 9000, 9500, "  ")
    eaf.add_annotation("smiles-parent", 10000, 10500, "1")  # the coder copied smile 1
    eaf.to_file(str(eaf_path))
    table = read_eaf(eaf_path)
    assert list(table["smile_id"])[-3:] == ["new-1", "new-2", "1"]
    with pytest.raises(ValueError, match="smile_id repeats in the EAF tier: 1"):
        edited_smiles(SMILES, table)
    with pytest.raises(ValueError, match="pass one face's smiles"):
        edited_smiles(pd.concat([SMILES, SMILES.assign(face_id=1)]), table.iloc[:2])


# -- errors --------------------------------------------------------------------------------
def test_missing_and_ambiguous_tiers(tmp_path):
    eaf_path = export(tmp_path, trace=None)[0]
    with pytest.raises(ValueError, match=r"no tier 'smiles'.*'smiles-parent', 'phases-parent', 'speech'"):
        read_eaf(eaf_path, "smiles")
    assert list(read_eaf(eaf_path, "phases-parent")["smile_id"])[:3] == ["onset", "apex", "offset"]

    eaf = Eaf(str(eaf_path))
    eaf.add_tier("smiles-infant")
    eaf.to_file(str(eaf_path))
    with pytest.raises(ValueError, match=r"2 tiers named like 'smiles\*'.*'smiles-parent'.*'smiles-infant'"):
        read_eaf(eaf_path)

    (none,) = export(tmp_path, smiles=SMILES.iloc[:0], trace=None)
    eaf = Eaf(str(none))
    eaf.remove_tier("smiles-parent")
    eaf.to_file(str(none))
    with pytest.raises(ValueError, match=r"no tier named like 'smiles\*'"):
        read_eaf(none)


@pytest.mark.parametrize(
    "content",
    [
        b"smile_id,start_s,end_s\n1,0.5,1.0\n",
        b"",
        b"\x00\x00\x00\x18ftypmp42",
        b'<?xml version="1.0"?><timeseries version="1.0"/>',
        b'<?xml version="1.0"?><ANNOTATION_DOCUMENT><TIER/></ANNOTATION_DOCUMENT>',
    ],
    ids=["csv", "empty", "video", "other-xml", "broken-eaf"],
)
def test_a_file_that_is_not_an_eaf_is_a_clear_value_error(tmp_path, content):
    p = tmp_path / "x.eaf"
    p.write_bytes(content)
    with pytest.raises(ValueError, match="is not (an|a readable) ELAN .eaf file"):
        read_eaf(p)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_eaf(tmp_path / "nope.eaf")
