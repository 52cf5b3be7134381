"""S3 servers for the benchmarks: s3rver (fast, npm) and moto (the test bed's, faithful), on loopback."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import boto3

BUCKET = "nimflow-bench"
REPO = Path(__file__).resolve().parents[1]
S3RVER_DIR = REPO / ".testbed" / "s3rver"  # `npm install s3rver` goes here (ignored by git)


@dataclass
class S3Server:
    """Where a benchmark's S3 server listens and how to sign in."""

    url: str
    access_key: str
    secret_key: str
    version: str | None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited at start (code {process.returncode})")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on port {port} within 60 s")


def _s3rver_command(data: Path, port: int) -> list[str]:
    script = S3RVER_DIR / "node_modules" / "s3rver" / "bin" / "s3rver.js"
    if not script.exists():
        S3RVER_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "s3rver"], cwd=S3RVER_DIR, check=True)
    # Without the legacy provider every paginated listing answers 500 on Node 20.
    return ["node", "--openssl-legacy-provider", str(script), "-d", str(data), "-a", "127.0.0.1", "-p", str(port), "--silent"]


@contextlib.contextmanager
def start_s3_server(kind: str, work: Path) -> Iterator[S3Server]:
    """Start ``kind`` (``s3rver`` or ``moto``) with an empty bucket; stop it and remove its data after."""
    port = _free_port()
    data = work / f"{kind}-data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    if kind == "s3rver":
        command = _s3rver_command(data, port)
        keys = ("S3RVER", "S3RVER")
        package = json.loads((S3RVER_DIR / "node_modules" / "s3rver" / "package.json").read_text())
        server_version = f"s3rver {package['version']}"
    else:
        command = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)]
        keys = ("bench", "bench")
        server_version = f"moto {version('moto')}"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, process, kind)
        server = S3Server(f"http://127.0.0.1:{port}", *keys, server_version)
        boto3.client("s3", endpoint_url=server.url, aws_access_key_id=keys[0], aws_secret_access_key=keys[1],
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(data, ignore_errors=True)
