"""The front proxy: the stable endpoint of a deployment, switched between backends by a route file.

One container per deployment, ``<container_name>-front``, publishes ``deploy.host:deploy.host_port``
and runs ``deployments/front-proxy/front_proxy.py`` (stdlib Python) on an image derived from the
deploy image (NIM images have ``python3``). It forwards each request to the backend named in
``route.json`` and reports what it applied, with the requests in flight per backend, in
``applied.json``. Both live on the host under ``<deploy.cache_dir>/nimflow-front/<name>/``::

    route/route.json      written by nimflow (temp + rename), mounted read-only
    state/applied.json    written by the proxy, mounted read-write

The proxy container is only replaced when the proxy program, where it listens, or its limits
change: a new NIM image must not drop the endpoint users call. The limits (the largest request
body, the client connections open at once) come from this host's settings
(``NIMFLOW_PROXY_MAX_BODY_MIB``, ``NIMFLOW_PROXY_MAX_CONNECTIONS``); past them the proxy answers
413 / 503. The route directory is mounted into the proxy only, never into a NIM container.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker

from nimflow.bundled import bundled_file
from nimflow.containers import (
    CONTAINER_PORT,
    DEPLOYMENT_LABEL,
    LABEL_PREFIX,
    NETWORK,
    ROLE_LABEL,
    describe_container,
    last_log_lines,
    owned_container,
    port_holders,
    remove_container,
    spec_hash,
    start_container,
)
from nimflow.derived_image import ensure_derived_image
from nimflow.errors import DeploymentError
from nimflow.settings import get_settings

#: The proxy program, copied into the proxy image.
PROXY_SCRIPT = bundled_file("front-proxy", "front_proxy.py")
PROXY_PATH_IN_IMAGE = "/opt/nimflow/front_proxy.py"
PROXY_REPOSITORY = "nimflow/front-proxy"
ROUTE_MOUNT = "/run/nimflow/route"
STATE_MOUNT = "/run/nimflow/state"
#: Bump when the way the proxy container is run changes (mounts, arguments): part of its hash.
PROXY_LAYOUT = "front-proxy/1"
PROXY_HASH_LABEL = f"{LABEL_PREFIX}proxy-hash"
ENDPOINT_LABEL = f"{LABEL_PREFIX}endpoint"
ROUTE_DIR_LABEL = f"{LABEL_PREFIX}route-dir"
#: The limits the front container was started with (``max_body_bytes=N,max_connections=M``).
LIMITS_LABEL = f"{LABEL_PREFIX}proxy-limits"
#: The port backends serve on inside their containers (NIM's default).
BACKEND_PORT = 8000


@dataclass(frozen=True)
class Route:
    """What nimflow asked the proxy to serve: a generation number and ``<backend name>:<port>``."""

    generation: int
    upstream: str


@dataclass(frozen=True)
class ProxyLimits:
    """What the front proxy accepts: past these it answers 413 (body too large) / 503 (too many connections)."""

    max_body_bytes: int
    max_connections: int

    @classmethod
    def from_settings(cls) -> ProxyLimits:
        """This host's limits (``NIMFLOW_PROXY_MAX_BODY_MIB``, ``NIMFLOW_PROXY_MAX_CONNECTIONS``).

        Raises:
            ConfigError: one of the variables is not a whole number in its range.
        """
        settings = get_settings()
        return cls(settings.proxy_max_body_mib << 20, settings.proxy_max_connections)

    @property
    def arguments(self) -> list[str]:
        """The proxy program's command-line options for these limits."""
        return ["--max-body-bytes", str(self.max_body_bytes), "--max-connections", str(self.max_connections)]

    @property
    def label(self) -> str:
        """The limits as recorded on the front container."""
        return f"max_body_bytes={self.max_body_bytes},max_connections={self.max_connections}"


@dataclass(frozen=True)
class Applied:
    """What the proxy reports it serves, and the requests in flight per upstream."""

    generation: int
    upstream: str | None
    inflight: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    refused_generation: int | None = None


#: Under ``deploy.cache_dir``: one directory per deployment with its route and proxy state.
ROUTE_ROOT = "nimflow-front"


def route_dir(cache_dir: str | Path, name: str) -> Path:
    """The host directory holding a deployment's route and proxy state."""
    return Path(cache_dir).resolve() / ROUTE_ROOT / name


def upstream_of(container_name: str) -> str:
    """The route's upstream for a backend container: its name on the nimflow network, and port."""
    return f"{container_name}:{BACKEND_PORT}"


