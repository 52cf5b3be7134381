"""The engine key: a content address for a compiled engine.

Two builds with the same key produce interchangeable engines, so a key that is already in the
engine store is never built again. The key hashes everything the engine depends on that nimflow
knows today: the weights' identity, the build parameters, and the exact image (by id, not tag).
Later versions add GPU model and TensorRT versions (see docs/engine-key.md when it lands).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from nimflow.spec import BuildSpec

#: Bump when the key's inputs change meaning, so old keys are never mistaken for new ones.
KEY_SCHEMA = "nimflow-engine-key/1"


def engine_key_inputs(*, weights_identity: str, build: BuildSpec, image_id: str) -> dict[str, Any]:
    """The canonical inputs of an engine key (also recorded in the engine manifest)."""
    return {
        "schema": KEY_SCHEMA,
        "weights": weights_identity,
        "image_id": image_id,
        "build": build.model_dump(mode="json", exclude={"image", "gpus", "shm_size", "timeout_seconds"}),
    }


def engine_key(inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``inputs``, as 64 hex characters."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
