"""The checkpoint watcher's rules: S3 completeness (real moto S3), state diffing, the event's shape."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from nimflow.checkpoint_events import EVENT_NAME, POST_EVENTS_EXAMPLE, hf_checkpoint, s3_checkpoint
from nimflow.checkpoint_watch import (
    INDEX_FILE,
    DirectoryStatus,
    directory_status,
    list_checkpoint_dirs,
    new_commits,
    new_directories,
    save_state,
    watched_refs,
)
from nimflow.errors import ConfigError, PermanentError
from nimflow.s3 import s3_client
from nimflow.testbed.services import S3_TEST_CREDENTIALS, create_bucket

SHA_A = "a" * 40
SHA_B = "b" * 40
SHA_C = "c" * 40


@pytest.fixture
def bucket(s3_server: Any, monkeypatch: pytest.MonkeyPatch, unique: str) -> tuple[Any, str]:
    for key, value in S3_TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    name = f"ckpt-{unique}"
    create_bucket(s3_server.url, name)
    return s3_client(endpoint_url=s3_server.url), name


def _put(client: Any, bucket: str, key: str, body: bytes = b"x") -> None:
    client.put_object(Bucket=bucket, Key=key, Body=body)


def _index(*shards: str) -> bytes:
    return json.dumps({"metadata": {}, "weight_map": {f"layer.{i}": s for i, s in enumerate(shards)}}).encode()


# --- S3 completeness ---------------------------------------------------------------------------------


def test_lists_only_directories_directly_under_the_prefix(bucket: tuple[Any, str]) -> None:
    client, name = bucket
    _put(client, name, "runs/a/checkpoint-1/config.json")
    _put(client, name, "runs/a/checkpoint-2/sub/deep.bin")
    _put(client, name, "runs/a/loose-file.txt")
    _put(client, name, "runs/b/checkpoint-9/config.json")
    assert list_checkpoint_dirs(client, f"s3://{name}/runs/a/") == [
        ("checkpoint-1", "runs/a/checkpoint-1/"),
        ("checkpoint-2", "runs/a/checkpoint-2/"),
    ]


def test_sharded_directory_is_complete_only_with_the_index_and_every_shard(bucket: tuple[Any, str]) -> None:
    client, name = bucket
    key = "runs/checkpoint-1/"
    _put(client, name, key + "model-00001-of-00002.safetensors")
    assert directory_status(client, name, key, None) == (False, f"waiting for {INDEX_FILE} (or configure watch.marker)")
    _put(client, name, key + INDEX_FILE, _index("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"))
    complete, reason = directory_status(client, name, key, None)
    assert not complete and "model-00002-of-00002.safetensors" in reason
    _put(client, name, key + "model-00002-of-00002.safetensors")
    assert directory_status(client, name, key, None) == (True, f"{INDEX_FILE} and its 2 shards present")


def test_an_invalid_index_is_not_complete(bucket: tuple[Any, str]) -> None:
    client, name = bucket
    _put(client, name, "runs/checkpoint-1/" + INDEX_FILE, b"{not json")
    complete, reason = directory_status(client, name, "runs/checkpoint-1/", None)
    assert not complete and "not a valid index" in reason


def test_with_a_marker_only_the_marker_counts(bucket: tuple[Any, str]) -> None:
    client, name = bucket
    key = "runs/checkpoint-1/"
    _put(client, name, key + INDEX_FILE, _index("model.safetensors"))
    _put(client, name, key + "model.safetensors")
    assert directory_status(client, name, key, "_COMPLETE") == (False, "waiting for marker _COMPLETE")
    _put(client, name, key + "_COMPLETE", b"")
    assert directory_status(client, name, key, "_COMPLETE") == (True, "marker _COMPLETE present")


# --- state diffing -----------------------------------------------------------------------------------


def test_watched_refs_keep_watched_branches_in_order_then_matching_tags() -> None:
    branches = {"main": SHA_A, "dev": SHA_B, "release": SHA_C}
    tags = {"v2": SHA_B, "v1": SHA_A, "nightly": SHA_C}
    assert list(watched_refs(branches, tags, ["release", "main", "gone"], "v*").items()) == [
        ("heads/release", SHA_C), ("heads/main", SHA_A), ("tags/v1", SHA_A), ("tags/v2", SHA_B),
    ]
    assert watched_refs(branches, tags, ["main"], None) == {"heads/main": SHA_A}


def test_no_state_is_a_baseline_with_nothing_new() -> None:
    assert new_commits(None, {"heads/main": SHA_A}) == []
    assert new_directories(None, [DirectoryStatus("c1", "s3://b/p/c1/", True, "")]) == []


def test_a_moved_branch_is_one_new_commit_and_an_unchanged_state_none() -> None:
    previous = {"heads/main": SHA_A[:16]}
    assert new_commits(previous, {"heads/main": SHA_A}) == []
    assert new_commits(previous, {"heads/main": SHA_B}) == [("heads/main", SHA_B)]


def test_refs_naming_the_same_new_commit_give_one_checkpoint_and_a_tag_on_a_known_commit_none() -> None:
    previous = {"heads/main": SHA_A[:16]}
    assert new_commits(previous, {"heads/main": SHA_B, "tags/v1": SHA_B}) == [("heads/main", SHA_B)]
    assert new_commits(previous, {"heads/main": SHA_A, "tags/v1": SHA_A}) == []
    assert new_commits(previous, {"heads/main": SHA_A, "tags/v1": SHA_C}) == [("tags/v1", SHA_C)]


def test_only_complete_unseen_directories_are_new() -> None:
    from nimflow.checkpoint_watch import _dir_hash

    dirs = [
        DirectoryStatus("c1", "s3://b/p/c1/", True, ""),
        DirectoryStatus("c2", "s3://b/p/c2/", False, "waiting"),
        DirectoryStatus("c3", "s3://b/p/c3/", True, ""),
    ]
    assert [d.name for d in new_directories({_dir_hash("c1")}, dirs)] == ["c3"]


def test_a_state_larger_than_a_variable_is_refused_with_the_fix() -> None:
    state = {"v": 1, "s3": {"source": "nimflow.source.s3.b/p", "seen": [f"{i:010x}" for i in range(600)]}}
    with pytest.raises(PermanentError, match="narrow watch.tags, or prune old checkpoint directories"):
        save_state("too-big", state)


# --- the event ---------------------------------------------------------------------------------------


def test_hf_event_body_shape_and_deterministic_id() -> None:
    event = hf_checkpoint("llama-sft", "my-org/llama", SHA_A, ref="main")
    body = event.body()
    assert body["event"] == EVENT_NAME == "nimflow.checkpoint.landed"
    assert body["resource"] == {
        "prefect.resource.id": "nimflow.source.hf.my-org/llama",
        "prefect.resource.name": "my-org/llama",
        "nimflow.spec": "llama-sft",
    }
    assert body["payload"] == {"spec": "llama-sft", "revision": SHA_A, "ref": "main"}
    assert body["occurred"].endswith("Z")
    # The same checkpoint is the same event, whichever ref or announcer names it; another one is not.
    assert uuid.UUID(body["id"]) == hf_checkpoint("llama-sft", "my-org/llama", SHA_A).event_id
    assert event.event_id != hf_checkpoint("llama-sft", "my-org/llama", SHA_B).event_id
    assert event.event_id != hf_checkpoint("other-spec", "my-org/llama", SHA_A).event_id


def test_a_reannouncement_is_a_new_event_with_the_same_body() -> None:
    """The watcher re-announces a checkpoint that got no run under a new id (the server's triggers ignore an
    id they have seen); each attempt's id is deterministic, and the first attempt's is the id of before."""
    from dataclasses import replace

    event = hf_checkpoint("llama-sft", "my-org/llama", SHA_A)
    namespace = uuid.UUID("6f1c2b9e-5d7a-4c3e-9b1f-2a8d4e6c0f13")
    assert event.event_id == uuid.uuid5(namespace, f"llama-sft\nnimflow.source.hf.my-org/llama\n{SHA_A}")
    ids = [replace(event, attempt=n).event_id for n in range(4)]
    assert len(set(ids)) == 4 and ids == [replace(event, attempt=n).event_id for n in range(4)]
    again = replace(event, attempt=2).body()
    assert {k: v for k, v in again.items() if k not in ("id", "occurred")} == {
        k: v for k, v in event.body().items() if k not in ("id", "occurred")}


def test_s3_event_body_shape() -> None:
    event = s3_checkpoint("llama-sft", "s3://bucket/runs/sft/", "s3://bucket/runs/sft/checkpoint-1200")
    assert event.resource() == {
        "prefect.resource.id": "nimflow.source.s3.bucket/runs/sft",
        "prefect.resource.name": "s3://bucket/runs/sft/",
        "nimflow.spec": "llama-sft",
    }
    assert event.payload() == {"spec": "llama-sft", "uri": "s3://bucket/runs/sft/checkpoint-1200/"}


def test_the_documented_post_body_is_a_valid_prefect_event() -> None:
    from prefect.events import Event

    body = json.loads(POST_EVENTS_EXAMPLE.split("-d '", 1)[1].split("'\n", 1)[0])
    event = Event.model_validate(body[0])
    assert event.event == EVENT_NAME
    assert event.resource.id == "nimflow.source.s3.my-bucket/runs/llama-sft"
    assert set(event.payload) == {"spec", "uri"}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: hf_checkpoint("s", "o/r", "main"), "not a full commit sha"),
        (lambda: s3_checkpoint("s", "s3://bkt/runs/", "s3://bkt/other/c1/"), "not a checkpoint directory directly under"),
        (lambda: s3_checkpoint("s", "s3://bkt/runs/", "s3://bkt/runs/c1/nested/"), "not a checkpoint directory directly under"),
        (lambda: s3_checkpoint("s", "s3://bkt/runs/", "/local/c1"), "not an s3://bucket/prefix URI"),
    ],
)
def test_invalid_checkpoints_are_config_errors(make: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()