def url(host: str, port: int) -> str:
    """``http://host:port`` to call from this machine (a wildcard bind address is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DeploymentError(f"{path} is unreadable ({exc}); remove it and run nimflow again") from None
    return data if isinstance(data, dict) else None


def read_route(directory: Path) -> Route | None:
    """The route nimflow last wrote for this deployment, or None."""
    data = _read_json(directory / "route" / "route.json")
    return None if data is None else Route(int(data["generation"]), str(data["upstream"]))


def read_applied(directory: Path) -> Applied | None:
    """What the proxy last reported, or None before it ever started."""
    data = _read_json(directory / "state" / "applied.json")
    if data is None:
        return None
    return Applied(int(data.get("generation") or 0), data.get("upstream"),
                   {str(k): int(v) for k, v in (data.get("inflight") or {}).items()}, data.get("error"),
                   data.get("refused_generation"))


def write_route(directory: Path, route: Route) -> None:
    """Write ``route.json`` atomically (temp file + rename: the proxy never reads half of it)."""
    (directory / "route").mkdir(parents=True, exist_ok=True)
    (directory / "state").mkdir(parents=True, exist_ok=True)
    target = directory / "route" / "route.json"
    tmp = target.with_name(f".route.json.{os.getpid()}")
    tmp.write_text(json.dumps({"generation": route.generation, "upstream": route.upstream}), encoding="utf-8")
    os.replace(tmp, target)


def wait_applied(directory: Path, generation: int, *, timeout: float = 60.0,
                 give_up: Callable[[], str | None] | None = None, poll: float = 0.1) -> Applied:
    """Wait until the proxy reports ``generation`` applied.

    Raises:
        DeploymentError: the proxy refused the route, ``give_up`` gave a reason (its container
            exited), or ``timeout`` passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        applied = read_applied(directory)
        if applied is not None and applied.generation >= generation:
            return applied
        if applied is not None and applied.error and applied.refused_generation == generation:
            raise DeploymentError(f"the front proxy refused route generation {generation}: {applied.error}")
        if give_up is not None and (reason := give_up()):
            raise DeploymentError(reason)
        if time.monotonic() >= deadline:
            seen = "nothing" if applied is None else f"generation {applied.generation}"
            raise DeploymentError(
                f"the front proxy did not apply route generation {generation} within {timeout:g}s "
                f"({directory / 'state' / 'applied.json'} reports {seen}); see `docker logs` of the front container"
            )
        time.sleep(poll)


def wait_drained(directory: Path, upstream: str, *, timeout: float, poll: float = 0.1) -> int:
    """Wait (at most ``timeout`` seconds) until no request to ``upstream`` is in flight.

    Returns:
        The requests still in flight when the wait ended (0: drained).
    """
    deadline = time.monotonic() + timeout
    while True:
        applied = read_applied(directory)
        left = 0 if applied is None else applied.inflight.get(upstream, 0)
        if left == 0 or time.monotonic() >= deadline:
            return left
        time.sleep(poll)


def proxy_hash() -> str:
    """The hash of the proxy program and of how its container is run (the front's identity)."""
    return spec_hash({"script": PROXY_SCRIPT.read_bytes().hex(), "layout": PROXY_LAYOUT})


def ensure_proxy_image(client: docker.DockerClient, base_image: str) -> str:
    """The proxy image: ``base_image`` plus the proxy program as its entrypoint (built once per content).

    Raises:
        DeploymentError: the base image is missing or the build failed.
    """
    tag, _built = ensure_derived_image(
        client, PROXY_REPOSITORY, base_image,
        files={PROXY_PATH_IN_IMAGE: PROXY_SCRIPT.read_bytes()},
        labels={PROXY_HASH_LABEL: proxy_hash()},
        entrypoint=["python3", PROXY_PATH_IN_IMAGE], cmd=[],
    )
    return tag


@dataclass(frozen=True)
class FrontSpec:
    """Where a deployment's front proxy listens and what it reads."""

    deployment: str
    container_name: str  # <deploy container_name>-front
    host: str
    port: int
    directory: Path
    limits: ProxyLimits = field(default_factory=ProxyLimits.from_settings)

    @property
    def endpoint_label(self) -> str:
        """``host:port`` as recorded on the front container."""
        return f"{self.host}:{self.port}"


