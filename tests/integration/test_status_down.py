"""`nimflow status` and `nimflow down` on real containers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from nimflow.cli import main
from nimflow.front_proxy import route_dir
from tests.integration.test_rollout import Rig, make_rig

pytestmark = pytest.mark.testbed


@pytest.fixture
def rig(tmp_path: Path, docker_client: Any, standin_image: str, unique: str, cleanup_containers: list[str]) -> Rig:
    return make_rig(tmp_path, docker_client, standin_image, unique, cleanup_containers)


def _block(output: str, name: str) -> str:
    """The status block of deployment ``name`` (other deployments may run on the test bed)."""
    blocks = [b for b in output.split("\n\n") if b.splitlines()[0] == name]
    assert len(blocks) == 1, output
    return blocks[0]


def test_status_lists_and_down_removes_a_deployment(rig: Rig, capsys: pytest.CaptureFixture[str], unique: str,
                                                    cleanup_containers: list[str]) -> None:
    first = rig.roll(rig.model("a", seed=1), weights="hf:org/a@0123abc")
    # A container that only shares the name scheme is not the deployment's, and survives `down`.
    bystander_name = f"{rig.container_name}-green"
    bystander = rig.client.containers.run(rig.serving.image, name=bystander_name, detach=True)

    assert main(["status"]) == 0
    block = _block(capsys.readouterr().out, rig.name)
    assert f"{first.stable_endpoint}  [ready]" in block
    assert f"model:      {rig.deploy.served_model_name}" in block
    assert "weights:    hf:org/a@0123abc" in block
    assert f"image:      {rig.serving.image}" in block
    assert f"active:     {first.container_name} ({first.container_id[:12]}, running)  (route generation 1)" in block
    assert bystander_name not in block

    rig.client.containers.get(f"{rig.container_name}-front").stop(timeout=5)
    assert main(["status"]) == 0
    assert "[down (front proxy exited)]" in _block(capsys.readouterr().out, rig.name)

    assert main(["down", rig.name]) == 0
    out = capsys.readouterr().out
    assert f"removed deployment {rig.name}: {rig.container_name}-front, {first.container_name}" in out
    assert rig.containers() == {}
    assert not route_dir(rig.cache, rig.name).exists()
    bystander.reload()
    assert bystander.status == "running"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{first.stable_endpoint}/v1/health/ready", timeout=5)

    assert main(["status"]) == 0
    assert rig.name not in capsys.readouterr().out


def test_down_of_an_unknown_deployment_is_one_clear_error(capsys: pytest.CaptureFixture[str], docker_client: Any,
                                                          unique: str) -> None:
    assert main(["down", f"nothing-{unique}"]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        f"nimflow: DeploymentError: no nimflow deployment named 'nothing-{unique}' on this Docker host; "
        "`nimflow status` lists them"
    )
    assert "Traceback" not in captured.err
