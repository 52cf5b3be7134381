"""Benchmark: downloading a checkpoint, nimflow against a bare ``snapshot_download``.

A multi-file model (four shards making up ``--size-gib``, plus config and tokenizer files) is
published on the test bed's Hugging Face Hub server, run as its own process. Each round downloads
it at its commit sha into a fresh directory with nimflow's download path (``fetch_snapshot``, what
the download task runs: progress, completion marker) and with a bare
``huggingface_hub.snapshot_download``, in alternating order. Then nimflow fetches the same sha
again into its now complete cache, against an in-process hub server that logs every request: it
must transfer 0 bytes.

    .venv/bin/python bench/download.py --size-gib 1 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from huggingface_hub import snapshot_download

from nimflow.hub_snapshot import fetch_snapshot
from nimflow.testbed.hub_server import HubServer, publish
from nimflow.testbed.tiny_model import write_tiny_llama

MIB = 1 << 20
REPO = Path(__file__).resolve().parents[1]
REPO_ID = "bench/multi-shard"


def make_model(work: Path, size_gib: float) -> Path:
    source = work / "download-source"
    shutil.rmtree(source, ignore_errors=True)
    write_tiny_llama(source)
    (source / "model.safetensors").unlink(missing_ok=True)
    shard = int(size_gib * 1024 * MIB) // 4
    for index in range(1, 5):
        with (source / f"model-0000{index}-of-00004.safetensors").open("wb") as handle:
            left = shard
            while left:
                piece = os.urandom(min(left, 8 * MIB))
                handle.write(piece)
                left -= len(piece)
    return source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=str(REPO / ".testbed" / "bench"))
    args = parser.parse_args()
    work = Path(args.work)
    hub_root = work / "hub"
    shutil.rmtree(hub_root, ignore_errors=True)
    source = make_model(work, args.size_gib)
    sha = publish(hub_root, REPO_ID, source)
    total_mib = sum(p.stat().st_size for p in source.rglob("*") if p.is_file()) / MIB
    server = subprocess.Popen([sys.executable, "-m", "nimflow.testbed.hub_server", "--root", str(hub_root)],
                              stdout=subprocess.PIPE, text=True)
    url = server.stdout.readline().strip() if server.stdout else ""
    os.environ["HF_ENDPOINT"] = url
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    times: dict[str, list[float]] = {"nimflow": [], "snapshot_download": []}
    try:
        for round_no in range(args.rounds):
            order = ["nimflow", "snapshot_download"][:: 1 if round_no % 2 == 0 else -1]
            for tool in order:
                dest = work / f"download-{tool}"
                shutil.rmtree(dest, ignore_errors=True)
                started = time.perf_counter()
                if tool == "nimflow":
                    fetch_snapshot(REPO_ID, sha, None, dest)
                else:
                    snapshot_download(REPO_ID, revision=sha, local_dir=dest, endpoint=url)
                times[tool].append(time.perf_counter() - started)
                print(f"round {round_no + 1} {tool:17s} {total_mib / times[tool][-1]:7.1f} MiB/s", flush=True)
    finally:
        server.terminate()
        server.wait(30)

    # The repeat at the same sha, against a hub that logs every request.
    with HubServer(hub_root) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        again = fetch_snapshot(REPO_ID, sha, None, work / "download-nimflow")
        served = [r for r in hub.requests if "/resolve/" in r[1] and r[0] == "GET"]
    nim, bare = statistics.median(times["nimflow"]), statistics.median(times["snapshot_download"])
    print(f"\n{total_mib / 1024:.2f} GiB in {sum(1 for p in source.rglob('*') if p.is_file())} files, {args.rounds} rounds, medians:")
    print(f"nimflow {total_mib / nim:.0f} MiB/s, snapshot_download {total_mib / bare:.0f} MiB/s: ratio {bare / nim:.3f}x")
    print(f"repeat at the same sha: {again.downloaded_files} files, {again.downloaded_bytes} bytes downloaded, "
          f"{len(hub.requests)} hub requests ({len(served)} file GETs)")
    for tool in times:
        shutil.rmtree(work / f"download-{tool}", ignore_errors=True)


if __name__ == "__main__":
    main()