def front_is_current(container: Any, front: FrontSpec) -> bool:
    """True when an existing front container runs this proxy program on this endpoint, route dir and limits."""
    labels = container.labels or {}
    return (labels.get(PROXY_HASH_LABEL) == proxy_hash() and labels.get(ENDPOINT_LABEL) == front.endpoint_label
            and labels.get(ROUTE_DIR_LABEL) == str(front.directory) and labels.get(LIMITS_LABEL) == front.limits.label)


def check_port_free(client: docker.DockerClient, front: FrontSpec, allowed: set[str]) -> None:
    """Refuse a port another container publishes (containers in ``allowed`` are this deployment's).

    Raises:
        DeploymentError: naming the container that holds the port and the fix.
    """
    for holder in port_holders(client, front.host, front.port):
        if holder.id not in allowed:
            raise DeploymentError(
                f"port {front.endpoint_label} (deploy.host_port) is published by container {describe_container(holder)}, "
                f"which is not part of nimflow deployment {front.deployment!r}; nimflow leaves it alone: stop it or "
                "change deploy.host_port"
            )


def _forget_applied(directory: Path) -> None:
    """Remove the report of a proxy process that is gone, before a new one starts.

    :func:`wait_applied` takes ``applied.json`` as "the endpoint serves this route". A report left by
    the previous process (which may even have applied the new route just before it was removed) would
    let a promotion return before the new process listens, and the first client after it be reset.
    """
    with contextlib.suppress(FileNotFoundError):
        (directory / "state" / "applied.json").unlink()


def ensure_front(client: docker.DockerClient, front: FrontSpec, base_image: str) -> str:
    """Make the front proxy container run: kept, started, created or (program changed) recreated.

    Call after the route file is written: a new proxy reads it before accepting connections.

    Returns:
        What was done: ``kept``, ``started``, ``created`` or ``recreated`` (the program, endpoint or
        limits changed).

    Raises:
        DeploymentError: a foreign container has the front's name or holds the port, or the
            container cannot be started.
    """
    existing = owned_container(client, front.container_name, front.deployment)
    if existing is not None and front_is_current(existing, front):
        if existing.status == "running":
            return "kept"
        _forget_applied(front.directory)
        existing.start()
        return "started"
    if existing is not None:
        # The proxy program, the endpoint or the route dir changed: the one moment the endpoint blinks.
        remove_container(client, existing.id, stop_timeout=10)
    _forget_applied(front.directory)
    check_port_free(client, front, allowed=set())
    image = ensure_proxy_image(client, base_image)
    (front.directory / "state").mkdir(parents=True, exist_ok=True)
    try:
        start_container(
            client, image, name=front.container_name,
            command=["--route-dir", ROUTE_MOUNT, "--state-dir", STATE_MOUNT, "--port", str(BACKEND_PORT),
                     *front.limits.arguments],
            # As the user nimflow runs as: the proxy needs no privileges, and applied.json stays
            # readable and removable by nimflow.
            user=f"{os.getuid()}:{os.getgid()}",
            volumes={str(front.directory / "route"): {"bind": ROUTE_MOUNT, "mode": "ro"},
                     str(front.directory / "state"): {"bind": STATE_MOUNT, "mode": "rw"}},
            ports={CONTAINER_PORT: (front.host, front.port)},
            network=NETWORK,
            # Back after a Docker restart or a reboot without a nimflow run, serving the last route.
            restart_policy={"Name": "unless-stopped", "MaximumRetryCount": 0},
            labels={DEPLOYMENT_LABEL: front.deployment, ROLE_LABEL: "front", PROXY_HASH_LABEL: proxy_hash(),
                    ENDPOINT_LABEL: front.endpoint_label, ROUTE_DIR_LABEL: str(front.directory),
                    LIMITS_LABEL: front.limits.label},
        )
    except docker.errors.APIError as exc:
        if "port is already allocated" in str(exc) or "address already in use" in str(exc):
            raise DeploymentError(
                f"port {front.endpoint_label} (deploy.host_port) is already in use on the Docker host by a process "
                "outside nimflow; free it or change deploy.host_port"
            ) from None
        raise
    return "created" if existing is None else "recreated"


def front_exit_check(client: docker.DockerClient, front: FrontSpec) -> Callable[[], str | None]:
    """A ``give_up`` check for :func:`wait_applied`: says why once the front container stopped."""
    def exited() -> str | None:
        container = client.containers.get(front.container_name)
        if container.status in ("running", "created", "restarting"):
            return None
        return (f"front proxy container {front.container_name} {container.status} "
                f"(its image must have python3 on PATH); last log lines:\n{last_log_lines(client, container.id)}")
    return exited
