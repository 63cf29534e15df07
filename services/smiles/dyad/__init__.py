"""Dyad measures: how a parent's and an infant's smiles answer each other.

Neither seed paper measures the serve-and-return dynamic; this package does,
as a pure numpy/pandas library (no service, no I/O).  Every measure works on
an :class:`Aligned` pair of AU12 traces and uses **only jointly valid time**
(both faces found with enough confidence).

Modules, in the order of the measures (each docstring has its formulas):

* :mod:`.align`        1. alignment onto one grid (:func:`align`), DyadError
* :mod:`.contingency`  2. smile onsets on the grid, 3. serve-and-return
  contingency with a circular-shift null (:func:`contingency`)
* :mod:`.synchrony`    4. lagged AU12 cross-correlation, windowed TLCC and
  surrogates (:func:`synchrony`)
* :mod:`.shared`       5. shared positive affect and its episodes
  (:func:`shared_affect`)
* :mod:`.measure`      all measures at once (:func:`measure`, :func:`summary`,
  :func:`analyse_dyad`)
* :mod:`.simulate`     synthetic dyads for tests, benchmarks and demos

Import the names from the package (``from services.smiles import dyad;
dyad.align(...)``): each step's function shadows its module's name here.

Conventions
-----------
* **Clock.**  Everything is on the *parent's* clock.  Two videos: the infant
  table keeps its own clock and ``infant time + offset_s = parent time``.
  Infant smile onsets are likewise given in the infant's own clock (as
  ``segment_smiles`` of the infant table returns them); ``offset_s`` is added
  here.  One video with two faces: ``offset_s = 0`` (see :func:`split_faces`).
* **Lag sign.**  ``r(lag)`` correlates ``parent[t]`` with ``infant[t + lag]``.
  A **positive lag means the infant follows the parent** (parent leads); a
  negative lag means the parent follows the infant.
* **Directions.**  ``parent_to_infant`` = the infant answering the parent:
  P(an infant smile begins within ``(0, W]`` s after a parent smile begins).
  ``infant_to_parent`` = the parent answering the infant (roles swapped).

Too little jointly valid time (``< min_joint_s``, default 2 s) raises
:class:`DyadError` naming the counts.
"""

from __future__ import annotations

from .align import (
    MAX_GAP_FACTOR,
    MIN_JOINT_S,
    Aligned,
    DyadError,
    align,
    aligned_from_arrays,
    require_joint,
    split_faces,
)
from .contingency import contingency, draw_shifts, onset_indices, onset_times, shift_onsets
from .measure import analyse_dyad, measure, summary
from .shared import EPISODE_COLUMNS, shared_affect
from .simulate import SimulatedDyad, simulate_dyad, smile_bumps
from .synchrony import synchrony

__all__ = [
    "EPISODE_COLUMNS",
    "MAX_GAP_FACTOR",
    "MIN_JOINT_S",
    "Aligned",
    "DyadError",
    "SimulatedDyad",
    "align",
    "aligned_from_arrays",
    "analyse_dyad",
    "contingency",
    "draw_shifts",
    "measure",
    "onset_indices",
    "onset_times",
    "require_joint",
    "shared_affect",
    "shift_onsets",
    "simulate_dyad",
    "smile_bumps",
    "split_faces",
    "summary",
    "synchrony",
]
