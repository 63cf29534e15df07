"""The face front-ends the extractor can run, in one table.

A front-end turns a chunk of video frames into per-frame observations of
every tracked face (`chunks.ChunkResult`). Its name and version are part of
every cache key (`pipeline.Options.cache_tag`), so results of different
front-ends, or of two versions of one, never mix.
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Frontend:
    name: str
    version: str
    module: str  # has process(path, index, start, stop, max_faces, detect_every)
    what: str
    #: 3D landmarks, boxes for faces it cannot measure and the appearance
    #: channel (mesh), or 2D landmarks only (dlib): which AU estimate and
    #: which size cue for roles the pipeline uses.
    multiview: bool = True

    def process(self, *args):
        return importlib.import_module(self.module).process(*args)

    def warm_up(self) -> None:
        importlib.import_module(self.module).warm_up()


FRONTENDS: dict[str, Frontend] = {
    f.name: f
    for f in [
        Frontend(
            "mesh",
            "1",
            "services.extractor.track_mesh",
            "BlazeFace + MediaPipe face mesh (LiteRT), 68 points and 3D from the mesh, "
            "AU12/AU6 from 3D geometry fused with the appearance CNN; multi-view",
        ),
        Frontend(
            "dlib",
            "3",
            "services.extractor.track_dlib",
            "dlib HOG + 68-point shape predictor, AU12 from 2D mouth width; frontal faces only",
            multiview=False,
        ),
    ]
}
DEFAULT = "mesh"


def get(name: str) -> Frontend:
    try:
        return FRONTENDS[name or DEFAULT]
    except KeyError:
        raise ValueError(f"unknown face front-end {name!r}; known: {', '.join(FRONTENDS)}") from None
