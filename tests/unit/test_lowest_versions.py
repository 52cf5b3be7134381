"""constraints/lowest.txt pins exactly the floors pyproject.toml declares (what `make test-lowest` installs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[2]


def _floors() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in [*project["dependencies"], *project["optional-dependencies"]["testbed"]]:
        req = Requirement(line)
        lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert lows, f"pyproject.toml: {line!r} has no >= floor; give it one so the lowest versions are tested"
        floors[canonicalize_name(req.name)] = max(lows)
    return floors


def _pins() -> dict[str, Version]:
    pins = {}
    for raw in (ROOT / "constraints" / "lowest.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_constraints_pin_every_floor_of_pyproject() -> None:
    floors, pins = _floors(), _pins()
    assert pins == floors, (
        "constraints/lowest.txt and pyproject.toml disagree: pin each `>=` floor as `name==floor` "
        f"(missing or different: {sorted(set(floors.items()) ^ set(pins.items()))})"
    )
