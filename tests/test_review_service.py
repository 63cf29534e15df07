"""Human review through the real smiles service (Smiles.SaveReview /
GetReview) on a real video: corrections are measured again by the automatic
smiles' code, stored as versions next to the automatic result, attributed to
the caller's token, and flow into `smiles --reviewed` and the cohort report."""

from __future__ import annotations

import io
import json
import time

import grpc
import pandas as pd
import pytest

from dyadlab import client, cohort, security
from dyadlab.v1 import common_pb2, extractor_pb2, extractor_pb2_grpc, smiles_pb2, smiles_pb2_grpc

from media import media_path

VIDEO = "WolfgangLanger_Pexels.mp4"
FEATURES = ["onset_end_s", "offset_start_s", "onset_amplitude", "offset_amplitude", "onset_duration_s",
            "apex_duration_s", "offset_duration_s", "max_onset_speed", "max_offset_speed", "au12_max",
            "symmetry", "ir_px", "n_frames"]  # fmt: skip


def _upload(store, path):
    from dyadlab.messages import object_ref
    from dyadlab.storage import put_content

    return object_ref(put_content(store, path))


@pytest.fixture(scope="module")
def analysed(services):
    """The video's frames (extractor) and the parent's automatic smiles."""
    store = services.store
    with client.channel(services.addr("extractor")) as ch:
        res = None
        for ev in extractor_pb2_grpc.ExtractorStub(ch).Extract(
            extractor_pb2.ExtractRequest(video=_upload(store, media_path(VIDEO))), timeout=600
        ):
            if ev.HasField("result"):
                res = ev.result
    ch = client.channel(services.addr("smiles"))
    stub = smiles_pb2_grpc.SmilesStub(ch)
    auto = _analyze(stub, res.frames, res.speech, reviewed=False)
    yield services, stub, res.frames, res.speech, auto
    ch.close()


def _analyze(stub, frames, speech, reviewed: bool):
    req = smiles_pb2.AnalyzeRequest(frames=frames, speech=speech, keep_speech=True, reviewed=reviewed)
    result = [ev.result for ev in stub.Analyze(req, timeout=300) if ev.HasField("result")][-1]
    return result


def _table(store, ref) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(store.get_bytes(ref.key)), float_precision="round_trip")


def _save(stub, frames, speech, face_id, smiles, base_version):
    req = smiles_pb2.ReviewRequest(
        frames=frames, speech=speech, face=common_pb2.FaceSelector(face_id=face_id), base_version=base_version
    )
    for s in smiles:
        m = req.smiles.add(start_s=s["start_s"], end_s=s["end_s"], status=s["status"])
        if s.get("smile_id") is not None:
            m.smile_id = s["smile_id"]
    return stub.SaveReview(req, timeout=300)


def test_a_review_is_measured_by_the_automatic_code_and_versioned(analysed):
    rs, stub, frames, speech, auto_res = analysed
    store = rs.store
    auto = _table(store, auto_res.smiles)
    fid = auto_res.face_id
    assert len(auto) >= 2, "the clip has smiles to review"
    # v1: the reviewer accepts every automatic smile as it is
    v1 = _save(stub, frames, speech, fid,
               [{"smile_id": int(r.smile_id), "start_s": r.start_s, "end_s": r.end_s, "status": "accepted"}
                for r in auto.itertuples()], 0)  # fmt: skip
    assert v1.version == 1 and v1.face_id == fid
    t1 = _table(store, v1.smiles)
    assert list(t1["smile_id"]) == list(auto["smile_id"]) and set(t1["review_status"]) == {"accepted"}
    for sid in auto.loc[auto["complete"].astype(bool), "smile_id"]:
        a, r = auto[auto.smile_id == sid].iloc[0], t1[t1.smile_id == sid].iloc[0]
        for c in FEATURES:  # the same code measured the same window: the same numbers
            assert a[c] == r[c] or (pd.isna(a[c]) and pd.isna(r[c])), (sid, c, a[c], r[c])
    # the reviewer is the caller's token (the local user's), recorded with the time
    record = json.loads(store.get_bytes(v1.record.key))
    assert record["reviewer"] == v1.reviewer and v1.reviewer not in ("", "anonymous (authentication off)")
    assert record["base_version"] == 0 and record["saved_at"] == v1.saved_at
    # someone saving from the same base again is refused: they would overwrite v1 unseen
    with pytest.raises(grpc.RpcError) as e:
        _save(stub, frames, speech, fid, [], 0)
    assert e.value.code() == grpc.StatusCode.ABORTED and "version 1" in e.value.details()

    # v2: one deleted, one moved, one added (where the face can be measured)
    first, second = auto.iloc[0], auto.iloc[1]
    moved_start = round(float(second.start_s) - 0.2, 3)
    added = (float(first.end_s) + 0.05, float(first.end_s) + 0.8)
    assert added[1] < moved_start
    v2 = _save(stub, frames, speech, fid,
               [{"smile_id": int(second.smile_id), "start_s": moved_start, "end_s": float(second.end_s),
                 "status": "edited"},
                {"smile_id": None, "start_s": added[0], "end_s": added[1], "status": "added"}]
               + [{"smile_id": int(r.smile_id), "start_s": r.start_s, "end_s": r.end_s, "status": "auto"}
                  for r in auto.iloc[2:].itertuples()], 1)  # fmt: skip
    t2 = _table(store, v2.smiles)
    assert v2.version == 2 and len(t2) == len(auto)  # -1 +1
    assert int(first.smile_id) not in set(t2["smile_id"])
    new = t2[t2.review_status == "added"].iloc[0]
    assert new.smile_id == auto["smile_id"].max() + 1 and (new.start_s, new.end_s) == added
    mv = t2[t2.smile_id == second.smile_id].iloc[0]
    assert mv.review_status == "edited" and mv.start_s == moved_start and mv.end_s == second.end_s
    assert mv.start_s <= mv.onset_end_s <= mv.end_s and mv.total_duration_s == pytest.approx(
        mv.end_s - moved_start
    )
    # the versions stay readable; the automatic result is untouched
    got = stub.GetReview(
        smiles_pb2.GetReviewRequest(frames=frames, face=common_pb2.FaceSelector(face_id=fid))
    )
    assert got.version == 2 and got.smiles.key == v2.smiles.key
    old = stub.GetReview(smiles_pb2.GetReviewRequest(frames=frames, face=common_pb2.FaceSelector(face_id=fid),
                                                     version=1))  # fmt: skip
    assert _table(store, old.smiles).equals(t1)
    assert _table(store, _analyze(stub, frames, speech, reviewed=False).smiles).equals(auto)
    # --reviewed: the latest review, said so
    rev = _analyze(stub, frames, speech, reviewed=True)
    assert (
        rev.review_version == 2 and _table(store, rev.smiles)["smile_id"].tolist() == t2["smile_id"].tolist()
    )


