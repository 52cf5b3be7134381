"""The engine key: a content address for a compiled engine.

Two builds with the same key produce interchangeable engines, so a key that is already in the
engine store is never built again, and an engine is never restored where its key differs. The key
is the sha256 of the canonical JSON of everything that makes an engine valid:

* the weights' identity (``hf:<repo>@<sha>`` or a content digest, plus the fine-tune digest);
* which files of the checkpoint repo were downloaded (``source.allow_patterns``): they decide the
  model side files (config, tokenizer) that go into the engine directory;
* the normalised build config (backend, every field it honours, the build env except entries that
  only change logging, :data:`~nimflow.build_config.ENGINE_NEUTRAL_ENV`);
* the command lines, build config file and fixed environment nimflow hands the builder
  (:func:`~nimflow.engine_build.builder_invocation`);
* the build image id (not its tag) and the TensorRT-LLM version in that image;
* the build GPU: product name, compute capability and PCI device id (not which GPU ids, nor how many:
  tp x pp is in the build config).

Everything else (ports, shm, timeouts, GPU ids on the same model) leaves the key unchanged.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from nimflow.build_config import normalized_build_config
from nimflow.engine_build import builder_invocation
from nimflow.gpu_identity import TargetIdentity
from nimflow.spec import BuildSpec

#: Bump when the key's inputs change meaning, so old keys are never mistaken for new ones.
KEY_SCHEMA = "nimflow-engine-key/3"


def engine_key_inputs(
    *, weights_identity: str, build: BuildSpec, image_id: str, target: TargetIdentity, allow_patterns: list[str] | None = None
) -> dict[str, Any]:
    """The canonical inputs of an engine key (also recorded in the engine manifest).

    Args:
        allow_patterns: the source's ``allow_patterns`` (None: the whole repo); order and repeats do not matter.
    """
    return {
        "schema": KEY_SCHEMA,
        "weights": weights_identity,
        "files": None if allow_patterns is None else sorted(set(allow_patterns)),
        "build": normalized_build_config(build),
        "builder": builder_invocation(build),
        "image_id": image_id,
        **target.key_inputs(),
    }


def engine_key(inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``inputs``, as 64 hex characters."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def differing_inputs(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The leaf inputs that differ between two keys' inputs, as (dotted path, a's value, b's value)."""
    found: list[tuple[str, Any, Any]] = []
    for name in sorted(set(a) | set(b)):
        left, right = a.get(name), b.get(name)
        path = f"{prefix}{name}"
        if isinstance(left, dict) and isinstance(right, dict):
            found.extend(differing_inputs(left, right, f"{path}."))
        elif left != right:
            found.append((path, left, right))
    return found
