"""The engine key: equal inputs give equal keys, and only what the engine depends on changes it."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from nimflow.engine_build import render_build_config
from nimflow.engine_key import KEY_SCHEMA, engine_key, engine_key_inputs
from nimflow.spec import BuildSpec

WEIGHTS = "hf:org/tiny-llama@0123456789abcdef0123456789abcdef01234567"
IMAGE_ID = "sha256:" + "a" * 64
BUILD: dict[str, Any] = {
    "backend": "nim-optimize",
    "image": "nvcr.io/nim/meta/llama:1.8.0",
    "dtype": "float16",
    "tp_size": 1,
    "max_seq_len": 2048,
    "max_batch_size": 8,
    "max_num_tokens": 2048,
}


def _key(weights: str = WEIGHTS, image_id: str = IMAGE_ID, **build: Any) -> str:
    """The engine key of the base inputs with ``build`` fields overridden."""
    spec = BuildSpec(**{**BUILD, **build})
    return engine_key(engine_key_inputs(weights_identity=weights, build=spec, image_id=image_id))


def test_same_inputs_same_key() -> None:
    """The key is deterministic and 64 lowercase hex characters."""
    key = _key()
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert _key() == key


def test_key_ignores_dict_order() -> None:
    """The key hashes canonical JSON: the order of input keys does not matter."""
    inputs = engine_key_inputs(weights_identity=WEIGHTS, build=BuildSpec(**BUILD), image_id=IMAGE_ID)
    reordered = dict(reversed(list(inputs.items())))
    assert engine_key(reordered) == engine_key(inputs)


def test_inputs_record_schema_and_identity() -> None:
    """The recorded inputs carry the schema, the weights' identity and the image id."""
    inputs = engine_key_inputs(weights_identity=WEIGHTS, build=BuildSpec(**BUILD), image_id=IMAGE_ID)
    assert inputs["schema"] == KEY_SCHEMA
    assert inputs["weights"] == WEIGHTS
    assert inputs["image_id"] == IMAGE_ID
    assert not {"image", "gpus", "shm_size", "timeout_seconds"} & set(inputs["build"])


@pytest.mark.parametrize(
    "change",
    [
        {"weights": "hf:org/tiny-llama@" + "f" * 40},
        {"image_id": "sha256:" + "b" * 64},
        {"dtype": "bfloat16"},
        {"tp_size": 2},
        {"pp_size": 2},
        {"max_num_tokens": 1024},
        {"max_seq_len": 4096},
        {"max_batch_size": 16},
        {"backend": "nim-jit"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_engine_inputs_change_the_key(change: dict[str, Any]) -> None:
    """Anything the engine depends on changes the key."""
    assert _key(**change) != _key()


@pytest.mark.parametrize(
    "change",
    [
        {"gpus": [4, 5]},
        {"gpus": "all"},
        {"timeout_seconds": 60},
        {"shm_size": "64g"},
        {"image": "nvcr.io/nim/meta/llama:latest"},
    ],
    ids=["gpus-list", "gpus-all", "timeout", "shm", "image-tag"],
)
def test_host_details_do_not_change_the_key(change: dict[str, Any]) -> None:
    """Which GPUs build it, how long it may take, shm and the image's tag (same id) do not matter."""
    assert _key(**change) == _key()


def test_render_build_config_has_exactly_the_build_keys() -> None:
    """The nim-optimize build YAML has exactly the engine's parameters, with the spec's values."""
    spec = BuildSpec(**{**BUILD, "dtype": "bfloat16", "tp_size": 2, "pp_size": 2, "max_num_tokens": 1000,
                        "gpus": [0, 1, 2, 3], "shm_size": "32g", "timeout_seconds": 99})
    rendered = yaml.safe_load(render_build_config(spec))
    assert rendered == {
        "dtype": "bfloat16",
        "tp_size": 2,
        "pp_size": 2,
        "max_seq_len": 2048,
        "max_batch_size": 8,
        "max_num_tokens": 1000,
    }


def test_render_build_config_defaults() -> None:
    """Spec defaults reach the build YAML unchanged."""
    spec = BuildSpec(backend="nim-jit", image="x")
    rendered = yaml.safe_load(render_build_config(spec))
    assert rendered == {"dtype": "float16", "tp_size": 1, "pp_size": 1, "max_seq_len": 8192,
                        "max_batch_size": 64, "max_num_tokens": 8192}