def test_a_review_the_face_cannot_support_is_refused_or_kept_unmeasured(analysed):
    rs, stub, frames, speech, auto_res = analysed
    fid = auto_res.face_id
    have = stub.GetReview(
        smiles_pb2.GetReviewRequest(frames=frames, face=common_pb2.FaceSelector(face_id=fid))
    )
    for bad, why in [({"start_s": 2.0, "end_s": 1.0, "status": "added"}, "do not make a window"),
                     ({"start_s": 1.0, "end_s": 2.0, "status": "maybe"}, "not one of")]:  # fmt: skip
        with pytest.raises(grpc.RpcError) as e:
            _save(stub, frames, speech, fid, [bad], have.version)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details()
    # a smile the reviewer saw after the video's last frame: an event without numbers
    res = _save(
        stub, frames, speech, fid, [{"start_s": 500.0, "end_s": 501.0, "status": "added"}], have.version
    )
    t = _table(rs.store, res.smiles)
    assert len(t) == 1 and not t["measured"].iloc[0] and pd.isna(t["onset_amplitude"].iloc[0])
    assert any("not measured" in n for n in res.notes)


def test_the_audit_log_names_the_reviewer(analysed):
    rs, stub, frames, speech, auto_res = analysed
    from dyadlab.stack import audit_log_path

    fid = auto_res.face_id
    have = stub.GetReview(
        smiles_pb2.GetReviewRequest(frames=frames, face=common_pb2.FaceSelector(face_id=fid))
    )
    res = _save(stub, frames, speech, fid, [], have.version)

    def saves():
        lines = open(audit_log_path(rs.settings)).read().splitlines()
        return [json.loads(x) for x in lines if '"/dyadlab.v1.Smiles/SaveReview"' in x]

    deadline = time.monotonic() + 10
    while not saves() and time.monotonic() < deadline:
        time.sleep(0.1)
    ok = [x for x in saves() if x["status"] == "OK"]
    assert ok, "SaveReview calls are audited"
    assert ok[-1]["who"] == {"role": "analyst", "name": res.reviewer, "via": "token"}
    # object keys appear shortened to a digest: no path, no file name
    assert ok[-1]["keys"] and all("/" not in k and "." not in k for k in ok[-1]["keys"])


def test_reviewed_smiles_change_the_cohort_tables_exactly(analysed):
    """cohort.apply_reviews swaps a session's smiles for its latest review;
    collect() then builds the report's smile table from exactly those rows."""
    rs, stub, frames, speech, auto_res = analysed
    store = rs.store
    record = {"participant_id": "p1", "visit_month": 6, "frames": 1, "duration_s": 10.0, "faces": 1,
              "face_id": auto_res.face_id, "role": "adult", "mean_confidence": 0.9, "notes": [],
              "seconds": 1.0, "smiles_key": auto_res.smiles.key, "frames_key": frames.key}  # fmt: skip
    other = dict(record, participant_id="p2", frames_key="", face_id=-1)
    with client.channel(rs.addr("smiles")) as ch:
        reviewed = cohort.apply_reviews([record, other], ch, 60)
    latest = stub.GetReview(
        smiles_pb2.GetReviewRequest(frames=frames, face=common_pb2.FaceSelector(face_id=auto_res.face_id))
    )
    assert reviewed[0]["review_version"] == latest.version and reviewed[1]["review_version"] == 0
    long_auto, _ = cohort.collect([record], store, keep_speech=True)
    long_rev, sessions = cohort.collect(reviewed, store, keep_speech=True)
    want = _table(store, latest.smiles)
    p1 = long_rev[long_rev["participant_id"] == "p1"]
    assert len(p1) == len(want) and list(p1["start_s"]) == list(want["start_s"])
    assert (long_rev["participant_id"] == "p2").sum() == len(_table(store, auto_res.smiles))
    assert len(long_auto) == len(_table(store, auto_res.smiles))
    assert list(sessions["review_version"]) == [latest.version, 0]


def test_every_review_rpc_has_the_analyst_role():
    for m in ("SaveReview", "GetReview"):
        assert security.allowed("analyst", f"/dyadlab.v1.Smiles/{m}")
        assert not security.allowed("service", f"/dyadlab.v1.Smiles/{m}")
