"""Split requirements.lock for the images, by the lock's own group sections.

    python3 select-requirements.py runtime requirements.lock   # the services' venv
    python3 select-requirements.py serving requirements.lock   # TorchServe's extra packages

The lock pins the project venv, which also holds test and dev tools and
TorchServe. Each pin sits in the section of one group: a line `# [group]`
opens a section, pins above the first header are `runtime`. The groups are
pyproject.toml's (`dependencies` = runtime, `optional-dependencies` test, dev,
serving); tests/test_dependencies.py checks that the sections agree with them.
`runtime` is the venv of every image; `serving` is installed with --no-deps
into /opt/serving (its other dependencies are runtime pins); `test` and `dev`
go into no image. A header naming another group, a pin listed twice or an
empty selection is an error, so a lost or mistyped header cannot silently
move pins into (or out of) an image. Python 3.11 standard library only: it
runs in the image build before any venv exists.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

GROUPS = ("runtime", "serving", "test", "dev")
#: groups that no image installs
NOT_IN_IMAGES = ("test", "dev")
HEADER = re.compile(r"^#\s*\[([^\]]*)\]")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def groups(path: str) -> dict[str, dict[str, str]]:
    """group -> {normalized name: pin line}, in the lock's order."""
    out: dict[str, dict[str, str]] = {g: {} for g in GROUPS}
    group, seen = "runtime", dict[str, str]()
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for n, raw in enumerate(lines, 1):
        h = HEADER.match(raw.strip())
        if h:
            group = h[1].strip()
            if group not in GROUPS:
                sys.exit(f"{path}:{n}: unknown group [{group}]: use one of {', '.join(GROUPS)}")
            continue
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==", line)
        if not m:
            sys.exit(f"{path}:{n}: not an exact pin: {line!r}")
        name = norm(m[1])
        if name in seen:
            sys.exit(f"{path}:{n}: {name} is pinned twice (first in [{seen[name]}])")
        seen[name] = group
        out[group][name] = line
    return out


def pins(path: str) -> dict[str, str]:
    """Every pin of the lock: {normalized name: pin line}."""
    return {k: v for g in groups(path).values() for k, v in g.items()}


def __getattr__(name: str) -> set[str]:
    # The old hand-kept sets, now computed from the repo's lock (for callers such
    # as tests/test_deploy.py): TEST_ONLY = test + dev pins, SERVING = serving pins.
    if name in ("TEST_ONLY", "SERVING"):
        g = groups(str(Path(__file__).resolve().parents[3] / "requirements.lock"))
        return set(g["serving"]) if name == "SERVING" else set(g["test"]) | set(g["dev"])
    raise AttributeError(name)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit(f"usage: select-requirements.py {{{'|'.join(GROUPS)}}} requirements.lock")
    which, path = argv
    if which not in GROUPS:
        sys.exit(f"unknown set {which!r}: use runtime or serving (or test, dev)")
    chosen = groups(path)[which]
    if not chosen:
        sys.exit(f"{path} has no [{which}] pins")
    print("\n".join(chosen.values()))


if __name__ == "__main__":
    main(sys.argv[1:])
