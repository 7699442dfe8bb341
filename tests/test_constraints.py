"""The pinned dependency set (.ci/constraints.txt) that `make setup` and CI install with: complete for the
project, consistent with what pyproject and each pinned package ask for, and free of torch builds and CUDA
wheels (the Makefile's TORCH_SPEC picks torch). Refresh: `make lock`."""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.!]*)")
# torch: TORCH_SPEC's (its CPU or CUDA build); the rest come only with a CUDA torch
NOT_PINNED = re.compile(r"torch|triton|nvidia-.*|cuda-.*")
REFRESH = "refresh the lock in a venv where `make test` passes: make lock"


def pins() -> dict[str, Version]:
    found = {}
    for number, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.fullmatch(line.strip())
        assert match, (f"{CONSTRAINTS}:{number}: {line!r} is not name==version (no URLs, paths, editables or"
                       f" local labels like +cpu: pip could not install it on another machine); {REFRESH}")
        name = canonicalize_name(match[1])
        assert name not in found, f"{CONSTRAINTS}:{number}: {name} pinned twice"
        found[name] = Version(match[2])
    return found


def test_the_constraints_pin_no_torch_build_and_no_cuda_wheel():
    pinned = [name for name in pins() if NOT_PINNED.fullmatch(name)]
    assert not pinned, (f"{CONSTRAINTS} pins {pinned}: torch is TORCH_SPEC's (CPU by default, CUDA on a GPU"
                        " machine) and CUDA's wheels come only with a CUDA torch; drop them (make lock does)")


def test_make_setup_installs_with_the_constraints_and_a_cpu_torch_by_default():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^TORCH_SPEC \?= torch==2\.13\.0$", makefile, re.MULTILINE), \
        "the Makefile's default TORCH_SPEC is no longer torch==2.13.0 (the CPU build the README documents)"
    assert re.search(r"^CONSTRAINTS := \.ci/constraints\.txt$", makefile, re.MULTILINE)
    setup = makefile.split("$(VENV)/.installed:")[1].split("\n\n")[0]
    assert "$(CONSTRAINTS)" in setup.splitlines()[0], "make setup does not reinstall when the lock changes"
    assert "pip install -q -c $(CONSTRAINTS) -e '.[dev]'" in setup, "make setup does not install with the lock"
    assert re.search(r"^lock:", makefile, re.MULTILINE), "no `make lock` to refresh the constraints"


def requirements(dist: str, extras: set[str]) -> list[Requirement]:
    out = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        envs = [{**default_environment(), "extra": e} for e in (extras or {""})]
        if req.marker is None or any(req.marker.evaluate(env) for env in envs):
            out.append(req)
    return out


def test_every_dependency_of_the_project_is_pinned_to_a_version_its_dependents_accept():
    """pyproject's dependencies (and dev extras), with the extras they name, then what each of those needs,
    down the installed metadata: each one is pinned, and the pin satisfies every requirement on it."""
    pinned = pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [(Requirement(r), "pyproject.toml") for r in
            [*project["dependencies"], *project.get("optional-dependencies", {}).get("dev", [])]]
    seen: dict[str, set[str]] = {}
    problems = []
    while todo:
        req, by = todo.pop()
        name = canonicalize_name(req.name)
        if NOT_PINNED.fullmatch(name):
            continue
        if name not in pinned:
            problems.append(f"{name} (needed by {by}) is not pinned")
            continue
        if not req.specifier.contains(pinned[name], prereleases=True):
            problems.append(f"{name}=={pinned[name]} does not satisfy {by}'s {req}")
        extras = set(req.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        try:
            todo += [(r, f"{name}") for r in requirements(name, extras)]
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed here, so its own requirements cannot be checked")
    assert not problems, f"{CONSTRAINTS}:\n  " + "\n  ".join(sorted(problems)) + f"\n{REFRESH}"
