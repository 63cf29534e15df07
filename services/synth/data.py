"""Training data for avLandmarkGAN: labels -> valence/arousal, faces -> aligned crops.

Two label formats are read into one table (columns ``image, label, valence,
arousal``):

* ``read_discrete`` -- a legend CSV with a discrete emotion per image
  (muxspace/facial_expressions' ``user.id,image,emotion``). Labels are
  lower-cased and stripped; synonyms map to the eight classes of the paper's
  Table II, which gives each class a (valence, arousal) point (``TABLE_II``).
  Repeated rows with the same label collapse to one; an image with
  *conflicting* labels is dropped (it cannot be trusted either way) and
  reported. Unknown labels are an error naming them.
* ``read_continuous`` -- an AffectNet-style CSV with continuous ``valence``
  and ``arousal`` columns (and the image in ``image`` or AffectNet's
  ``subDirectory_filePath``). AffectNet marks images without a usable face
  with -2: rows outside [-1, 1] are dropped and counted.

``prepare`` finds the face in every image with the shared still-image detector
(`dyadlab.face.still`, the extractor's dlib models), aligns and crops it to
``size`` x ``size`` (`landmarks.align_face`) and caches the result --
uint8 crops, crop-pixel landmarks, VA, class, split -- as one ``.npz`` in the
object store, keyed by a hash of the image bytes, the labels and the
preparation settings: a second run (or another machine with the same store)
loads it in a second.

The validation split is fixed by the image *name*: an image is in validation
when the first 8 hex digits of sha1(name) fall below ``val_fraction`` of
2^32. It does not depend on the seed, the order or which other images are
present, so every model trained on the set is judged on the same faces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from services.synth import landmarks as L

log = logging.getLogger(__name__)

PREP_VERSION = "1"

#: Wang et al. 2021, Table II: discrete emotion -> (valence, arousal).
TABLE_II: dict[str, tuple[float, float]] = {
    "neutral": (0.0043, 0.0040),
    "happy": (0.6652, 0.1342),
    "sad": (-0.6864, -0.2585),
    "surprise": (0.2306, 0.6812),
    "fear": (-0.1156, 0.7741),
    "disgust": (-0.7312, 0.4342),
    "anger": (-0.3646, 0.6604),
    "contempt": (-0.5548, 0.5880),
}
CLASSES = tuple(TABLE_II)
SYNONYMS = {
    "happiness": "happy",
    "sadness": "sad",
    "angry": "anger",
    "surprised": "surprise",
    "fearful": "fear",
    "disgusted": "disgust",
}


class DataError(ValueError):
    """The label table or the images cannot be used as given."""


def canonical_label(raw: str) -> str | None:
    s = str(raw).strip().lower()
    s = SYNONYMS.get(s, s)
    return s if s in TABLE_II else None


def read_discrete(
    csv_path: str | os.PathLike, image_col: str = "image", label_col: str = "emotion"
) -> tuple[pd.DataFrame, dict]:
    """Legend CSV -> (table, report). See the module docstring for the rules."""
    df = pd.read_csv(csv_path, dtype=str)
    missing = [c for c in (image_col, label_col) if c not in df.columns]
    if missing:
        raise DataError(f"{Path(csv_path).name}: missing column(s) {missing}; has {list(df.columns)}")
    n_rows = len(df)
    df = df[[image_col, label_col]].dropna().rename(columns={image_col: "image", label_col: "raw"})
    unlabelled = n_rows - len(df)
    df["label"] = df["raw"].map(canonical_label)
    unknown = sorted(set(df.loc[df["label"].isna(), "raw"]))
    if unknown:
        raise DataError(f"unknown emotion label(s) {unknown[:10]}; known: {list(TABLE_II)}")
    df = df.drop_duplicates(["image", "label"])
    n_labels = df.groupby("image")["label"].transform("nunique")
    conflicting = sorted(df.loc[n_labels > 1, "image"].unique())
    df = df[n_labels == 1].reset_index(drop=True)
    df["valence"] = [TABLE_II[c][0] for c in df["label"]]
    df["arousal"] = [TABLE_II[c][1] for c in df["label"]]
    report = {
        "rows": int(len(df)),
        "conflicting_dropped": len(conflicting),
        "unlabelled_dropped": unlabelled,
        "classes": {c: int((df["label"] == c).sum()) for c in CLASSES},
    }
    return df[["image", "label", "valence", "arousal"]], report


def read_continuous(csv_path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """AffectNet-style CSV (``valence``, ``arousal`` in [-1, 1]) -> (table, report)."""
    df = pd.read_csv(csv_path)
    image_col = next((c for c in ("image", "subDirectory_filePath", "path", "file") if c in df.columns), None)
    if image_col is None or not {"valence", "arousal"} <= set(df.columns):
        raise DataError(
            f"{Path(csv_path).name}: needs an image column (image or subDirectory_filePath) "
            f"and valence, arousal; has {list(df.columns)}"
        )
    va = df[["valence", "arousal"]].apply(pd.to_numeric, errors="coerce")
    ok = va.notna().all(axis=1) & (va.abs() <= 1).all(axis=1)
    out = pd.DataFrame(
        {
            "image": df.loc[ok, image_col].astype(str).values,
            "label": "",
            "valence": va.loc[ok, "valence"].values,
            "arousal": va.loc[ok, "arousal"].values,
        }
    )
    out = out.drop_duplicates("image").reset_index(drop=True)
    return out, {
        "rows": int(len(out)),
        "out_of_range_dropped": int((~ok).sum()),
        "duplicates_dropped": int(ok.sum()) - len(out),
    }


def in_validation(name: str, val_fraction: float) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) < val_fraction * 2**32


# -- faces -------------------------------------------------------------------------------
def _load_image(path: Path) -> np.ndarray:
    """uint8 RGB (H, W, 3) from any image file OpenCV reads (grey replicated)."""
    import cv2

    buf = np.fromfile(path, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise DataError("not a readable image")
    if img.dtype != np.uint8:
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(1, int(img.max())))
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def crop_face(image: np.ndarray, size: int, cnn_fallback: bool = True):
    """(crop uint8 (size, size, 3), landmarks (68, 2) crop pixels, stage) or None."""
    from dyadlab.face.still import find_face

    face = find_face(image, cnn_fallback=cnn_fallback)
    if face is None:
        return None
    crop, lm = L.align_face(image, face.landmarks, size)
    return crop, lm, face.stage


def _crop_many(args: tuple[list[str], int]) -> list:
    paths, size = args
    out = []
    for p in paths:
        try:
            out.append(crop_face(_load_image(Path(p)), size))
        except DataError:
            out.append(None)
    return out


@dataclasses.dataclass
class FaceSet:
    """Aligned faces: ``images`` (N, S, S, 3) uint8, ``landmarks`` (N, 68, 2)
    float32 crop pixels, ``va`` (N, 2) float32, ``label`` (N,) class index
    (-1 for continuous-VA data), ``val`` (N,) bool, ``names`` (N,) str."""

    images: np.ndarray
    landmarks: np.ndarray
    va: np.ndarray
    label: np.ndarray
    val: np.ndarray
    names: np.ndarray
    meta: dict

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def split(self, val: bool) -> FaceSet:
        m = self.val == val
        return FaceSet(
            self.images[m],
            self.landmarks[m],
            self.va[m],
            self.label[m],
            self.val[m],
            self.names[m],
            self.meta,
        )

    def resized(self, size: int) -> FaceSet:
        """The same faces at size x size (area-averaged down, cubic up; the
        landmarks follow: p -> (p + 0.5) f - 0.5)."""
        if size == self.size:
            return self
        import cv2

        f = size / self.size
        interp = cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC
        images = np.stack([cv2.resize(im, (size, size), interpolation=interp) for im in self.images])
        return dataclasses.replace(
            self, images=images, landmarks=((self.landmarks + 0.5) * f - 0.5).astype(np.float32)
        )

    def to_bytes(self) -> bytes:
        bio = io.BytesIO()
        np.savez(
            bio,
            images=self.images,
            landmarks=self.landmarks,
            va=self.va,
            label=self.label,
            val=self.val,
            names=self.names.astype(str),
            meta=np.array(json.dumps(self.meta)),
        )
        return bio.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> FaceSet:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        return cls(
            z["images"], z["landmarks"], z["va"], z["label"], z["val"], z["names"], json.loads(str(z["meta"]))
        )


def cache_key(images_dir: Path, table: pd.DataFrame, size: int, val_fraction: float) -> str:
    """Content address of a preparation: image bytes + labels + settings."""
    h = hashlib.sha256(f"{PREP_VERSION}|{size}|{val_fraction}".encode())
    for row in table.itertuples(index=False):
        p = images_dir / row.image
        h.update(f"{row.image}|{row.valence:.6f}|{row.arousal:.6f}|".encode())
        h.update(hashlib.sha1(p.read_bytes()).digest() if p.is_file() else b"-")
    return f"synth/faces/{h.hexdigest()[:32]}-{size}px.npz"


def prepare(
    images_dir: str | os.PathLike,
    table: pd.DataFrame,
    store,
    size: int = 64,
    val_fraction: float = 0.1,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> FaceSet:
    """Detect, align and crop every labelled image (cached in `store`)."""
    images_dir = Path(images_dir)
    present = table[[(images_dir / n).is_file() for n in table["image"]]].reset_index(drop=True)
    if present.empty:
        raise DataError(f"none of the {len(table)} labelled images is in the image directory")
    key = cache_key(images_dir, present, size, val_fraction)
    if store.exists(key):
        log.info("faces from cache", extra={"key": key})
        return FaceSet.from_bytes(store.get_bytes(key))

    paths = [str(images_dir / n) for n in present["image"]]
    chunks = [paths[i : i + 64] for i in range(0, len(paths), 64)]
    results: list = []
    # spawn, not fork: a forked worker hangs for ever (on a futex) once the
    # parent has used dlib's CNN detector, e.g. crop_face on a faceless image.
    with ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("spawn")) as pool:
        for part in pool.map(_crop_many, [(c, size) for c in chunks]):
            results.extend(part)
            if progress:
                progress(len(results), len(paths))
    keep = [i for i, r in enumerate(results) if r is not None]
    if not keep:
        raise DataError("no face was found in any image")
    class_index = {c: i for i, c in enumerate(CLASSES)}
    sub = present.iloc[keep]
    stages = pd.Series([results[i][2] for i in keep]).value_counts().to_dict()
    fs = FaceSet(
        images=np.stack([results[i][0] for i in keep]),
        landmarks=np.stack([results[i][1] for i in keep]).astype(np.float32),
        va=sub[["valence", "arousal"]].to_numpy(np.float32),
        label=np.array([class_index.get(c, -1) for c in sub["label"]], np.int64),
        val=np.array([in_validation(n, val_fraction) for n in sub["image"]]),
        names=sub["image"].to_numpy(str),
        meta={
            "prep_version": PREP_VERSION,
            "size": size,
            "val_fraction": val_fraction,
            "images": len(paths),
            "faces": len(keep),
            "no_face": len(paths) - len(keep),
            "stages": {str(k): int(v) for k, v in stages.items()},
        },
    )
    store.put_bytes(key, fs.to_bytes())
    return fs


def load(
    images_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    store,
    size: int = 64,
    val_fraction: float = 0.1,
    continuous: bool | None = None,
    workers: int = 2,
    progress=None,
) -> FaceSet:
    """The whole path: read labels (discrete legend or continuous VA CSV, by
    its columns unless `continuous` says), then `prepare`."""
    cols = set(pd.read_csv(labels_csv, nrows=0).columns)
    if continuous is None:
        continuous = {"valence", "arousal"} <= cols
    table, report = read_continuous(labels_csv) if continuous else read_discrete(labels_csv)
    fs = prepare(images_dir, table, store, size, val_fraction, workers, progress)
    fs.meta.setdefault("labels", report)
    return fs


# -- batches -----------------------------------------------------------------------------
def to_tensor_images(images: np.ndarray):
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 in [-1, 1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8_images(t) -> np.ndarray:
    """(B, 3, S, S) in [-1, 1] -> (B, S, S, 3) uint8."""
    return ((t.detach().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def normalised_landmarks(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 68, 2) crop pixels -> (N, 136) normalised, (N, 2) centres, (N,) RMS radii."""
    out = [L.normalise_landmarks(p, return_params=True) for p in points]
    return (
        np.stack([o[0] for o in out]),
        np.stack([o[1] for o in out]),
        np.array([o[2] for o in out], np.float32),
    )


