"""The containment rule: names from outside become paths only inside their destination."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nimflow.containment import contained_path, regular_files, safe_relative
from nimflow.errors import EngineStoreError, InvalidWeights


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "//srv/x", "a//b", "a\0b", "a\nb", "a\\..\\b",
                                  "", ".", "./", "x" * 2000, "/".join(["d"] * 40), 5, None])
def test_unsafe_names_are_refused_naming_source_and_name(name: object) -> None:
    with pytest.raises(InvalidWeights) as caught:
        safe_relative(name, source="s3://bucket/ckpt")
    assert "s3://bucket/ckpt" in str(caught.value) and "refused the name" in str(caught.value)


@pytest.mark.parametrize(("name", "normal"), [("a/b.safetensors", "a/b.safetensors"), ("./config.json", "config.json"),
                                              ("dir/./x", "dir/x"), ("trailing/", "trailing")])
def test_safe_names_are_normalised(name: str, normal: str) -> None:
    assert safe_relative(name, source="test") == normal


def test_the_error_class_is_the_callers(tmp_path: Path) -> None:
    with pytest.raises(EngineStoreError):
        contained_path(tmp_path, "../x", source="manifest", error=EngineStoreError)


def test_a_link_already_in_the_destination_cannot_redirect_a_write(tmp_path: Path) -> None:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "sub").symlink_to(outside)
    with pytest.raises(InvalidWeights, match="resolves outside"):
        contained_path(dest, "sub/file", source="test")
    assert contained_path(dest, "x/y", source="test") == dest.resolve() / "x/y"


def test_local_files_follow_links_only_inside_the_directory(tmp_path: Path) -> None:
    # The Hugging Face cache layout: snapshots/<sha>/file -> ../../blobs/<hash>.
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text("weights")
    snapshot = repo / "snapshots" / "0123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to("../../blobs/abc")
    (snapshot / "config.json").write_text("{}")
    files = dict(regular_files(snapshot, source="local"))
    assert files == {"config.json": snapshot / "config.json", "model.safetensors": (repo / "blobs" / "abc").resolve()}
    # A snapshot's link into another part of the cache is refused.
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123")
    (snapshot / "extra.txt").symlink_to("../../refs/main")
    with pytest.raises(InvalidWeights, match="extra.txt"):
        list(regular_files(snapshot, source="local"))


def test_local_links_to_host_files_and_fifos_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("MARKER")
    source = tmp_path / "ft"
    source.mkdir()
    (source / "notes.txt").symlink_to(secret)
    with pytest.raises(InvalidWeights, match="notes.txt"):
        list(regular_files(source, source="local"))
    (source / "notes.txt").unlink()
    os.mkfifo(source / "pipe")
    with pytest.raises(InvalidWeights, match="not a regular file"):
        list(regular_files(source, source="local"))
