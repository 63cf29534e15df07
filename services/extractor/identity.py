"""Who is who: join per-chunk tracks into people, and label parent and infant.

Joining (in order of first appearance): a track continues a person when it
starts on the frame after that person was last seen at an overlapping box
(a chunk boundary or a re-detection), or — after a gap — when dlib's 128-D
face descriptors are closer than `SAME_PERSON` (dlib's own 0.6 rule, a bit
stricter). When descriptors cannot decide (a track seen only turned away or
behind hands has none) and `max_faces` people are already known (the
recording holds no more), the track joins one of the people not in view at
the time: the only one that is not clearly someone else (descriptors both
known and further apart than `DIFFERENT_PERSON`), or, of several, the one
last seen nearest (within `NEAR_FACES` face sizes, similar size). Two
tracks that overlap in time are never the same person.
Tracks found on a chunk's first frame carry a face chip instead of a
descriptor (they nearly always continue by position); their descriptors are
computed here only when a comparison needs them (same values either way).

Roles (documented heuristic, overridable with `adult_face_id`): with one
person, that person is the adult (the usual single-camera parent recording);
with two or more, the adult is the person with the larger median
inter-ocular distance and the infant the next one. Parents lean in and out,
infants sit in a chair — size is a reliable cue in free-play and
high-chair recordings; the override exists for the rest (and for recordings
of an infant alone).
"""

from __future__ import annotations

import dataclasses
from typing import cast

import numpy as np

from dyadlab.face import boxes

SAME_PERSON = 0.55
MIN_PERSON_FRAMES = 5
NEAR_FACES = 1.5
SIZE_RATIO = 1.8
DIFFERENT_PERSON = 0.75


def _has_embedding(t) -> bool:
    return t.embedding is not None or getattr(t, "chip", None) is not None


def _embedding(t) -> np.ndarray | None:
    """The track's descriptor, computed from its face chip on first use."""
    if t.embedding is None and getattr(t, "chip", None) is not None:
        from dyadlab.face.tracker import describe

        t.embedding, t.chip = describe(t.chip), None
    return t.embedding


@dataclasses.dataclass
class Person:
    members: list = dataclasses.field(default_factory=list)  # (chunk index, local tid)
    last: int = -1
    last_rect: tuple = (0, 0, 0, 0)
    sources: list = dataclasses.field(default_factory=list)  # tracks whose descriptors define it

    def distance(self, t) -> float:
        if not _has_embedding(t) or not self.sources:
            return np.inf
        # sources hold only tracks that have an embedding (see below): never None
        mean = np.mean([cast(np.ndarray, _embedding(s)) for s in self.sources], axis=0)
        return float(np.linalg.norm(mean - _embedding(t)))


def _near(a, b) -> float:
    """Distance of box centres in units of the larger box; inf for very different sizes."""
    sa, sb = boxes.size(a), boxes.size(b)
    if max(sa, sb) / min(sa, sb) > SIZE_RATIO:
        return np.inf
    return boxes.distance(a, b, unit=max(sa, sb))


def join(chunks, max_faces: int = 2) -> dict[tuple[int, int], int]:
    """Map (chunk index, local track id) -> person index, persons in order of appearance."""
    tracks = sorted(
        ((t.first, ci, t) for ci, c in enumerate(chunks) for t in c.tracks),
        key=lambda x: (x[0], x[1], x[2].tid),
    )
    people: list[Person] = []
    for first, ci, t in tracks:
        free = [p for p in people if p.last < first]
        best = None
        cont = [p for p in free if p.last == first - 1 and boxes.iou(p.last_rect, t.first_rect) > 0.3]
        if cont:
            best = max(cont, key=lambda p: boxes.iou(p.last_rect, t.first_rect))
        else:
            d = [(p.distance(t), i) for i, p in enumerate(free)]
            d = [x for x in d if x[0] < SAME_PERSON]
            if d:
                best = free[min(d)[1]]
            elif len(people) >= max_faces:
                # As many people as the recording holds are known: the track is
                # one of them. Of the free ones not clearly someone else (both
                # descriptors known and far apart), the only one, or the one
                # last seen nearest.
                ok = [
                    p
                    for p in free
                    if not (_has_embedding(t) and p.sources and p.distance(t) > DIFFERENT_PERSON)
                ]
                if len(ok) == 1:
                    best = ok[0]
                elif ok:
                    near = min(ok, key=lambda p: _near(p.last_rect, t.first_rect))
                    if _near(near.last_rect, t.first_rect) < NEAR_FACES:
                        best = near
        if best is None:
            best = Person()
            people.append(best)
        best.members.append((ci, t.tid))
        best.last, best.last_rect = t.last, t.last_rect
        if _has_embedding(t) and len(best.sources) < 8:
            best.sources.append(t)
    return {m: i for i, p in enumerate(people) for m in p.members}


def assign_roles(
    person_ids: list[int],
    median_iod: dict[int, float],
    adult_face_id: int = -1,
    frames: dict[int, int] | None = None,
) -> dict[int, str]:
    """Role per person: "adult", "infant" or "" (see module docstring).

    With `frames` (frames each person was seen in), the roles go to the two
    people seen longest - the dyad - and by size between them; a brief third
    face (a visitor, a face on a screen, a fragment) gets no role."""
    roles = {p: "" for p in person_ids}
    if not person_ids:
        return roles
    cands = list(person_ids)
    if frames is not None and len(cands) > 2:
        cands = sorted(cands, key=lambda p: -frames.get(p, 0))[:2]
    if adult_face_id >= 0 and adult_face_id in roles:
        adult = adult_face_id
    else:
        adult = max(cands, key=lambda p: median_iod.get(p, 0.0))
    roles[adult] = "adult"
    rest = sorted((p for p in cands if p != adult), key=lambda p: -median_iod.get(p, 0.0))
    if rest:
        roles[rest[0]] = "infant"
    return roles
