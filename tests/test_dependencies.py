"""Declared dependencies, the lock and the images agree.

pyproject.toml names what the code needs (`dependencies`, and the optional
groups test, dev, serving); requirements.lock pins each package in the section
of one group (`# [group]`); deploy/docker/base/select-requirements.py installs
the [runtime] section into every image and [serving] into TorchServe's. These
tests tie the three together with the venv's installed metadata (the venv
`make setup` builds from the lock): every import of dyadlab/ and services/ is a
declared runtime dependency pinned in [runtime]; every pin is needed by its
group; nothing that only the tests or the linters need reaches an image.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import subprocess
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
SELECT = ROOT / "deploy" / "docker" / "base" / "select-requirements.py"
FIRST_PARTY = {"dyadlab", "services"}
#: code that TorchServe loads (inside /opt/serving's torchserve): may import serving packages
IN_TORCHSERVE = {Path("services/synth/handler.py")}


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


sel = _load(SELECT, "select_requirements")
norm = sel.norm
LOCKED: dict[str, dict[str, str]] = sel.groups(str(LOCK))
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DECLARED: dict[str, set[str]] = {
    "runtime": {norm(Requirement(r).name) for r in PROJECT["dependencies"]},
    **{
        g: {norm(Requirement(r).name) for r in reqs}
        for g, reqs in PROJECT.get("optional-dependencies", {}).items()
    },
}


@cache
def _requires(name: str) -> frozenset[str]:
    """The distribution's own dependencies (no extras), from the venv's metadata."""
    try:
        reqs = metadata.distribution(name).requires or []
    except metadata.PackageNotFoundError:
        return frozenset()
    out = set()
    for r in map(Requirement, reqs):
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            out.add(norm(r.name))
    return frozenset(out)


def closure(names) -> set[str]:
    seen, todo = set(), [norm(n) for n in names]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(_requires(n))
    return seen


CLOSURE = {g: closure(names) for g, names in DECLARED.items()}


def _select(which: str, lock: Path = LOCK) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SELECT), which, str(lock)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _names(output: str) -> set[str]:
    return {norm(line.split("==")[0].split("[")[0].strip()) for line in output.splitlines()}


# -- code imports -> distributions ----------------------------------------------------------
def _imports(path: Path) -> set[str]:
    """Top-level modules a file imports anywhere (lazy imports too), and the
    literal names it hands to importlib.import_module / find_spec / __import__."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "find_spec", "__import__")
        ):
            found.add(node.args[0].value.split(".")[0])
    return found - set(sys.stdlib_module_names) - FIRST_PARTY - {"__future__"}


def code_imports() -> dict[str, set[Path]]:
    """third-party top-level module -> the files (relative to the repo) that import it"""
    out: dict[str, set[Path]] = {}
    for top in sorted(FIRST_PARTY):
        for path in sorted((ROOT / top).rglob("*.py")):
            for mod in _imports(path):
                out.setdefault(mod, set()).add(path.relative_to(ROOT))
    return out


@cache
def _module_files() -> dict[str, set[str]]:
    """top-level module -> distributions, from the files each distribution installed
    (for wheels whose top_level.txt is wrong: dlib-bin names only _dlib_pybind11)"""
    out: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        name = norm(dist.metadata["Name"])
        tops = {f.parts[0] if len(f.parts) > 1 else inspect.getmodulename(f.name) for f in dist.files or ()}
        for top in tops:
            if top and not top.endswith((".dist-info", ".egg-info", ".data")):
                out.setdefault(top, set()).add(name)
    return out


@cache
def _packages_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    found = {norm(d) for d in _packages_distributions().get(module, ())}
    return found or _module_files().get(module, set())


