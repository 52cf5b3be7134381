"""Docker engine access for builds and deployments (docker SDK).

Functions take and return ids and plain values; containers and clients never leave this module's
callers' stack frames, so task results stay small and serialisable.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import docker
from docker.types import DeviceRequest

from nimflow.errors import DeploymentError

#: Label keys nimflow puts on every container it creates.
LABEL_PREFIX = "nimflow."
CONTAINER_PORT = "8000/tcp"


def docker_client() -> docker.DockerClient:
    """A client for the Docker engine named by ``DOCKER_HOST`` (default: the local socket)."""
    return docker.from_env(timeout=120)


def device_requests(gpus: list[int] | Literal["all"] | None) -> list[DeviceRequest]:
    """Docker GPU requests: ``[4, 5]`` is the CLI's ``--gpus '"device=4,5"'``; None requests none."""
    if gpus is None:
        return []
    if gpus == "all":
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return [DeviceRequest(device_ids=[str(g) for g in gpus], capabilities=[["gpu"]])]


def image_id(client: docker.DockerClient, image: str) -> str:
    """The local id (content digest) of an image; a tag alone does not pin what runs.

    Raises:
        DeploymentError: the image is not on this host (nimflow does not pull: log in and
            ``docker pull`` it, or build it, first).
    """
    try:
        return client.images.get(image).id
    except docker.errors.ImageNotFound:
        raise DeploymentError(
            f"image {image!r} is not on this Docker host; pull it first (NGC: docker login nvcr.io "
            "with username $oauthtoken and your NGC_API_KEY) or build it"
        ) from None


def spec_hash(settings: Mapping[str, Any]) -> str:
    """A short hash of a container's settings, stored as a label to recognise identical ones."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_container(client: docker.DockerClient, name: str) -> Any | None:
    """The container with exactly this name, or None."""
    try:
        return client.containers.get(name)
    except docker.errors.NotFound:
        return None


def remove_container(client: docker.DockerClient, name_or_id: str, stop_timeout: int = 30) -> None:
    """Stop (gracefully, then kill) and remove a container; a missing one is fine."""
    container = find_container(client, name_or_id)
    if container is None:
        return
    if container.status == "running":
        container.stop(timeout=stop_timeout)
    container.remove(force=True)


def published_port(client: docker.DockerClient, container_id: str, container_port: str = CONTAINER_PORT) -> int:
    """The host port Docker published for ``container_port`` (for ports chosen by Docker)."""
    container = client.containers.get(container_id)
    for _ in range(50):
        bindings = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get(container_port)
        if bindings:
            return int(bindings[0]["HostPort"])
        time.sleep(0.1)
        container.reload()
    raise DeploymentError(f"container {container.name}: port {container_port} was not published")


def container_state(client: docker.DockerClient, container_id: str) -> tuple[str, int | None]:
    """(status, exit code) of a container; exit code is None while it runs."""
    container = client.containers.get(container_id)
    state = container.attrs.get("State", {})
    running = container.status in ("running", "created", "restarting")
    return container.status, None if running else state.get("ExitCode")


def exit_watch(client: docker.DockerClient, container_id: str, name: str) -> Callable[[], str | None]:
    """A check for ``wait_until_ready``'s ``give_up``: says why, once the container has exited."""

    def exited() -> str | None:
        status, code = container_state(client, container_id)
        return None if code is None else f"container {name} {status} with exit code {code}"

    return exited


def last_log_lines(client: docker.DockerClient, container_id: str, lines: int = 20) -> str:
    """The last lines a container printed (stdout and stderr), for error messages."""
    try:
        raw = client.containers.get(container_id).logs(tail=lines)
    except docker.errors.NotFound:
        return "(container is gone; no logs)"
    text = raw.decode("utf-8", "replace").rstrip()
    return text or "(no output)"
