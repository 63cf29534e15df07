"""dlib's models, loaded from the `face-recognition-models` wheel (never downloaded).

The wheel's own `__init__` imports `pkg_resources`, which setuptools >= 82
removed, so the model directory is located with importlib instead.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import sys
from pathlib import Path

import dlib


def model_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package face-recognition-models is not installed")
    return Path(spec.submodule_search_locations[0]) / "models"


@functools.cache
def detector():
    """HOG + linear SVM frontal face detector (5 poses: frontal, left/right, rotated)."""
    return dlib.get_frontal_face_detector()


@functools.cache
def shape_predictor():
    """Ensemble-of-regression-trees 68-point iBUG landmark predictor (Kazemi & Sullivan 2014)."""
    before = _rw_anon_regions()
    sp = dlib.shape_predictor(str(model_dir() / "shape_predictor_68_face_landmarks.dat"))
    _huge_pages(before, _rw_anon_regions())
    return sp


@functools.cache
def face_encoder():
    """ResNet face descriptor (128-D); same person when distance < 0.6 (dlib's rule)."""
    return dlib.face_recognition_model_v1(str(model_dir() / "dlib_face_recognition_resnet_model_v1.dat"))


def load_all() -> None:
    detector(), shape_predictor(), face_encoder()


# -- huge pages for the shape predictor --------------------------------------------------
# The predictor is ~95 MB of regression trees (15 cascades x 500 trees, a
# 136-float vector per leaf) and each fit reads one leaf of every tree: 7,500
# scattered reads, each a TLB miss with 4 KiB pages (and a two-level walk in
# a VM). On 2 MiB pages a fit took 0.8 instead of 1.2 ms on this project's
# 2-core VM when the host was quiet, 7-30 % less when it was busy (memory-bound
# work: the saving varies with the neighbours). The memory the model was
# loaded into is asked to be backed by transparent huge pages (madvise +
# MADV_COLLAPSE, Linux >= 6.1; anywhere else this does nothing). Results are
# unchanged: only the page size differs.
_MADV_HUGEPAGE, _MADV_COLLAPSE, _HUGE = 14, 25, 2 << 20


def _rw_anon_regions() -> dict[int, int]:
    """start -> end of the writable anonymous mappings and the heap."""
    out = {}
    if not sys.platform.startswith("linux"):
        return out
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 5 or not parts[1].startswith("rw"):
                    continue
                if len(parts) > 5 and parts[5] != "[heap]":
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out[lo] = hi
    except OSError:
        pass
    return out


def _huge_pages(before: dict[int, int], after: dict[int, int]) -> int:
    """Collapse what grew between two `_rw_anon_regions` snapshots into huge
    pages; returns the bytes advised (0 when unsupported)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    for lo, hi in after.items():
        # New mappings whole; grown ones (the heap) from their old end.
        lo = max(lo, before.get(lo, lo))
        a, b = (lo + _HUGE - 1) & ~(_HUGE - 1), hi & ~(_HUGE - 1)
        if b - a < 4 * _HUGE:
            continue
        if madvise(a, b - a, _MADV_HUGEPAGE) == 0:
            madvise(a, b - a, _MADV_COLLAPSE)  # now rather than by khugepaged, later
            done += b - a
    return done
