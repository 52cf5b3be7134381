"""``nimflow testbed up|down``: the whole local test bed as detached processes, for the demo.

State lives in one directory (default ``.testbed/``): server logs, ``services.json`` (pids and
URLs) and ``env.sh`` with the variables a shell or the flow needs (``HF_ENDPOINT``,
``AWS_ENDPOINT_URL``, test S3 credentials, ``PREFECT_API_URL``).
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from pathlib import Path

from nimflow.testbed.docker_engine import ensure_docker_engine
from nimflow.testbed.hub_server import publish
from nimflow.testbed.nim_image import STANDIN_IMAGE, build_standin_image
from nimflow.testbed.services import (
    S3_TEST_CREDENTIALS,
    Service,
    create_bucket,
    start_hub,
    start_moto,
    start_prefect_server,
    wait_http,
)
from nimflow.testbed.tiny_model import write_tiny_llama

DEMO_REPO = "nimflow-demo/tiny-llama"
DEMO_BUCKET = "nimflow-engines"


def _load(state_dir: Path) -> list[Service]:
    try:
        raw = json.loads((state_dir / "services.json").read_text())
    except (OSError, ValueError):
        return []
    return [Service(s["name"], s["url"], s["pid"], Path(s["log_path"])) for s in raw]


def _healthy(services: list[Service]) -> bool:
    names = {s.name for s in services}
    if names != {"s3", "hub", "prefect"} or not all(s.alive() for s in services):
        return False
    try:
        for s in services:
            wait_http(s.url + ("/health" if s.name == "prefect" else "/"), 3)
    except Exception:  # noqa: BLE001 - any failure means "start afresh"
        return False
    return True


def environment(services: list[Service]) -> dict[str, str]:
    """The variables that point clients at the test bed."""
    by_name = {s.name: s.url for s in services}
    return {
        "HF_ENDPOINT": by_name["hub"],
        "AWS_ENDPOINT_URL": by_name["s3"],
        **S3_TEST_CREDENTIALS,
        "PREFECT_API_URL": by_name["prefect"],
    }


def up(state_dir: Path) -> dict[str, str]:
    """Start (or reuse) the test bed; return its environment variables.

    Ensures the Docker engine, builds the NIM stand-in image (cached by tag), starts S3, the hub
    and a Prefect server, creates the engine bucket and publishes the demo model.
    """
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    build_standin_image(ensure_docker_engine(), STANDIN_IMAGE)

    services = _load(state_dir)
    if not _healthy(services):
        for service in services:
            service.stop()
        logs = state_dir / "logs"
        services = [
            start_moto(logs),
            start_hub(state_dir / "hub", logs),
            start_prefect_server(state_dir / "prefect", logs),
        ]
        (state_dir / "services.json").write_text(
            json.dumps([{**s.__dict__, "log_path": str(s.log_path)} for s in services], indent=2)
        )
    env = environment(services)
    create_bucket(env["AWS_ENDPOINT_URL"], DEMO_BUCKET)
    with tempfile.TemporaryDirectory() as tmp:
        # Same seed every time: the same content republished is the same commit (nothing new to fetch).
        publish(state_dir / "hub", DEMO_REPO, write_tiny_llama(Path(tmp) / "model", seed=0))
    (state_dir / "env.sh").write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    return env


def down(state_dir: Path) -> int:
    """Stop the test bed's servers; return how many were stopped. Containers are left alone."""
    services = _load(state_dir.resolve())
    for service in services:
        service.stop()
    (state_dir / "services.json").unlink(missing_ok=True)
    return len(services)


def activate(env: dict[str, str]) -> None:
    """Point this process at the test bed (before the flow's clients are created)."""
    os.environ.update(env)
