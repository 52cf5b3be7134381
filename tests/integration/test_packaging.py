"""What ``pip install .`` puts in site-packages: one top-level package, ``nimflow``, that works outside a checkout.

The repository keeps ``flows/``, ``tasks/`` and ``deployments/`` at its top; pyproject.toml maps them
into the wheel as ``nimflow.flows``, ``nimflow.tasks`` and ``nimflow/deployments/`` (package data),
so the wheel claims no generic names (``flows``, ``tasks``) in site-packages. The wheel is built as a
user builds it (``pip wheel``, isolated build from pyproject.toml's ``[build-system]``; pip fetches
setuptools as ``make venv`` does, from its cache when it has it), from a copy of the checkout so that
concurrent runs do not share a ``build/`` folder. Its contents are checked, then it is installed
into a bare folder and imported from a directory outside the checkout, with no editable finder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Repository folders and where the wheel puts their modules.
PACKAGE_FOLDERS = {"nimflow": "nimflow", "flows": "nimflow/flows", "tasks": "nimflow/tasks"}
#: The programs nimflow runs from deployments/ (wheel path -> checkout path).
PROGRAMS = {
    "nimflow/deployments/front-proxy/front_proxy.py": "deployments/front-proxy/front_proxy.py",
    "nimflow/deployments/nim-standin/nim_standin.py": "deployments/nim-standin/nim_standin.py",
}
#: Top-level entries of the checkout that are not needed to build the wheel (or are outputs).
NOT_COPIED = {".git", ".venv", ".testbed", ".hypothesis", ".mypy_cache", ".pytest_cache", "build", "dist", "tests", "docs"}
PIP_TIMEOUT_S = 300


def _copy_checkout(dest: Path) -> Path:
    """The checkout's sources without virtual environments, caches or earlier build outputs."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        top = Path(directory) == REPO_ROOT
        return {n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (top and n in NOT_COPIED)}

    return Path(shutil.copytree(REPO_ROOT, dest, ignore=ignore))


def _pip(*args: str, cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=PIP_TIMEOUT_S)
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The nimflow wheel, built from a copy of the checkout."""
    root = tmp_path_factory.mktemp("packaging")
    source = _copy_checkout(root / "src")
    _pip("wheel", "--no-deps", "--quiet", "--wheel-dir", str(root / "wheels"), ".", cwd=source)
    (built,) = (root / "wheels").glob("nimflow-*.whl")
    return built


def _expected_modules() -> set[str]:
    expected = set()
    for folder, target in PACKAGE_FOLDERS.items():
        for module in (REPO_ROOT / folder).rglob("*.py"):
            if "__pycache__" not in module.parts:
                expected.add(f"{target}/{module.relative_to(REPO_ROOT / folder).as_posix()}")
    return expected


def test_wheel_holds_only_the_nimflow_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = archive.read(next(n for n in names if n.endswith(".dist-info/top_level.txt"))).decode().split()
    dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    assert {n.split("/")[0] for n in names} == {"nimflow", dist_info}
    assert top_level == ["nimflow"]


def test_wheel_carries_every_module_and_the_programs_nimflow_runs(wheel: Path) -> None:
    """Every module of nimflow/, flows/ and tasks/ (a subpackage missing from pyproject.toml's list
    fails here), the programs byte for byte, py.typed, and nothing else."""
    with zipfile.ZipFile(wheel) as archive:
        files = {n for n in archive.namelist() if not n.split("/")[0].endswith(".dist-info")}
        programs = {name: archive.read(name) for name in PROGRAMS if name in files}
    assert files == _expected_modules() | set(PROGRAMS) | {"nimflow/py.typed"}
    assert programs == {name: (REPO_ROOT / source).read_bytes() for name, source in PROGRAMS.items()}


# Run by a bare interpreter (-S: no site-packages .pth files, so no editable finder) from a folder
# outside the checkout; prints what it found as JSON.
_PROBE = r"""
import importlib.util, json, sys
from prefect.flows import Flow, load_flow_from_entrypoint
import nimflow, nimflow.flows.host_model, nimflow.flows.reconcile, nimflow.flows.watch_checkpoints
from nimflow.front_proxy import PROXY_SCRIPT, proxy_hash
from nimflow.testbed.nim_image import STANDIN_SOURCE, bundled_manifest, source_hash
checkout = sys.argv[1]
by_path = load_flow_from_entrypoint(checkout + "/flows/host_model.py:host_model", use_placeholder_flow=False)
print(json.dumps({
    "nimflow": nimflow.__file__,
    "modules": sorted({m.__file__ for name, m in sys.modules.items()
                       if name.split(".")[0] == "nimflow" and getattr(m, "__file__", None)}),
    "flows": [isinstance(f, Flow) for f in (nimflow.flows.host_model.host_model, nimflow.flows.reconcile.reconcile,
                                            nimflow.flows.watch_checkpoints.watch_checkpoints, by_path)],
    "generic_names": [n for n in ("flows", "tasks", "deployments") if importlib.util.find_spec(n)],
    "proxy_script": str(PROXY_SCRIPT), "standin_source": str(STANDIN_SOURCE),
    "read": [len(proxy_hash()), len(source_hash()), len(bundled_manifest())],
}))
"""


def test_installed_wheel_works_outside_a_checkout(wheel: Path, tmp_path: Path) -> None:
    """Installed into a bare folder and imported from elsewhere: the flows import, the programs are
    found inside the install, and prefect.yaml's entrypoint (a checkout path) loads against it."""
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _pip("install", "--no-deps", "--no-index", "--quiet", "--target", str(target), str(wheel), cwd=elsewhere)
    # The dependencies come from this interpreter's site-packages, as plain path entries.
    dependencies = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "NIMFLOW_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *sorted(dependencies)])
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    result = subprocess.run([sys.executable, "-S", "-c", _PROBE, str(REPO_ROOT)], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])

    installed = str(target / "nimflow")
    assert found["nimflow"] == str(target / "nimflow" / "__init__.py")
    stray = [f for f in found["modules"] if not f.startswith(installed)]
    assert not stray, f"nimflow modules loaded from outside the install: {stray}"
    assert found["flows"] == [True, True, True, True]
    assert found["generic_names"] == []
    assert found["proxy_script"] == str(target / "nimflow" / "deployments" / "front-proxy" / "front_proxy.py")
    assert found["standin_source"] == str(target / "nimflow" / "deployments" / "nim-standin" / "nim_standin.py")
    assert all(found["read"])  # both programs read (the stand-in also loaded as a module)
