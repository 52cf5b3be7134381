"""Docker engine access for builds and deployments (docker SDK).

Functions take and return ids and plain values; containers and clients never leave this module's
callers' stack frames, so task results stay small and serialisable.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import docker
from docker.types import DeviceRequest

from nimflow.errors import DeploymentError, ServiceUnavailable, is_transient, translated_errors
from nimflow.settings import get_settings

logger = logging.getLogger(__name__)

#: Label keys nimflow puts on every container it creates.
LABEL_PREFIX = "nimflow."
CONTAINER_PORT = "8000/tcp"


#: This thread's client and what it was made for; see :func:`docker_client`.
_CLIENTS = threading.local()


def docker_client() -> docker.DockerClient:
    """This thread's client for the Docker engine named by ``DOCKER_HOST`` (default: the local socket).

    Tasks, rollouts and the CLI ask for a client on every call, and each new client asks the
    daemon for its API version and opens connections of its own that stay open while any caller
    holds it (an exit watch, a helper's frame). So one client per thread is made and reused, and
    closed when the Docker environment it was made for changes: calls do not pile up clients or
    connections. Per thread, because the docker SDK does not promise that a client may be shared
    across threads. Each call pings the daemon on the client's open connection (cheaper than the
    version request of a new client), so a daemon that stopped answering is still reported here,
    with the fix; a connection the daemon dropped (a restart) is reopened. Callers must not close it.

    Raises:
        ServiceUnavailable: the daemon does not answer (naming where nimflow looked and how to start it).
    """
    made_for = (os.getpid(), get_settings().docker_env)  # a forked child must not share the parent's sockets
    held: tuple[Any, docker.DockerClient] | None = getattr(_CLIENTS, "held", None)
    if held is not None and held[0] == made_for:
        try:
            held[1].ping()
            return held[1]
        except Exception:  # noqa: BLE001 - any failure: make a new client below, which reports a silent daemon
            pass
    try:
        client = docker.from_env(timeout=120)
    except docker.errors.DockerException as exc:
        raise ServiceUnavailable(
            f"the Docker daemon at {get_settings().docker_host} does not answer ({exc}); "
            "start it (`systemctl start docker`, or `dockerd &`) "
            "or point DOCKER_HOST at a running one"
        ) from None
    if held is not None and held[0][0] == made_for[0]:
        held[1].close()  # made for another daemon or TLS setting, or broken: it is not handed out again
    _CLIENTS.held = (made_for, client)
    return client


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


class DaemonSilence:
    """How long the Docker daemon has failed to answer in a row, for waits that ride out a restart.

    The first silence starts the clock; one that lasts longer than ``grace_seconds`` is raised as
    :class:`ServiceUnavailable` naming ``what`` was being waited for.
    """

    def __init__(self, grace_seconds: float, what: str) -> None:
        self.grace_seconds = grace_seconds
        self.what = what
        self._since: float | None = None

    def heard(self) -> None:
        """The daemon answered: the silence is over."""
        self._since = None

    def silent(self, exc: BaseException) -> None:
        """The daemon did not answer with ``exc``; re-raise what is not a daemon fault, or a silence too long."""
        if not is_transient(exc):
            raise exc
        if self._since is None:
            self._since = time.monotonic()
        elif time.monotonic() - self._since > self.grace_seconds:
            raise ServiceUnavailable(
                f"the Docker daemon has not answered for {self.grace_seconds:g}s while {self.what} "
                f"({type(exc).__name__}); check `systemctl status docker`"
            ) from exc


@contextlib.contextmanager
def daemon_errors(action: str) -> Iterator[None]:
    """:func:`~nimflow.errors.translated_errors` for Docker calls: a daemon that did not answer is named.

    A Docker call that fails because the daemon is down or restarting raises a requests/urllib3
    connection error whose text (``Connection aborted``, ``FileNotFoundError``) does not say which
    service failed; the message then names the daemon and where nimflow looked for it.

    Raises:
        ServiceUnavailable: the daemon did not answer (transient: the task retries).
        NimflowError: any other fault, as :func:`~nimflow.errors.translated_errors` classifies it.
    """
    try:
        with translated_errors(action):
            yield
    except ServiceUnavailable as exc:
        cause = exc.__cause__
        # A 5xx from the daemon names itself (``500 Server Error for http+docker://...``); a
        # connection that failed does not.
        if cause is None or isinstance(cause, docker.errors.APIError) or not type(cause).__module__.startswith(
            ("docker", "requests", "urllib3")
        ):
            raise
        raise ServiceUnavailable(
            f"{action}: the Docker daemon at {get_settings().docker_host} did not answer ({type(cause).__name__}: "
            f"{str(cause)[:300]}); if it is restarting, run nimflow again once `docker info` answers, else start it "
            "(`systemctl start docker`)"
        ) from cause


def exit_watch(
    client: docker.DockerClient, container_id: str, name: str, *, daemon_grace_seconds: float = 60.0
) -> Callable[[], str | None]:
    """A check for ``wait_until_ready``'s ``give_up``: says why, once the container has exited.

    A Docker daemon that briefly stops answering is not a reason to give up on the container (a
    JIT build keeps running through a daemon restart with live-restore); one silent for
    ``daemon_grace_seconds`` is.

    Raises:
        ServiceUnavailable: (from the returned check) the daemon stayed silent too long.
    """
    silence = DaemonSilence(daemon_grace_seconds, f"watching container {name}")

    def exited() -> str | None:
        try:
            status, code = container_state(client, container_id)
        except Exception as exc:  # noqa: BLE001 - DaemonSilence classifies it
            silence.silent(exc)
            return None
        silence.heard()
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


def remove_container_quietly(client: docker.DockerClient, name_or_id: str, stop_timeout: int = 10) -> None:
    """:func:`remove_container` for clean-up paths: a failure is logged, never raised over the real error."""
    try:
        remove_container(client, name_or_id, stop_timeout=stop_timeout)
    except Exception as exc:  # noqa: BLE001 - clean-up must not hide the error being handled
        logger.warning("could not remove container %s (%s: %s); remove it by hand", name_or_id, type(exc).__name__, exc)


def start_container(client: docker.DockerClient, image: str, *, name: str,
                    before_start: Callable[[], None] | None = None, **options: Any) -> str:
    """Create and start a detached container; return its id.

    ``before_start`` runs once the container exists (with its labels) and before it starts: a
    recreate stops the old backend there, so a run killed at any moment of the switch leaves a
    labelled candidate that names what it stopped. The daemon can create a container and then fail
    to start it (a port taken, no GPU runtime): that husk is removed here before the error
    propagates (``before_start``'s too), so nothing is left behind.
    """
    container = client.containers.create(image, name=name, detach=True, **options)
    try:
        if before_start is not None:
            before_start()
        container.start()
    except BaseException:  # a cancellation (SIGTERM) mid-start too: no husk is left behind
        remove_container_quietly(client, container.id)
        raise
    return str(container.id)


@dataclass(frozen=True)
class ContainerExit:
    """How a one-shot container ended."""

    exit_code: int | None = None  # None: the deadline passed first
    logs: str = ""

    @property
    def timed_out(self) -> bool:
        """True when the container was still running at the deadline."""
        return self.exit_code is None


def wait_for_exit(
    client: Any, container_id: str, deadline_seconds: float, *, daemon_grace_seconds: float = 60.0, poll_seconds: float = 30.0
) -> int | None:
    """Wait for a container to exit; return its exit code, or None once the deadline has passed.

    A Docker daemon that stops answering (a restart, a hiccup) is not a timeout: the wait goes on
    for the same container once the daemon is back, so a long build is neither lost nor blamed.

    Raises:
        ServiceUnavailable: the daemon did not answer for ``daemon_grace_seconds`` in a row.
    """
    deadline = time.monotonic() + deadline_seconds
    silence = DaemonSilence(daemon_grace_seconds, f"waiting for container {container_id[:12]}")
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            return int(client.api.wait(container_id, timeout=max(1, min(remaining, poll_seconds)))["StatusCode"])
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc):
                raise
            # The docker SDK reports its own read timeout (container still running) like a lost
            # daemon; asking for the container's state tells the two apart.
            try:
                state = client.api.inspect_container(container_id)["State"]
            except Exception as probe_exc:  # noqa: BLE001 - DaemonSilence classifies it
                silence.silent(probe_exc)
                time.sleep(min(2.0, max(0.05, deadline - time.monotonic())))
                continue
            silence.heard()
            if not state.get("Running") and state.get("Status") not in ("created", "restarting"):
                return int(state.get("ExitCode", -1))
    return None


@contextlib.contextmanager
def following_logs(client: docker.DockerClient, container_id: str, on_line: Callable[[str], None] | None) -> Iterator[None]:
    """Pass each line the container prints (stdout and stderr) to ``on_line``, from a thread, while the block runs.

    For watching progress only: a stream the daemon drops, or an ``on_line`` that raises, ends the
    following and nothing else. Carriage returns split lines too, so a progress bar's updates arrive
    one by one. The thread ends with the container's output; the block does not wait long for it.
    """
    if on_line is None:
        yield
        return

    def follow() -> None:
        pending = ""
        try:
            for chunk in client.api.logs(container_id, stream=True, follow=True):
                pending += chunk.decode("utf-8", errors="replace")
                *lines, pending = pending.replace("\r", "\n").split("\n")
                for line in lines:
                    if line:
                        on_line(line)
            if pending:
                on_line(pending)
        except Exception as exc:  # noqa: BLE001 - progress is for watching; the build goes on
            logger.debug("stopped following the logs of %s: %s", container_id[:12], type(exc).__name__)

    # A copy of this context: the callback may log through the Prefect run that started the container.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(follow,), name=f"nimflow-logs-{container_id[:12]}",
                              daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(timeout=5)


def run_to_exit(
    client: docker.DockerClient,
    image: str,
    command: list[str],
    *,
    name: str,
    deadline_seconds: float,
    log_lines: int = 40,
    on_log_line: Callable[[str], None] | None = None,
    **options: Any,
) -> ContainerExit:
    """Run a one-shot container to its end and return its exit code and last log lines.

    The container is removed on every path (success, failure, deadline, a daemon error), so a
    failed build or probe leaves nothing behind.

    Args:
        on_log_line: called with each line the container prints while it runs (see :func:`following_logs`).
    """
    try:
        container_id = start_container(client, image, name=name, command=command, **options)
        with following_logs(client, container_id, on_log_line):
            code = wait_for_exit(client, container_id, deadline_seconds)
        return ContainerExit(exit_code=code, logs=last_log_lines(client, container_id, log_lines))
    finally:
        remove_container_quietly(client, name)


# --- ownership, networks and restarts (rollouts) -------------------------------------------------

#: The user-defined bridge network every front proxy and backend joins: containers reach each
#: other by name (Docker's DNS), whatever addresses a restart gives them.
NETWORK = "nimflow"
DEPLOYMENT_LABEL = f"{LABEL_PREFIX}deployment"
ROLE_LABEL = f"{LABEL_PREFIX}role"


def describe_container(container: Any) -> str:
    """``name (id 0123456789ab, image repo:tag)`` for error messages."""
    image = (container.attrs.get("Config") or {}).get("Image") or "?"
    return f"{container.name} (id {container.id[:12]}, image {image})"


def owned_by(container: Any, deployment: str) -> bool:
    """True when ``container`` carries ``nimflow.deployment=<deployment>``: only those are nimflow's to stop."""
    return (container.labels or {}).get(DEPLOYMENT_LABEL) == deployment


def owned_container(client: docker.DockerClient, name: str, deployment: str) -> Any | None:
    """The container named ``name`` if it belongs to ``deployment``; None if there is none.

    Raises:
        DeploymentError: a container of that name exists and is not this deployment's (naming it
            and the fix); nimflow never stops or removes it.
    """
    container = find_container(client, name)
    if container is None or owned_by(container, deployment):
        return container
    raise DeploymentError(
        f"container {describe_container(container)} is not part of nimflow deployment {deployment!r} (no label "
        f"{DEPLOYMENT_LABEL}={deployment}) but has a name this deployment needs; nimflow leaves it alone: remove or "
        f"rename it (`docker rm -f {container.name}`) or set deploy.container_name to another name"
    )


def port_holders(client: docker.DockerClient, host: str, port: int) -> list[Any]:
    """Running containers that publish host port ``port`` on ``host`` (or on every address)."""
    wildcard = ("", "0.0.0.0", "::")
    holders = []
    for container in client.containers.list(filters={"publish": str(port)}):
        for bindings in ((container.attrs.get("NetworkSettings") or {}).get("Ports") or {}).values():
            if any(str(b.get("HostPort")) == str(port) and (b.get("HostIp") in wildcard or host in wildcard or b.get("HostIp") == host)
                   for b in bindings or []):
                holders.append(container)
                break
    return holders


def ensure_network(client: docker.DockerClient, name: str = NETWORK) -> str:
    """The id of the user-defined bridge network ``name``, created (labelled) when missing.

    Raises:
        DeploymentError: the network cannot be created.
    """
    def existing() -> str | None:
        found = [n for n in client.networks.list(names=[name]) if n.name == name]  # `names` also matches prefixes
        return str(found[0].id) if found else None

    if (network_id := existing()) is not None:
        return network_id
    try:
        return str(client.networks.create(name, driver="bridge", check_duplicate=True,
                                          labels={f"{LABEL_PREFIX}managed": "true"}).id)
    except docker.errors.APIError:
        if (network_id := existing()) is not None:  # another run created it meanwhile
            return network_id
        raise


def set_restart_policy(client: docker.DockerClient, container_id: str, policy: str) -> None:
    """Change a container's restart policy (``no``, ``unless-stopped``...) in place."""
    client.containers.get(container_id).update(restart_policy={"Name": policy, "MaximumRetryCount": 0})


def start_existing(client: docker.DockerClient, container_id: str) -> None:
    """``docker start`` a stopped container (a running one is left as it is)."""
    container = client.containers.get(container_id)
    if container.status != "running":
        container.start()
