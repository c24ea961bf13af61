"""constraints.txt (the versions the suite passed with) against pyproject.toml's ranges."""

from __future__ import annotations

import pathlib
import re

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"


def pins() -> dict[str, Version]:
    out = {}
    for n, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert m, f"{LOCK.name}:{n}: {line!r} is not name==version"
        name = canonicalize_name(m[1])
        assert name not in out, f"{LOCK.name}:{n}: {m[1]} pinned twice"
        out[name] = Version(m[2])
    return out


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    return [Requirement(r) for r in reqs]


def test_every_dependency_is_pinned_inside_its_range_and_bounded_above():
    pinned = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} ({req}) has no pin in {LOCK.name}"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"{LOCK.name} pins {req.name}=={pinned[name]}, outside pyproject.toml's {req}"
        )
        assert any(s.operator in ("<", "==", "~=") for s in req.specifier), (
            f"pyproject.toml: {req} has no upper bound"
        )


def test_the_installs_use_the_lock():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c constraints.txt" in ci
    readme = (ROOT / "README.md").read_text()
    installs = [ln for ln in readme.splitlines() if "pip install" in ln and ".venv" in ln]
    assert len(installs) >= 2 and all("-c constraints.txt" in ln for ln in installs), installs
