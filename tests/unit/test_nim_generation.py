"""NIM generation detection from real local images (derived from the stand-in) and image configs."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from nimflow.derived_image import ensure_derived_image
from nimflow.errors import ConfigError, DeploymentError
from nimflow.nim_generation import generation_from_config, generation_of_version, nim_generation, refuse_unservable
from nimflow.spec import BuildSpec, DeploySpec, SourceSpec

REPOSITORY = "nimflow/test-generation"


def variant(client: Any, base: str, *, labels: dict[str, str] | None = None, env: dict[str, str] | None = None,
            cmd: list[str] | None = None, entrypoint: list[str] | None = None) -> str:
    """A real image FROM the stand-in with other labels/env/command (nothing is run)."""
    # The stand-in says nimflow.nim-api=1.x; an empty value hides it so the other signs are read.
    tag, _ = ensure_derived_image(client, REPOSITORY, base, files={}, labels={"nimflow.nim-api": "", **(labels or {})},
                                  env=env, cmd=cmd, entrypoint=entrypoint)
    return tag


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1.x", "1.x"), ("2.x", "2.x"), ("1.12.2", "1.x"), ("2.0.12", "2.x"), ("3.0.0", "2.x"), ("v1.8.0", "1.x"),
     ("", None), ("latest", None), ("0.9", None)],
)
def test_generation_of_version(text: str, expected: str | None) -> None:
    assert generation_of_version(text) == expected


def test_standin_label_says_1x(docker_client: Any, standin_image: str) -> None:
    assert nim_generation(docker_client, standin_image) == ("1.x", "image label nimflow.nim-api=1.x")


def test_declared_wins_over_the_image(docker_client: Any, standin_image: str) -> None:
    assert nim_generation(docker_client, standin_image, "2.x") == ("2.x", "deploy.nim_api: 2.x")


def test_nvidia_version_label(docker_client: Any, standin_image: str) -> None:
    image = variant(docker_client, standin_image, labels={"com.nvidia.nim.version": "2.0.12"})
    assert nim_generation(docker_client, image) == ("2.x", "image label com.nvidia.nim.version=2.0.12")


def test_nvidia_version_env(docker_client: Any, standin_image: str) -> None:
    image = variant(docker_client, standin_image, env={"INFERENCE_MICROSERVICE_LLM_NIM_VERSION": "2.0.12"})
    generation, how = nim_generation(docker_client, image)
    assert generation == "2.x" and "INFERENCE_MICROSERVICE_LLM_NIM_VERSION=2.0.12" in how


def test_nim_serve_command_means_2x(docker_client: Any, standin_image: str) -> None:
    image = variant(docker_client, standin_image, cmd=["nim-serve"])
    assert nim_generation(docker_client, image) == ("2.x", "image entrypoint/command runs nim-serve")


def test_nim_serve_behind_an_entrypoint_wrapper_means_2x(docker_client: Any, standin_image: str) -> None:
    image = variant(docker_client, standin_image, entrypoint=["/opt/nvidia/nvidia_entrypoint.sh"], cmd=["nim-serve"])
    assert nim_generation(docker_client, image)[0] == "2.x"


def test_start_server_command_means_1x(docker_client: Any, standin_image: str) -> None:
    # The stand-in's own CMD is /usr/local/bin/start-server.
    generation, how = nim_generation(docker_client, variant(docker_client, standin_image))
    assert (generation, how) == ("1.x", "image entrypoint/command runs start-server")


def test_undecidable_is_assumed_1x_with_a_warning(docker_client: Any, standin_image: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    image = variant(docker_client, standin_image, cmd=["/opt/custom/serve"])
    with caplog.at_level(logging.WARNING, logger="nimflow.nim_generation"):
        generation, how = nim_generation(docker_client, image)
    assert generation == "1.x" and how.startswith("assumed NIM 1.x")
    assert any("deploy.nim_api" in r.getMessage() for r in caplog.records)


def test_missing_image_is_a_deployment_error(docker_client: Any) -> None:
    with pytest.raises(DeploymentError, match="not on this Docker host"):
        nim_generation(docker_client, "nimflow/no-such-image:nope")


def test_shell_form_commands_are_read() -> None:
    config = {"Labels": {}, "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["exec /opt/nim/start_server.sh --port 8000"]}
    assert generation_from_config(config) == ("1.x", "image entrypoint/command runs start_server.sh")


def test_empty_version_env_does_not_count() -> None:
    # NIM 1.12.2 images carry the variable empty: it must not decide anything.
    assert generation_from_config({"Env": ["INFERENCE_MICROSERVICE_LLM_NIM_VERSION="], "Cmd": None}) is None


def _deploy(**changes: Any) -> DeploySpec:
    return DeploySpec(**{"image": "nvcr.io/nim/x:2.0.12", "served_model_name": "m", "cache_dir": "/tmp/c", **changes})


def test_build_with_a_2x_image_is_refused_naming_build_and_deploy_image() -> None:
    build = BuildSpec(backend="nim-optimize", image="nvcr.io/nim/x:1.8.0")
    with pytest.raises(ConfigError) as caught:
        refuse_unservable("2.x", "image label com.nvidia.nim.version=2.0.12", _deploy(), build, SourceSpec(repo_id="o/m"))
    [problem] = caught.value.problems
    assert problem.location == "build"
    assert "deploy.image nvcr.io/nim/x:2.0.12 is NIM 2.x" in problem.message
    assert "remove `build`" in problem.message and "deploy.nim_api: 1.x" in problem.message


def test_nim_jit_with_a_2x_image_is_refused() -> None:
    build = BuildSpec(backend="nim-jit", image="nvcr.io/nim/x:1.8.0")
    with pytest.raises(ConfigError) as caught:
        refuse_unservable("2.x", "how", _deploy(), build, SourceSpec(repo_id="o/m"))
    assert [p.location for p in caught.value.problems] == ["build.backend"]


def test_manifest_with_a_2x_image_is_refused(tmp_path: Any) -> None:
    source = SourceSpec(manifest=tmp_path / "m.yaml", model_name="org/model")
    with pytest.raises(ConfigError) as caught:
        refuse_unservable("2.x", "how", _deploy(), None, source)
    assert [p.location for p in caught.value.problems] == ["source.manifest"]


def test_1x_image_takes_every_path() -> None:
    build = BuildSpec(backend="nim-jit", image="img:1")
    refuse_unservable("1.x", "how", _deploy(), build, SourceSpec(repo_id="o/m"))
