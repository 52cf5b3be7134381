"""``check_manifest``: an engine-store manifest is used only once every field it is read for is checked.

Checked before the fix: ``check_manifest`` did not exist; the restore read these fields unchecked.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from nimflow.engine_store import MANIFEST_SCHEMA, MAX_ENGINE_BYTES, MAX_ENGINE_FILES, check_manifest
from nimflow.errors import EngineStoreError

KEY = "a" * 64
SOURCE = "s3://engines/prod/" + KEY + "/manifest.json"


def _manifest(**changes: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "schema": MANIFEST_SCHEMA, "engine_key": KEY, "upload_id": "0123456789abcdef01234567",
        "key_inputs": {"weights": "w", "gpu": {"name": "H100"}, "trtllm_version": "0.17.0", "build": {"dtype": "float16"}},
        "engine": {"tp_size": 1}, "built_by": "host", "created_at": "2025-01-01T00:00:00Z",
        "files": [{"path": "trtllm_engine/rank0.engine", "size": 10, "sha256": "0" * 64},
                  {"path": "config.json", "size": 2, "sha256": "1" * 64}],
    }
    manifest.update(changes)
    return manifest


def test_a_manifest_as_written_passes() -> None:
    manifest = _manifest()
    assert check_manifest(copy.deepcopy(manifest), KEY, source=SOURCE) == manifest


def _file(**changes: Any) -> list[dict[str, Any]]:
    return [{"path": "trtllm_engine/rank0.engine", "size": 10, "sha256": "0" * 64, **changes}]


@pytest.mark.parametrize(("manifest", "named"), [
    ([], "a JSON object"),
    (_manifest(schema="nimflow-engine-manifest/99"), "schema"),
    (_manifest(engine_key="b" * 64), "b" * 64),
    (_manifest(engine_key=None), "engine_key"),
    (_manifest(upload_id="../../other"), "upload_id"),
    (_manifest(key_inputs="gpu"), "key_inputs"),
    (_manifest(key_inputs={"gpu": "H100"}), "key_inputs.gpu"),
    (_manifest(key_inputs={"trtllm_version": 17}), "key_inputs.trtllm_version"),
    (_manifest(engine=[]), "engine"),
    (_manifest(created_at=5), "created_at"),
    (_manifest(files={"a": 1}), "files"),
    (_manifest(files=[]), "trtllm_engine"),
    (_manifest(files=[*_file(), "x"]), "files[1]"),
    (_manifest(files=_file(path="../x")), "'../x'"),
    (_manifest(files=_file(path="/etc/cron.d/x")), "'/etc/cron.d/x'"),
    (_manifest(files=_file(path="nimflow-manifest.json")), "nimflow-manifest.json"),
    (_manifest(files=_file(size="10")), "size"),
    (_manifest(files=_file(size=True)), "size"),
    (_manifest(files=_file(size=-1)), "size"),
    (_manifest(files=_file(sha256="zz")), "sha256"),
    (_manifest(files=[*_file(), *_file()]), "twice"),
    (_manifest(files=[*_file(), *_file(path="./trtllm_engine/rank0.engine")]), "twice"),
    (_manifest(files=_file(size=MAX_ENGINE_BYTES + 1)), "bytes"),
])
def test_hostile_or_corrupt_manifests_are_refused_naming_source_and_entry(manifest: Any, named: str) -> None:
    with pytest.raises(EngineStoreError) as caught:
        check_manifest(manifest, KEY, source=SOURCE)
    assert SOURCE in str(caught.value) and named in str(caught.value), str(caught.value)


def test_more_files_than_the_bound_are_refused_before_any_is_looked_at() -> None:
    files = [{"path": f"trtllm_engine/rank{i}.engine", "size": 1, "sha256": "0" * 64} for i in range(MAX_ENGINE_FILES + 1)]
    with pytest.raises(EngineStoreError, match=f"more than {MAX_ENGINE_FILES} files"):
        check_manifest(_manifest(files=files), KEY, source=SOURCE)
