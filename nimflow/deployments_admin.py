"""``nimflow status`` and ``nimflow down``: the deployments on a Docker host, from their labels.

Everything is read from the containers themselves (labels ``nimflow.deployment``, ``nimflow.role``
and the provenance labels) and the route file the front proxy serves, so no spec is needed: an
operator can see and remove what runs on a host. Only labelled containers are ever removed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx

from nimflow.containers import CONTAINER_PORT, DEPLOYMENT_LABEL, LABEL_PREFIX, ROLE_LABEL, remove_container
from nimflow.errors import DeploymentError, NimflowError, translated_errors
from nimflow.front_proxy import ENDPOINT_LABEL, ROUTE_DIR_LABEL, read_route, upstream_of, url


@dataclass(frozen=True)
class DeploymentStatus:
    """One deployment as seen on the Docker host."""

    name: str
    stable_endpoint: str | None
    health: str
    active: str | None = None
    #: The active backend's Docker state (``running``, ``exited``...), None without one.
    active_state: str | None = None
    image: str | None = None
    served_model_name: str | None = None
    weights: str | None = None
    engine_key: str | None = None
    route_generation: int | None = None
    containers: list[str] = field(default_factory=list)


def ready_probe(endpoint: str, timeout: float = 3.0) -> str:
    """What ``GET /v1/health/ready`` says through ``endpoint``: ``ready``, ``not ready (HTTP n)`` or ``unreachable (...)``."""
    try:
        response = httpx.get(f"{endpoint}/v1/health/ready", timeout=timeout)
    except httpx.TransportError as exc:
        return f"unreachable ({type(exc).__name__})"
    return "ready" if response.status_code == 200 else f"not ready (HTTP {response.status_code})"


def _published(container: Any) -> str | None:
    bindings = ((container.attrs.get("NetworkSettings") or {}).get("Ports") or {}).get(CONTAINER_PORT) or []
    return url(bindings[0].get("HostIp") or "", int(bindings[0]["HostPort"])) if bindings else None


def _route_dir(containers: list[Any]) -> Path | None:
    for container in containers:
        if (directory := container.labels.get(ROUTE_DIR_LABEL)):
            return Path(directory)
    return None


def _status(name: str, containers: list[Any], probe: Callable[[str], str]) -> DeploymentStatus:
    front = next((c for c in containers if c.labels.get(ROLE_LABEL) == "front"), None)
    backends = [c for c in containers if c.labels.get(ROLE_LABEL) == "serve"]
    directory = _route_dir(containers)
    try:
        route = read_route(directory) if directory is not None else None
    except NimflowError:
        route = None
    active = next((c for c in backends if route is not None and route.upstream == upstream_of(c.name)), None)
    if front is None:  # a legacy deployment: its one running container publishes the port itself
        active = next((c for c in backends if c.status == "running"), None)
        endpoint = _published(active) if active is not None else None
    else:
        host, _, port = front.labels.get(ENDPOINT_LABEL, ":").rpartition(":")
        endpoint = url(host, int(port)) if port.isdigit() else None
    if endpoint is None:
        health = "no endpoint (no running container publishes one)"
    elif front is not None and front.status != "running":
        health = f"down (front proxy {front.status})"
    else:
        health = probe(endpoint)
    labels = active.labels if active is not None else {}
    return DeploymentStatus(
        name=name, stable_endpoint=endpoint, health=health,
        active=f"{active.name} ({active.id[:12]}, {active.status})" if active is not None else None,
        active_state=active.status if active is not None else None,
        image=(active.attrs.get("Config") or {}).get("Image") if active is not None else None,
        served_model_name=labels.get(f"{LABEL_PREFIX}served-model-name"),
        weights=labels.get(f"{LABEL_PREFIX}weights"), engine_key=labels.get(f"{LABEL_PREFIX}engine-key"),
        route_generation=route.generation if route is not None else None,
        containers=sorted(f"{c.name} ({c.status})" for c in containers),
    )


def deployment_status(client: docker.DockerClient, probe: Callable[[str], str] = ready_probe) -> list[DeploymentStatus]:
    """Every nimflow deployment on this Docker host, by name, with its health.

    Raises:
        ServiceUnavailable: the Docker daemon did not answer.
    """
    with translated_errors("listing nimflow containers"):
        containers = client.containers.list(all=True, filters={"label": DEPLOYMENT_LABEL})
        by_name: dict[str, list[Any]] = {}
        for container in containers:
            by_name.setdefault(container.labels[DEPLOYMENT_LABEL], []).append(container)
        return [_status(name, by_name[name], probe) for name in sorted(by_name)]


def render_status(statuses: list[DeploymentStatus]) -> str:
    """The text ``nimflow status`` prints: one block per deployment."""
    if not statuses:
        return "no nimflow deployments on this Docker host"
    blocks = []
    for s in statuses:
        rows = [
            ("endpoint", f"{s.stable_endpoint or '-'}  [{s.health}]"),
            ("model", s.served_model_name or "-"),
            ("weights", s.weights or "-"),
            ("engine key", s.engine_key or "-"),
            ("image", s.image or "-"),
            ("active", (s.active or "-") + (f"  (route generation {s.route_generation})" if s.route_generation else "")),
            ("containers", ", ".join(s.containers)),
        ]
        blocks.append("\n".join([s.name, *(f"  {key + ':':<12}{value}" for key, value in rows)]))
    return "\n\n".join(blocks)


@dataclass(frozen=True)
class TakenDown:
    """What ``nimflow down`` removed."""

    removed: list[str]
    route_dir: str | None


def take_down(client: docker.DockerClient, name: str) -> TakenDown:
    """Remove a deployment: its front proxy first (the endpoint stops), then its backends, then its route dir.

    Raises:
        DeploymentError: no container on this host is labelled as deployment ``name``.
        ServiceUnavailable: the Docker daemon did not answer.
    """
    with translated_errors(f"removing deployment {name}"):
        containers = client.containers.list(all=True, filters={"label": f"{DEPLOYMENT_LABEL}={name}"})
        if not containers:
            raise DeploymentError(f"no nimflow deployment named {name!r} on this Docker host; `nimflow status` lists them")
        directory = _route_dir(containers)
        ordered = sorted(containers, key=lambda c: c.labels.get(ROLE_LABEL) != "front")
        for container in ordered:
            remove_container(client, container.id, stop_timeout=30)
    removed_dir = None
    # Only a directory of the shape nimflow makes is removed: a label is not proof enough for rm -r.
    if directory is not None and directory.name == name and directory.parent.name == "nimflow-front" and directory.is_dir():
        shutil.rmtree(directory)
        removed_dir = str(directory)
    return TakenDown([c.name for c in ordered], removed_dir)
