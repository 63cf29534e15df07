"""Run a `.tflite` model with LiteRT (`ai-edge-litert`), one thread, no copies
beyond the input.

MediaPipe's face models (`registry.py`) are TensorFlow Lite flatbuffers; LiteRT
is Google's own runtime for them (the XNNPACK delegate on CPU). One
interpreter per model per process: an interpreter is not thread-safe, and the
extractor's worker processes each hold their own.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np


class TFLiteModel:
    """One interpreter: `run(x)` -> the output arrays, in the model's order."""

    def __init__(self, path: str | Path, threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self._it = Interpreter(model_path=str(self.path), num_threads=threads)
        self._it.allocate_tensors()
        inp = self._it.get_input_details()[0]
        self.input_shape = tuple(int(v) for v in inp["shape"])
        self._in = inp["index"]
        self._out = [d["index"] for d in self._it.get_output_details()]
        self._lock = threading.Lock()

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, np.float32).reshape(self.input_shape)
        with self._lock:
            self._it.set_tensor(self._in, x)
            self._it.invoke()
            return [self._it.get_tensor(i).copy() for i in self._out]