def draw_batch(
    lm136: np.ndarray, size: int, centers: np.ndarray | None = None, radii: np.ndarray | None = None
):
    """(B, 136) normalised landmarks -> (B, 1, S, S) float tensor in [-1, 1]
    (white +1, contours darker), each face placed at its own centre/radius."""
    import torch

    imgs = [
        L.draw_landmarks(
            v, size, None if centers is None else centers[i], None if radii is None else float(radii[i])
        )
        for i, v in enumerate(lm136)
    ]
    return torch.from_numpy(np.stack(imgs)[:, None]).float().div(127.5).sub(1.0)


def class_balanced_targets(rng: np.random.Generator, n: int, jitter: float = 0.05) -> np.ndarray:
    """n target VAs: a Table II class drawn uniformly (the set is very
    imbalanced: 9 contempt vs 3,887 happy faces), plus N(0, jitter) so the
    condition is continuous; clipped to [-1, 1]."""
    pts = np.array(list(TABLE_II.values()), np.float32)
    va = pts[rng.integers(0, len(pts), n)] + rng.normal(0, jitter, (n, 2)).astype(np.float32)
    return np.clip(va, -1, 1).astype(np.float32)


def batch_indices(rng: np.random.Generator, n: int, batch: int) -> np.ndarray:
    """Indices of one batch drawn with replacement."""
    return rng.integers(0, n, batch)
