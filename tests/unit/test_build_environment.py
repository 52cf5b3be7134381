"""Build containers get only the secrets their backend needs (nimflow.engine_build.build_environment)."""

from __future__ import annotations

from typing import get_args

import pytest

from nimflow.engine_build import BUILD_SECRETS, build_environment
from nimflow.spec import BuildBackend, BuildSpec

SECRETS = {"NGC_API_KEY": "nvapi-secret", "HF_TOKEN": "hf_secret"}


@pytest.mark.parametrize("backend", ["trtllm-build", "nim-jit"])
def test_builds_from_a_local_checkpoint_get_no_secrets(backend: str) -> None:
    """convert_checkpoint.py/trtllm-build and a NIM_FT_MODEL JIT build read the mounted checkpoint: no tokens."""
    build = BuildSpec(backend=backend, image="x", env={"TLLM_LOG_LEVEL": "INFO"})
    env = build_environment(build, SECRETS, {"NIM_FT_MODEL": "/workspace/model"})
    assert env == {"TLLM_LOG_LEVEL": "INFO", "NIM_FT_MODEL": "/workspace/model"}


def test_nim_optimize_gets_the_ngc_key_only() -> None:
    """nim-optimize starts from an NGC profile (NGC_API_KEY); it never needs the Hugging Face token."""
    env = build_environment(BuildSpec(backend="nim-optimize", image="x"), SECRETS)
    assert env == {"NGC_API_KEY": "nvapi-secret"}
    assert build_environment(BuildSpec(backend="nim-optimize", image="x"), {}) == {}  # none set: none passed


def test_what_nimflow_sets_overrides_build_env() -> None:
    """Variables nimflow sets for a step win over build.env of the same name."""
    build = BuildSpec(backend="trtllm-build", image="x", env={"A": "from-spec", "B": "kept"})
    assert build_environment(build, {}, {"A": "from-nimflow"}) == {"A": "from-nimflow", "B": "kept"}


def test_every_backend_says_which_secrets_it_needs() -> None:
    """A new backend must be added to BUILD_SECRETS (deliberately, not by falling through to all secrets)."""
    assert set(BUILD_SECRETS) == set(get_args(BuildBackend))
    assert all("HF_TOKEN" not in needed for needed in BUILD_SECRETS.values())
