"""Split requirements.lock for the images.

    python3 select-requirements.py runtime requirements.lock   # the services' venv
    python3 select-requirements.py serving requirements.lock   # TorchServe's extra packages

The lock pins the project venv, which also holds test tools and TorchServe.
`runtime` is every pin except TEST_ONLY and SERVING; `serving` is the SERVING
pins (installed with --no-deps into /opt/serving: their other dependencies
are runtime pins already). A name in these lists that the lock lacks is an
error, so a renamed pin cannot silently slip into (or out of) an image.
"""
from __future__ import annotations

import re
import sys

#: in the project venv for the tests only
TEST_ONLY = {"pytest", "pytest-timeout", "kubernetes-validate", "jsonschema",
             "jsonschema-specifications", "referencing", "rpds-py", "importlib-resources", "attrs"}
#: TorchServe itself: only in the torchserve image
SERVING = {"torchserve", "torch-model-archiver", "enum-compat", "wheel"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: str) -> dict[str, str]:
    out = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==", line)
            if not m:
                sys.exit(f"{path}: not an exact pin: {line!r}")
            out[norm(m[1])] = line
    return out


def main() -> None:
    which, path = sys.argv[1], sys.argv[2]
    p = pins(path)
    missing = sorted(n for n in SERVING | {"pytest"} if n not in p)
    if missing:
        sys.exit(f"{path} lacks {missing}: update deploy/docker/base/select-requirements.py")
    if which == "runtime":
        chosen = [v for k, v in p.items() if k not in TEST_ONLY | SERVING]
    elif which == "serving":
        chosen = [v for k, v in p.items() if k in SERVING]
    else:
        sys.exit(f"unknown set {which!r}: use runtime or serving")
    print("\n".join(chosen))


if __name__ == "__main__":
    main()
