"""Start and stop the test bed's servers as real processes on loopback.

Used by the tests (per session, on free ports) and by ``nimflow testbed up`` / ``make demo``
(detached, recorded in a state directory). Each server is the real thing: moto's S3 server,
a Hugging Face Hub endpoint, and ``prefect server start``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from nimflow.testbed import TestbedError

#: Credentials moto accepts; nothing secret about them.
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """A server process and the URL it answers on."""

    name: str
    url: str
    pid: int
    log_path: Path

    def alive(self) -> bool:
        """True while the process exists."""
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` (the whole process group)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except OSError:
                return
            deadline = time.monotonic() + (timeout if sig != signal.SIGKILL else 2)
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:
                        return
                except ChildProcessError:  # not our child (started by another process)
                    if not self.alive():
                        return
                time.sleep(0.1)


def _bin(name: str) -> str:
    """An executable next to this Python (the venv's), else on PATH."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise TestbedError(f"{name} is not installed; run `pip install -e '.[testbed]'`")
    return found


def _spawn(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: stop() takes its children too
        )
    return process.pid


def wait_http(url: str, timeout: float, service: Service | None = None) -> None:
    """Poll ``url`` until it answers below 500.

    Raises:
        TestbedError: the process died or the timeout passed (with the log tail).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service is not None and not service.alive():
            break
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    tail = service.log_path.read_text(errors="replace")[-2000:] if service else ""
    raise TestbedError(f"{url} did not come up within {timeout:g}s\n{tail}")


def start_moto(log_dir: Path, port: int | None = None) -> Service:
    """moto's S3 server on loopback (the code sees only an endpoint URL, as with MinIO or AWS)."""
    port = port or free_port()
    log = log_dir / "moto.log"
    pid = _spawn("moto", [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)], log)
    service = Service("s3", f"http://127.0.0.1:{port}", pid, log)
    wait_http(f"{service.url}/moto-api/", 30, service)
    return service


def start_hub(root: Path, log_dir: Path, port: int | None = None) -> Service:
    """The local Hugging Face Hub endpoint serving repos under ``root``."""
    port = port or free_port()
    log = log_dir / "hub.log"
    argv = [sys.executable, "-m", "nimflow.testbed.hub_server", "--root", str(root), "--host", "127.0.0.1", "--port", str(port)]
    pid = _spawn("hub", argv, log)
    service = Service("hub", f"http://127.0.0.1:{port}", pid, log)
    wait_http(f"{service.url}/api/models/none/none", 30, service)
    return service


def start_prefect_server(home: Path, log_dir: Path, port: int | None = None) -> Service:
    """``prefect server start`` on loopback with its own SQLite database under ``home``."""
    port = port or free_port()
    log = log_dir / "prefect.log"
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": os.environ.get("PREFECT_SERVER_UI_ENABLED", "true"),
        "PREFECT_API_URL": "",
    }
    argv = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    pid = _spawn("prefect", argv, log, env)
    service = Service("prefect", f"http://127.0.0.1:{port}/api", pid, log)
    wait_http(f"{service.url}/health", 90, service)
    return service


def create_bucket(endpoint_url: str, bucket: str) -> None:
    """Create an S3 bucket on the test server (idempotent)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
