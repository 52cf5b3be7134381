"""The stdlib hub endpoint, driven by the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from nimflow.testbed.hub_server import HubServer, git_blob_sha1, publish
from nimflow.testbed.tiny_model import write_tiny_llama

pytestmark = pytest.mark.testbed

REPO = "acme/tiny-llama"
BIG = 1024 * 1024 + 4097  # above the 1 MiB LFS threshold


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = write_tiny_llama(tmp_path / "src")
    (d / "extra").mkdir()
    (d / "extra" / "big.bin").write_bytes(hashlib.sha256(b"seed").digest() * (BIG // 32) + b"tail")
    return d


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(tmp_path / "hub") as server:
        yield server


def _get_resolves(hub: HubServer) -> list[tuple[str, str, int]]:
    return [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]


def _same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and all((b / f).read_bytes() == (a / f).read_bytes() for f in files)


def test_snapshot_download_main_and_pinned(hub: HubServer, model_dir: Path, tmp_path: Path) -> None:
    sha = publish(hub.root, REPO, model_dir, tags=["v1"])
    api = HfApi(endpoint=hub.url)
    assert api.model_info(REPO, revision="main").sha == sha
    assert api.model_info(REPO).sha == sha  # no revision: GET /api/models/{repo}
    refs = api.list_repo_refs(REPO)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", sha)]
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", sha)]

    hub.clear_requests()
    out = Path(snapshot_download(REPO, revision="main", endpoint=hub.url, local_dir=tmp_path / "dl",
                                 cache_dir=tmp_path / "cache"))
    _same_tree(model_dir, out)
    kinds = [(m, p.split("?")[0].split("/")[5] if p.startswith("/api/") else "resolve") for m, p, _ in hub.requests]
    assert kinds[:2] == [("GET", "revision"), ("GET", "tree")]  # the order huggingface_hub uses
    assert all(status == 200 for *_, status in hub.requests)
    assert len(_get_resolves(hub)) == len([p for p in model_dir.rglob("*") if p.is_file()])  # one GET per file

    hub.clear_requests()  # pinned sha, same local_dir: nothing is transferred again
    again = snapshot_download(REPO, revision=sha, endpoint=hub.url, local_dir=tmp_path / "dl",
                              cache_dir=tmp_path / "cache")
    assert Path(again) == out and _get_resolves(hub) == []

    pinned = Path(snapshot_download(REPO, revision=sha, endpoint=hub.url, cache_dir=tmp_path / "c2",
                                    allow_patterns=["*.json"]))
    assert sha in str(pinned) and {p.name for p in pinned.iterdir()} == {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert not any(r[1].endswith("/revision/" + sha) for r in hub.requests)  # a sha skips revision resolution
    tagged = snapshot_download(REPO, revision="v1", endpoint=hub.url, cache_dir=tmp_path / "c3",
                               allow_patterns=["config.json"])
    assert (Path(tagged) / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()


def test_lfs_file_headers_range_and_download(hub: HubServer, model_dir: Path, tmp_path: Path) -> None:
    sha = publish(hub.root, REPO, model_dir)
    data = (model_dir / "extra" / "big.bin").read_bytes()
    tree = {e.path: e for e in HfApi(endpoint=hub.url).list_repo_tree(REPO, recursive=True)}
    assert "extra" in tree and tree["extra/big.bin"].lfs.sha256 == hashlib.sha256(data).hexdigest()
    assert tree["config.json"].lfs is None
    assert tree["config.json"].blob_id == git_blob_sha1((model_dir / "config.json").read_bytes())

    conn = http.client.HTTPConnection(hub.url.removeprefix("http://"))
    conn.request("HEAD", f"/{REPO}/resolve/main/extra/big.bin")
    r = conn.getresponse()
    r.read()
    assert r.status == 200 and r.getheader("X-Repo-Commit") == sha
    assert r.getheader("X-Linked-Etag") == f'"{hashlib.sha256(data).hexdigest()}"'
    assert r.getheader("X-Linked-Size") == r.getheader("Content-Length") == str(len(data))
    conn.request("GET", f"/{REPO}/resolve/{sha}/extra/big.bin", headers={"Range": "bytes=1048576-"})
    r = conn.getresponse()  # same keep-alive connection
    assert r.status == 206 and r.getheader("Content-Range") == f"bytes 1048576-{len(data) - 1}/{len(data)}"
    assert r.read() == data[1048576:]
    conn.request("GET", f"/{REPO}/resolve/{sha}/extra/big.bin", headers={"Range": f"bytes={len(data)}-"})
    r = conn.getresponse()
    r.read()
    assert r.status == 416
    conn.close()

    path = hf_hub_download(REPO, "extra/big.bin", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == data
    assert Path(path).resolve().name == hashlib.sha256(data).hexdigest()  # blob named after the LFS etag


def test_new_commit_keeps_old_sha_downloadable(hub: HubServer, model_dir: Path, tmp_path: Path) -> None:
    first = publish(hub.root, REPO, model_dir)
    assert publish(hub.root, REPO, model_dir) == first  # same content on the branch: no new commit
    assert publish(tmp_path / "other-root", REPO, model_dir) == first  # content-addressed
    old_config = (model_dir / "config.json").read_bytes()
    write_tiny_llama(model_dir, seed=7, num_layers=1)
    second = publish(hub.root, REPO, model_dir)
    assert second != first and len(second) == 40
    assert HfApi(endpoint=hub.url).model_info(REPO, revision="main").sha == second
    old = hf_hub_download(REPO, "config.json", revision=first, endpoint=hub.url, cache_dir=tmp_path / "c")
    new = hf_hub_download(REPO, "config.json", revision="main", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert Path(old).read_bytes() == old_config != Path(new).read_bytes()
    assert json.loads(Path(new).read_text())["num_hidden_layers"] == 1


def test_errors_map_to_huggingface_hub_exceptions(hub: HubServer, model_dir: Path, tmp_path: Path) -> None:
    publish(hub.root, REPO, model_dir)
    api = HfApi(endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="nope", endpoint=hub.url, cache_dir=tmp_path / "c")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="0" * 40, endpoint=hub.url, cache_dir=tmp_path / "c")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/missing", revision="main")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("acme/missing", endpoint=hub.url, cache_dir=tmp_path / "c")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "no/such/file.bin", endpoint=hub.url, cache_dir=tmp_path / "c")
    statuses = {(p.split("/")[-1], s) for _, p, s in hub.requests}
    assert {("nope", 404), ("main", 401), ("file.bin", 404)} <= statuses


def test_gated_repo(hub: HubServer, model_dir: Path, tmp_path: Path) -> None:
    publish(hub.root, REPO, model_dir, gated=True)
    assert HfApi(endpoint=hub.url).model_info(REPO, revision="main").gated == "manual"  # metadata stays public
    with pytest.raises(GatedRepoError):
        snapshot_download(REPO, endpoint=hub.url, cache_dir=tmp_path / "c")
    with pytest.raises(GatedRepoError):
        hf_hub_download(REPO, "config.json", endpoint=hub.url, cache_dir=tmp_path / "c")
    publish(hub.root, REPO, model_dir, gated=False)  # access settings are declarative
    assert Path(hf_hub_download(REPO, "config.json", endpoint=hub.url, cache_dir=tmp_path / "c")).is_file()


def test_private_repo_needs_the_token(hub: HubServer, model_dir: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    secret = "hf_testbed_secret_0123456789"
    sha = publish(hub.root, REPO, model_dir, token=secret)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(REPO, endpoint=hub.url, cache_dir=tmp_path / "c", token=False)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token="hf_wrong").model_info(REPO, revision="main")
    with pytest.raises(RepositoryNotFoundError):  # direct resolve is guarded too, not only the API
        hf_hub_download(REPO, "config.json", revision=sha, endpoint=hub.url, cache_dir=tmp_path / "c", token=False)
    out = snapshot_download(REPO, endpoint=hub.url, cache_dir=tmp_path / "c", token=secret)
    _same_tree(model_dir, Path(out))
    monkeypatch.setenv("HF_TOKEN", secret)  # the env var the pipeline relies on
    assert HfApi(endpoint=hub.url).model_info(REPO, revision="main").private is True
    assert secret not in caplog.text and all(secret not in p for _, p, _ in hub.requests)


def test_cli_serves_and_stops_on_sigterm(model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "hub"
    sha = publish(root, REPO, model_dir)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "nimflow.testbed.hub_server", "--root", str(root)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert url.startswith("http://127.0.0.1:")
        assert HfApi(endpoint=url).model_info(REPO, revision="main").sha == sha
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