def test_the_import_scan_sees_lazy_and_dynamic_imports(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text(
        "from __future__ import annotations\nimport os, numpy.linalg as la\n"
        "from dyadlab import storage\nfrom . import sibling\n"
        "def f():\n    from PIL import Image\n    import importlib.util\n"
        "    importlib.util.find_spec('face_recognition_models')\n"
        "    return importlib.import_module('cv2.data')\n"
    )
    assert _imports(src) == {"numpy", "PIL", "face_recognition_models", "cv2"}
    assert {"torch", "grpc", "face_recognition_models"} <= set(code_imports())
    assert distributions_of("dlib") == {"dlib-bin"}
    assert distributions_of("yaml") == {"pyyaml"} and distributions_of("cv2") == {"opencv-python-headless"}


def test_every_code_import_is_a_declared_runtime_dependency():
    problems = []
    for mod, files in sorted(code_imports().items()):
        dists = distributions_of(mod)
        # TorchServe runs handler.py, with the serving packages on its path
        allowed = ("runtime", "serving") if files <= IN_TORCHSERVE else ("runtime",)
        ok_declared = set().union(*(DECLARED[g] for g in allowed))
        ok_pinned = set().union(*(LOCKED[g] for g in allowed))
        where = ", ".join(map(str, sorted(files)))
        if not dists:
            problems.append(f"{mod} ({where}): no installed distribution provides it")
        elif not dists & ok_declared:
            problems.append(
                f"{mod} ({where}): {sorted(dists)} not declared in "
                f"pyproject.toml {' or '.join(allowed)} dependencies"
            )
        elif not dists & ok_pinned:
            problems.append(
                f"{mod} ({where}): {sorted(dists)} not pinned in requirements.lock [{'] or ['.join(allowed)}]"
            )
    assert not problems, "\n".join(problems)


# -- pyproject <-> lock -----------------------------------------------------------------------
def test_lock_sections_are_the_declared_groups():
    assert set(DECLARED) == set(sel.GROUPS)
    assert {"pytest", "pytest-timeout", "hypothesis", "kubernetes-validate"} <= DECLARED["test"]
    assert {"ruff", "mypy"} <= DECLARED["dev"]
    assert {"torchserve", "torch-model-archiver"} <= DECLARED["serving"]
    for g in sel.GROUPS:
        assert LOCKED[g], f"requirements.lock has no [{g}] section"


def test_every_declared_dependency_is_pinned():
    missing = [
        f"{name} ({g})"
        for g, names in DECLARED.items()
        for name in sorted(names)
        if name not in LOCKED[g] and name not in LOCKED["runtime"]
    ]
    assert not missing, f"declared in pyproject.toml, not pinned in requirements.lock: {missing}"
    misplaced = sorted(DECLARED["runtime"] - set(LOCKED["runtime"]))
    assert not misplaced, f"runtime dependencies outside the lock's [runtime] section: {misplaced}"


def test_every_pin_is_needed_by_its_group():
    """Each pin is in the dependency closure of its section's group, and no pin
    that the images need sits in a section that they do not install."""
    images = CLOSURE["runtime"] | CLOSURE["serving"]
    problems = []
    for g, names in LOCKED.items():
        for name in names:
            if g == "runtime":
                if name not in images:
                    problems.append(
                        f"[runtime] {name}: neither the runtime dependencies nor "
                        f"TorchServe need it (move it to the section of the group "
                        f"that does, or drop it)"
                    )
            elif name not in CLOSURE[g]:
                problems.append(f"[{g}] {name}: not needed by the {g} group's dependencies")
            elif name in CLOSURE["runtime"]:
                problems.append(f"[{g}] {name}: the runtime dependencies need it: [runtime]")
            elif g in sel.NOT_IN_IMAGES and name in CLOSURE["serving"]:
                problems.append(f"[{g}] {name}: TorchServe needs it: [runtime] or [serving]")
    assert not problems, "\n".join(problems)


def test_the_venv_has_the_locked_versions():
    """The closures above read the venv's metadata: it must be the lock's."""
    wrong = []
    for name, line in sel.pins(str(LOCK)).items():
        want = line.split("==", 1)[1].strip()
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name}: not installed (make setup)")
            continue
        if have.split("+")[0] != want.split("+")[0]:  # torch 2.13.0+cpu
            wrong.append(f"{name}: {have} installed, {want} locked (make setup)")
    assert not wrong, "\n".join(wrong)


# -- the images' selections -------------------------------------------------------------------
def test_test_and_dev_tools_stay_out_of_the_images():
    runtime, serving = _select("runtime"), _select("serving")
    assert runtime.returncode == 0 and serving.returncode == 0, runtime.stderr + serving.stderr
    images = _names(runtime.stdout) | _names(serving.stdout)
    assert not images & {
        "hypothesis",
        "sortedcontainers",
        "pytest",
        "pytest-timeout",
        "kubernetes-validate",
        "jsonschema",
        "ruff",
        "mypy",
    }
    only_tools = (CLOSURE["test"] | CLOSURE["dev"]) - CLOSURE["runtime"] - CLOSURE["serving"]
    assert not images & only_tools
    assert {
        "torch",
        "grpcio",
        "grpcio-health-checking",
        "dlib-bin",
        "av",
        "minio",
        "prometheus-client",
        "pillow",
        "urllib3",
        "pyyaml",
    } <= _names(runtime.stdout)
    assert _names(serving.stdout) == set(LOCKED["serving"])
    assert not _names(runtime.stdout) & _names(serving.stdout)
    # together with the project-venv-only groups, the selections are the whole lock
    assert images | set(LOCKED["test"]) | set(LOCKED["dev"]) == set(sel.pins(str(LOCK)))


@pytest.mark.parametrize(
    "lock,error",
    [
        ("numpy==2.3.5\n# [tests]\npytest==9.2.0\n", "unknown group [tests]"),
        ("numpy==2.3.5\n# [test]\nnumpy==2.3.5\n", "numpy is pinned twice"),
        ("numpy>=2\n", "not an exact pin"),
        ("numpy==2.3.5\n# [test]\npytest==9.2.0\n", "has no [serving] pins"),
    ],
)
def test_select_refuses_a_broken_lock(tmp_path, lock, error):
    path = tmp_path / "requirements.lock"
    path.write_text(lock)
    p = _select("serving", path)
    assert p.returncode != 0 and error in p.stderr, p.stderr


def test_select_defaults_to_runtime_above_the_first_header(tmp_path):
    path = tmp_path / "requirements.lock"
    path.write_text(
        "# a comment\nnumpy==2.3.5  # why\n# [serving]\ntorchserve==0.12.0\n"
        "# [runtime]\npsutil==7.2.2\n# [test]\nhypothesis==6.170.15\n"
    )
    assert _select("runtime", path).stdout.split() == ["numpy==2.3.5", "psutil==7.2.2"]
    assert _select("serving", path).stdout.split() == ["torchserve==0.12.0"]
    assert _select("bogus", path).returncode != 0
