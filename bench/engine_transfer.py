"""Benchmark: publishing and restoring an engine directory, nimflow against the plain tools.

One command, one server, one batch: each round runs every tool on the same data and server, in a
rotated order (batches drift; only alternated runs compare), and the medians and ratios are printed
as a Markdown table for docs/performance.md.

    .venv/bin/python bench/engine_transfer.py --server s3rver --size-gib 2 --rounds 3
    .venv/bin/python bench/engine_transfer.py --server moto --size-gib 1 --rounds 2

Tools:
- nimflow: ``write_manifest`` (sha256 of every file) + ``EngineStore.upload`` (manifest published
  last), and ``EngineStore.restore`` (every byte verified against the manifest): the flow's code path.
- awscli: ``aws s3 cp --recursive`` both ways.
- boto3 default: ``upload_file`` / ``download_file`` per file, default transfer settings.
- best plain boto3: one ``put_object`` / ``get_object`` per file, 8 threads over files, unsigned
  payload, 32 pooled connections (the fastest plain setting measured on this machine); no verification.

Also reported: the peak RSS of a child process publishing and restoring the directory with nimflow.
s3rver comes from npm (``npm install s3rver`` into .testbed/s3rver; run with
``node --openssl-legacy-provider``); moto is the test bed's S3 server.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import BUCKET, S3Server, start_s3_server  # noqa: E402

MIB = 1 << 20
#: Seconds nimflow's publish spent hashing (write_manifest), per round: the part the plain tools skip.
HASHING: list[float] = []
REPO = Path(__file__).resolve().parents[1]


def make_engine_dir(root: Path, size_gib: float) -> Path:
    """An engine-like directory: four equal rank files making up ``size_gib``, plus four small files."""
    engine = root / "engine"
    if engine.exists():
        shutil.rmtree(engine)
    (engine / "trtllm_engine").mkdir(parents=True)
    rank_bytes = int(size_gib * 1024 * MIB) // 4
    for rank in range(4):
        with (engine / "trtllm_engine" / f"rank{rank}.engine").open("wb") as handle:
            left = rank_bytes
            while left:  # streamed: never a whole file in memory
                piece = os.urandom(min(left, 8 * MIB))
                handle.write(piece)
                left -= len(piece)
    (engine / "trtllm_engine" / "config.json").write_text(json.dumps({"pretrained_config": {"architecture": "LlamaForCausalLM"}}))
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        (engine / name).write_text(json.dumps({"bench": name}))
    return engine


def files_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def plain_client(server: S3Server, *, best: bool) -> object:
    options = {"max_pool_connections": 32, "s3": {"payload_signing_enabled": False}} if best else {}
    return boto3.client("s3", endpoint_url=server.url, aws_access_key_id=server.access_key,
                        aws_secret_access_key=server.secret_key, region_name="us-east-1", config=Config(**options))


def delete_prefix(client: object, prefix: str) -> None:
    paginator = client.get_paginator("list_objects_v2")  # type: ignore[attr-defined]
    keys = [item["Key"] for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix) for item in page.get("Contents", [])]
    for key in keys:
        client.delete_object(Bucket=BUCKET, Key=key)  # type: ignore[attr-defined]


# --- the tools: each returns (publish seconds, restore seconds) ----------------------------------


def run_nimflow(server: S3Server, engine: Path, dest: Path) -> tuple[float, float]:
    from nimflow.engine_store import MANIFEST_NAME, EngineStore, write_manifest
    from nimflow.spec import CacheSpec

    cache = CacheSpec(uri=f"s3://{BUCKET}/nimflow", endpoint_url=server.url, region="us-east-1")
    key = uuid.uuid4().hex
    started = time.perf_counter()
    manifest = write_manifest(engine, key, {}, {})
    HASHING.append(time.perf_counter() - started)
    outcome = EngineStore(cache).upload(engine, manifest)
    published = time.perf_counter()
    assert outcome.published, "the bench's engine key was already published"
    (engine / MANIFEST_NAME).unlink()
    EngineStore(cache).restore(manifest, dest, engine_key=key)
    restored = time.perf_counter()
    return published - started, restored - published


def run_awscli(server: S3Server, engine: Path, dest: Path) -> tuple[float, float]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
           "AWS_DEFAULT_REGION": "us-east-1"}
    target = f"s3://{BUCKET}/awscli-{uuid.uuid4().hex[:8]}"
    base = ["aws", "--endpoint-url", server.url, "s3", "cp", "--recursive", "--only-show-errors"]
    started = time.perf_counter()
    subprocess.run([*base, str(engine), target], env=env, check=True)
    published = time.perf_counter()
    subprocess.run([*base, target, str(dest)], env=env, check=True)
    return published - started, time.perf_counter() - published


def run_boto3_default(server: S3Server, engine: Path, dest: Path) -> tuple[float, float]:
    client = plain_client(server, best=False)
    prefix = f"default-{uuid.uuid4().hex[:8]}"
    paths = [p.relative_to(engine).as_posix() for p in files_of(engine)]
    started = time.perf_counter()
    for rel in paths:
        client.upload_file(str(engine / rel), BUCKET, f"{prefix}/{rel}")  # type: ignore[attr-defined]
    published = time.perf_counter()
    for rel in paths:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, f"{prefix}/{rel}", str(dest / rel))  # type: ignore[attr-defined]
    return published - started, time.perf_counter() - published


def run_boto3_best(server: S3Server, engine: Path, dest: Path) -> tuple[float, float]:
    client = plain_client(server, best=True)
    prefix = f"best-{uuid.uuid4().hex[:8]}"
    paths = [p.relative_to(engine).as_posix() for p in files_of(engine)]

    def put(rel: str) -> None:
        with (engine / rel).open("rb") as body:
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=body)  # type: ignore[attr-defined]

    def get(rel: str) -> None:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        body = client.get_object(Bucket=BUCKET, Key=f"{prefix}/{rel}")["Body"]  # type: ignore[attr-defined]
        with (dest / rel).open("wb") as handle:
            for chunk in body.iter_chunks(MIB):
                handle.write(chunk)

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, paths))
    published = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(get, paths))
    return published - started, time.perf_counter() - published


TOOLS: dict[str, Callable[[S3Server, Path, Path], tuple[float, float]]] = {
    "nimflow": run_nimflow,
    "awscli": run_awscli,
    "boto3 default": run_boto3_default,
    "best plain boto3": run_boto3_best,
}


def same_files(a: Path, b: Path) -> bool:
    """Byte-for-byte equality of two directories' files (a check of every tool's restore)."""
    import filecmp

    names = [p.relative_to(a).as_posix() for p in files_of(a)]
    # nimflow's restore also writes its manifest (that is what marks a local engine complete).
    if names != [p.relative_to(b).as_posix() for p in files_of(b) if p.name != "nimflow-manifest.json"]:
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def peak_rss_mib(server: S3Server, engine: Path, work: Path) -> float:
    """Peak RSS of a child process that publishes and restores ``engine`` with nimflow."""
    child = subprocess.run(
        [sys.executable, __file__, "--child", "--endpoint", server.url, "--engine", str(engine), "--work", str(work),
         "--access-key", server.access_key, "--secret-key", server.secret_key],
        check=True, capture_output=True, text=True,
    )
    return float(child.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def child_main(args: argparse.Namespace) -> None:
    os.environ.update(AWS_ACCESS_KEY_ID=args.access_key, AWS_SECRET_ACCESS_KEY=args.secret_key)
    server = S3Server(args.endpoint, args.access_key, args.secret_key, None)
    dest = Path(args.work) / "rss-restore"
    shutil.rmtree(dest, ignore_errors=True)
    run_nimflow(server, Path(args.engine), dest)
    shutil.rmtree(dest, ignore_errors=True)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=["s3rver", "moto"], default="s3rver")
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=str(REPO / ".testbed" / "bench"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--access-key", help=argparse.SUPPRESS)
    parser.add_argument("--secret-key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    engine = make_engine_dir(work, args.size_gib)
    total_mib = sum(p.stat().st_size for p in files_of(engine)) / MIB
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in TOOLS}
    with start_s3_server(args.server, work) as server:
        os.environ.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key)
        names = list(TOOLS)
        for round_no in range(args.rounds):
            order = names[round_no % len(names):] + names[:round_no % len(names)]
            for name in order:
                dest = work / "restore"
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir()
                up, down = TOOLS[name](server, engine, dest)
                if not same_files(engine, dest):
                    raise SystemExit(f"{name}: the restored directory differs from the original")
                times[name].append((up, down))
                print(f"round {round_no + 1} {name:17s} publish {total_mib / up:7.1f} MiB/s  restore {total_mib / down:7.1f} MiB/s",
                      flush=True)
                delete_prefix(plain_client(server, best=True), "")  # keep the server's memory/disk flat
        rss = peak_rss_mib(server, engine, work)
        server_version = server.version

    median = {name: (statistics.median(u for u, _ in t), statistics.median(d for _, d in t)) for name, t in times.items()}
    best_up, best_down = median["best plain boto3"]
    cli_up, cli_down = median["awscli"]
    print(f"\n{args.server} ({server_version}), {total_mib / 1024:.2f} GiB in {len(files_of(engine))} files, "
          f"{args.rounds} rounds, medians:\n")
    print("| tool | publish MiB/s | restore MiB/s | publish vs best boto3 | restore vs best boto3 |")
    print("|---|---|---|---|---|")
    for name, (up, down) in median.items():
        print(f"| {name} | {total_mib / up:.0f} | {total_mib / down:.0f} | {best_up / up:.2f}x | {best_down / down:.2f}x |")
    nim_up, nim_down = median["nimflow"]
    print(f"\nnimflow vs awscli: publish {cli_up / nim_up:.2f}x, restore {cli_down / nim_down:.2f}x")
    hashing = statistics.median(HASHING)
    print(f"nimflow publish: {nim_up:.2f} s, of which {hashing:.2f} s hashing every byte for the manifest "
          f"(publish without it: {best_up / (nim_up - hashing):.2f}x best boto3)")
    print(f"peak RSS of a process publishing and restoring it with nimflow: {rss:.0f} MiB")
    shutil.rmtree(work / "restore", ignore_errors=True)


if __name__ == "__main__":
    main()
