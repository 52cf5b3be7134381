"""Rollouts: start a new NIM container, let it be verified, then switch the stable endpoint to it.

A deployment ``<name>`` with container name ``cn`` (``deploy.container_name``, default
``nimflow-<name>``) is made of, all labelled ``nimflow.deployment=<name>`` and on network ``nimflow``:

* ``cn-front``: the front proxy (:mod:`nimflow.front_proxy`) on ``deploy.host:deploy.host_port``;
* ``cn-blue`` / ``cn-green``: backends; the route names the active one, a rollout's candidate takes
  the other colour. Each publishes port 8000 on a Docker-chosen host port, for verification.
* ``cn`` (legacy, from nimflow before rollouts): served ``deploy.host_port`` itself. It counts as
  the active backend and is retired by the first promotion.

The order (the flow's): :func:`start_candidate` -> verify the candidate's own endpoint ->
:func:`promote` (switch, drain, retire the old) or :func:`abort` (remove the candidate; recreate:
start the old one again). A candidate that fails verification never takes traffic.

nimflow only stops or removes containers labelled with the deployment's name; anything else with
one of these names, or holding the port, is reported and left alone.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import docker

from nimflow.containers import (
    CONTAINER_PORT,
    DEPLOYMENT_LABEL,
    LABEL_PREFIX,
    NETWORK,
    ROLE_LABEL,
    daemon_errors,
    describe_container,
    device_requests,
    docker_client,
    ensure_network,
    exit_watch,
    find_container,
    image_id,
    last_log_lines,
    owned_by,
    owned_container,
    port_holders,
    published_port,
    remove_container,
    set_restart_policy,
    spec_hash,
    start_container,
    start_existing,
)
from nimflow.engine_store import read_local_manifest
from nimflow.errors import DeploymentError, EngineStoreError, NimflowError
from nimflow.front_proxy import (
    ENDPOINT_LABEL,
    ROUTE_DIR_LABEL,
    ROUTE_ROOT,
    FrontSpec,
    Route,
    check_port_free,
    ensure_front,
    ensure_proxy_image,
    front_exit_check,
    read_route,
    route_dir,
    upstream_of,
    url,
    wait_applied,
    wait_drained,
    write_route,
)
from nimflow.gpu_identity import check_serving_target
from nimflow.nim_api import list_models, wait_until_ready
from nimflow.records import Deployment, Engine, ServingImage
from nimflow.run_owner import run_labels
from nimflow.settings import get_settings
from nimflow.spec import NIM_CACHE_MOUNT, DeploySpec, HostingSpec, RolloutSpec

SLOTS = ("blue", "green")
SLOT_LABEL = f"{LABEL_PREFIX}slot"
SPEC_HASH_LABEL = f"{LABEL_PREFIX}spec-hash"
SERVED_LABEL = f"{LABEL_PREFIX}served-model-name"
GPUS_LABEL = f"{LABEL_PREFIX}gpus"
MODEL_ROOT_LABEL = f"{LABEL_PREFIX}model-root"
CONTAINER_NAME_LABEL = f"{LABEL_PREFIX}container-name"
STRATEGY_LABEL = f"{LABEL_PREFIX}strategy"
#: On a recreate candidate: the id of the backend its run stopped for it.
STOPPED_BACKEND_LABEL = f"{LABEL_PREFIX}stopped-backend"
#: Where a model outside the cache dir is mounted (read-only).
EXTRA_MODEL_MOUNT = "/opt/nim/model"
#: Where LoRA adapters outside the cache dir are mounted (read-only).
EXTRA_ADAPTERS_MOUNT = "/opt/nim/loras"
#: How long the old container may take to stop gracefully once drained.
STOP_TIMEOUT = 30


# --- names ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    """The container names of one deployment."""

    deployment: str
    container_name: str

    @property
    def front(self) -> str:
        """The front proxy's container name."""
        return f"{self.container_name}-front"

    def backend(self, slot: str) -> str:
        """The backend container name of a colour."""
        return f"{self.container_name}-{slot}"

    @property
    def backends(self) -> list[str]:
        """Every name a backend of this deployment can have, the legacy one last."""
        return [self.backend(slot) for slot in SLOTS] + [self.container_name]


def claim_names(client: docker.DockerClient, names: Names) -> dict[str, Any]:
    """This deployment's existing containers by name.

    Raises:
        DeploymentError: a container with one of the names is not this deployment's. The legacy
            name is exempt: nimflow never creates it any more, so a foreign one does not collide.
    """
    found = {}
    for name in [names.front, names.backend("blue"), names.backend("green")]:
        container = owned_container(client, name, names.deployment)
        if container is not None:
            found[name] = container
    legacy = find_container(client, names.container_name)
    if legacy is not None and owned_by(legacy, names.deployment) and legacy.labels.get(ROLE_LABEL) == "serve":
        found[names.container_name] = legacy
    return found


def active_backend(client: docker.DockerClient, names: Names, route: Route | None) -> Any | None:
    """The backend serving now: the one the route names, else a legacy container of ours."""
    candidates = [c for c in names.backends if route is not None and route.upstream == upstream_of(c)]
    candidates.append(names.container_name)
    for name in candidates:
        container = find_container(client, name)
        if container is not None and owned_by(container, names.deployment) and container.labels.get(ROLE_LABEL) == "serve":
            return container
    return None


# --- the serving container's configuration --------------------------------------------------------

#: Under ``deploy.cache_dir``: one directory per deployment, the NIM containers' own writable cache.
NIM_CACHE_ROOT = "nimflow-nim"
#: Bump when what a backend is given changes (mounts, secrets): part of its identity, so a serving
#: backend started the old way is replaced by the next rollout.
SERVING_LAYOUT = ("serving/3: served directories read-only, a cache of its own, secrets only to download, "
                  "a non-root user, environment per NIM mode")
#: Late NIM 1.x: "The default PyTorch TRT-LLM backend does not support fine-tuned models" (NIM docs,
#: ft-support.html); these select the TensorRT-LLM backend that loads them. Set on the serving
#: container of a custom engine or fine-tuned checkpoint on 1.x; ``deploy.env`` may override them.
LEGACY_TRTLLM_ENV = {"NIM_USE_TRTLLM_LEGACY_BACKEND": "1", "NIM_DISABLE_TRTLLM_PYTORCH_RT": "1"}
#: NIM 2.x: vLLM-style options, given as CLI-style arguments ("NIM passes the following LoRA-related
#: flags to vLLM: --enable-lora, --max-loras, --max-cpu-loras, --max-lora-rank", NIM 2.x docs,
#: advanced-use-cases/finetune-lora.html; precedence: CLI > NIM_PASSTHROUGH_ARGS > NIM_* env,
#: reference/advanced-configuration.html). 1.x keeps NIM_MAX_LORA_RANK.
PASSTHROUGH_ARGS = "NIM_PASSTHROUGH_ARGS"
#: The secrets a serving NIM is given, by where its model comes from. Only a NIM that downloads
#: what it serves needs any: guide §1 (``manifest``: a model a manifest's profile names) fetches the
#: profile's files itself, from NGC (NGC_API_KEY) or, for an ``hf://`` profile, the Hugging Face Hub
#: (HF_TOKEN). Every other mode (``directory``) serves what nimflow downloaded, staged, built or
#: restored on this host: a checkpoint, fine-tuned weights, an engine, adapters. NIM 2.x included:
#: nimflow gives NIM_MODEL_PATH a local directory, never an ``hf://`` or ``ngc://`` URI.
SERVING_SECRETS: dict[str, tuple[str, ...]] = {"manifest": ("NGC_API_KEY", "HF_TOKEN"), "directory": ()}


def nim_cache_dir(cache_dir: str | Path, name: str) -> Path:
    """The host directory a deployment's NIM containers get as their cache (``NIM_CACHE_PATH``), read-write."""
    return Path(cache_dir).resolve() / NIM_CACHE_ROOT / name


def private_dirs(cache_dir: str | Path) -> list[Path]:
    """nimflow's own directories in the cache dir, which no directory mounted into a container may be, hold or lie in."""
    cache = Path(cache_dir).resolve()
    return [cache / ROUTE_ROOT, cache / NIM_CACHE_ROOT]


def refuse_nimflow_dirs(cache_dir: str | Path, path: Path, what: str) -> None:
    """Refuse to mount ``path`` into a NIM or build container if it would carry nimflow's own directories.

    Raises:
        DeploymentError: ``path`` is, holds or lies in the front proxy's route directories or the
            NIM caches (naming both and the fix).
    """
    path = path.resolve()
    for private in private_dirs(cache_dir):
        if path.is_relative_to(private) or private.is_relative_to(path):
            raise DeploymentError(
                f"{what}, {path}, {'lies in' if path.is_relative_to(private) else 'holds'} {private}, "
                "nimflow's own directory (front proxy routes, NIM caches) that no container may see; "
                "use a directory that holds only the model (a checkpoint, fine-tune or adapter directory of its own)"
            )


def host_mount(deploy: DeploySpec, path: Path, fallback: str, what: str = "the model") -> tuple[str, dict[str, dict[str, str]]]:
    """The in-container path for the served host directory ``path`` and its read-only volume.

    A directory inside the cache dir keeps its path under the cache mount (the guide's layout:
    ``/opt/nim/.cache/models/...``), mounted there read-only over the NIM's own cache; anything
    else is mounted read-only at ``fallback``.

    Raises:
        DeploymentError: ``path`` is, holds or lies in one of nimflow's own directories (the front
            proxy's routes, the NIM caches), which must not be mounted into a NIM container.
    """
    cache_dir = Path(deploy.cache_dir).resolve()
    path = path.resolve()
    refuse_nimflow_dirs(cache_dir, path, f"{what} to serve")
    container_path = fallback
    if path.is_relative_to(cache_dir):
        container_path = f"{NIM_CACHE_MOUNT}/{path.relative_to(cache_dir).as_posix()}"
    return container_path, {str(path): {"bind": container_path, "mode": "ro"}}


def model_mount(deploy: DeploySpec, model_path: Path) -> tuple[str, dict[str, dict[str, str]]]:
    """The in-container path of the model directory and its read-only volume (see :func:`host_mount`)."""
    return host_mount(deploy, model_path, EXTRA_MODEL_MOUNT)


@dataclass(frozen=True)
class ServingConfig:
    """What a NIM container is told to serve: model root, model environment, read-only volumes, and
    where the model comes from (``manifest``: the NIM downloads it; ``directory``: served from this host)."""

    model_root: str
    environment: dict[str, str]
    volumes: dict[str, dict[str, str]] = field(default_factory=dict)
    source: Literal["directory", "manifest"] = "directory"
    #: The host directory mounted read-only at ``model_root`` (None: a manifest model the NIM fetches).
    model_source: str | None = None
    #: Environment the mode needs unless ``deploy.env`` says otherwise (:data:`LEGACY_TRTLLM_ENV`).
    defaults: dict[str, str] = field(default_factory=dict)


def serving_config(deploy: DeploySpec, serving: ServingImage, model_path: str | None, adapters_path: str | None,
                   lora_max_rank: int = 32, *, adapter_count: int = 1, custom_weights: bool = False) -> ServingConfig:
    """The model part of the NIM container's environment, by NIM generation and mode.

    1.x: ``NIM_MODEL_NAME=<container path>``; 2.x: ``NIM_MODEL_PATH=<container path>``; a guide §1
    manifest (no model path, ``serving.model_name``): ``NIM_MODEL_NAME=<model name>``. LoRA adapters
    add ``NIM_PEFT_SOURCE`` and, on 1.x, ``NIM_MAX_LORA_RANK``; on 2.x the vLLM options
    ``--enable-lora --max-lora-rank --max-loras --max-cpu-loras`` in ``NIM_PASSTHROUGH_ARGS``. On
    1.x, ``custom_weights`` (an engine nimflow built or restored, or fine-tuned weights) adds
    :data:`LEGACY_TRTLLM_ENV` as defaults ``deploy.env`` may override. Every served directory is
    mounted read-only.

    Args:
        adapter_count: how many adapters ``adapters_path`` holds (2.x: ``--max-loras``, ``--max-cpu-loras``).
        custom_weights: what is served is not the base model as published (see :func:`serves_custom_weights`).

    Raises:
        DeploymentError: there is neither a model path nor a manifest model name, or a served
            directory is, holds or lies in one of nimflow's own directories.
    """
    volumes: dict[str, dict[str, str]] = {}
    source: Literal["directory", "manifest"] = "directory"
    model_source: str | None = None
    if model_path is not None:
        root, volumes = model_mount(deploy, Path(model_path))
        model_source = next(host for host, volume in volumes.items() if volume["bind"] == root)
        env = {("NIM_MODEL_PATH" if serving.nim_api == "2.x" else "NIM_MODEL_NAME"): root}
    elif serving.model_name is not None:
        root, env, source = serving.model_name, {"NIM_MODEL_NAME": serving.model_name}, "manifest"
    else:
        raise DeploymentError("nothing to serve: no model directory and no manifest model name (source.model_name)")
    if adapters_path is not None:
        peft, extra = host_mount(deploy, Path(adapters_path), EXTRA_ADAPTERS_MOUNT, "the LoRA adapters")
        volumes = {**volumes, **extra}
        env["NIM_PEFT_SOURCE"] = peft
        if serving.nim_api == "2.x":
            loras = str(max(adapter_count, 1))
            env[PASSTHROUGH_ARGS] = shlex.join(["--enable-lora", "--max-lora-rank", str(lora_max_rank),
                                                "--max-loras", loras, "--max-cpu-loras", loras])
        else:
            env["NIM_MAX_LORA_RANK"] = str(lora_max_rank)
    defaults = dict(LEGACY_TRTLLM_ENV) if custom_weights and serving.nim_api == "1.x" and source == "directory" else {}
    return ServingConfig(root, env, volumes, source, model_source, defaults)


def serves_custom_weights(spec: HostingSpec) -> bool:
    """Whether a spec serves weights NIM did not publish: an engine nimflow builds, or fine-tuned weights."""
    return spec.build is not None or spec.finetune is not None


def container_environment(deploy: DeploySpec, model_env: Mapping[str, str], *,
                          source: Literal["directory", "manifest"], defaults: Mapping[str, str] | None = None) -> dict[str, str]:
    """The NIM container's environment: the mode's ``defaults``, the spec's env over them, the model,
    and the secrets a NIM that serves from ``source`` needs (:data:`SERVING_SECRETS`: none unless it
    downloads its model).

    ``NIM_PASSTHROUGH_ARGS`` set by both nimflow (2.x LoRA) and ``deploy.env`` is joined, the spec's
    arguments last: NIM takes the last of repeated arguments, so the spec's own choice wins.
    """
    needed = SERVING_SECRETS[source]
    env = {
        **(defaults or {}),
        **deploy.env,
        **model_env,
        "NIM_SERVED_MODEL_NAME": deploy.served_model_name,
        "NIM_CACHE_PATH": NIM_CACHE_MOUNT,
        **(get_settings().container_secrets(needed) if needed else {}),
    }
    if PASSTHROUGH_ARGS in model_env and PASSTHROUGH_ARGS in deploy.env:
        env[PASSTHROUGH_ARGS] = f"{model_env[PASSTHROUGH_ARGS]} {deploy.env[PASSTHROUGH_ARGS]}"
    return env


def container_volumes(deploy: DeploySpec, name: str, config: ServingConfig) -> dict[str, dict[str, str]]:
    """A backend's volumes, prepared for ``deploy.user``: its own cache read-write, and what it serves read-only over it.

    The mount points of served directories under the cache mount are made in the NIM cache
    directory first, by nimflow's user: Docker would otherwise make them, owned by root. The own
    cache is then handed to the container's user (:func:`prepare_own_cache`) and every served
    directory is checked readable by it (:func:`check_readable`), so a permission NIM would trip
    over minutes later is refused now.

    Raises:
        DeploymentError: the container's user could not write its cache or read what it serves
            (naming the path, its owner and mode, the user and the fix).
    """
    own_cache = nim_cache_dir(deploy.cache_dir, name)
    own_cache.mkdir(parents=True, exist_ok=True)
    for volume in config.volumes.values():
        if volume["bind"].startswith(f"{NIM_CACHE_MOUNT}/"):
            (own_cache / volume["bind"].removeprefix(f"{NIM_CACHE_MOUNT}/")).mkdir(parents=True, exist_ok=True)
    prepare_own_cache(deploy.user, own_cache)
    for host, volume in config.volumes.items():
        check_readable(deploy.user, Path(host), f"mounted read-only at {volume['bind']}")
    return {str(own_cache): {"bind": NIM_CACHE_MOUNT, "mode": "rw"}, **config.volumes}


# --- the container's user ---------------------------------------------------------------------------


def container_ids(user: str) -> tuple[int, int | None]:
    """``deploy.user`` as (uid, gid); gid None for a bare uid (Docker gives it the group of the
    image's /etc/passwd entry for that uid, or 0 when there is none: nimflow cannot know which)."""
    if user == "root":
        return 0, 0
    uid, _, gid = user.partition(":")
    return int(uid), (int(gid) if gid else None)


def _allows(info: os.stat_result, uid: int, gid: int | None, wanted: int) -> bool:
    """Whether ``uid``/``gid`` gets the ``wanted`` rwx bits (4, 2, 1) on a file, as the kernel decides:
    the owner's bits for the owner, the group's for the group, else the others'. An unknown gid is
    never taken to be the file's group."""
    if uid == 0:
        return True  # root in the container (CAP_DAC_OVERRIDE, which Docker keeps by default)
    if info.st_uid == uid:
        bits = info.st_mode >> 6
    elif gid is not None and info.st_gid == gid:
        bits = info.st_mode >> 3
    else:
        bits = info.st_mode
    return bits & wanted == wanted


def _describe(path: Path, info: os.stat_result) -> str:
    return f"{path} (owner uid {info.st_uid}, gid {info.st_gid}, mode {stat.filemode(info.st_mode)} {info.st_mode & 0o7777:04o})"


def prepare_own_cache(user: str, own_cache: Path) -> None:
    """Make a backend's own cache (``NIM_CACHE_PATH``) writable for the container's ``user``.

    nimflow running as root hands the directory tree to the user (``chown``, links not followed).
    Otherwise nothing can be chowned, and the directory must already be writable for the user
    (it is when nimflow runs as that very uid, the usual ``-u $(id -u)``).

    Raises:
        DeploymentError: the user cannot write the directory and nimflow cannot fix it (not root, or
            a filesystem that refuses root's chown).
    """
    uid, gid = container_ids(user)
    if uid == 0:
        return
    if os.geteuid() == 0:
        for directory, dirs, files in os.walk(own_cache):
            for entry in [directory, *(os.path.join(directory, name) for name in dirs + files)]:
                try:
                    os.chown(entry, uid, -1 if gid is None else gid, follow_symlinks=False)
                except OSError as exc:  # e.g. NFS with root_squash: root is nobody there
                    raise DeploymentError(
                        f"cannot hand {entry} (in the NIM container's cache) to deploy.user={user!r}: {exc}; put "
                        "deploy.cache_dir on a filesystem where root may chown, or set deploy.user to the owner of "
                        f"{own_cache}"
                    ) from exc
        return
    info = own_cache.stat()
    if not _allows(info, uid, gid, 0o3):
        raise DeploymentError(
            f"the NIM container's cache (NIM_CACHE_PATH), {_describe(own_cache, info)}, is not writable for its user "
            f"deploy.user={user!r}, and nimflow (uid {os.geteuid()}) is not root, so it cannot hand it over; NIM would "
            f"exit at start-up (\"Unable to write to NIM_CACHE_PATH\"). Fix: `sudo chown -R {uid}{'' if gid is None else f':{gid}'} "
            f"{own_cache}`, or set deploy.user to nimflow's own user, `{os.geteuid()}:{os.getegid()}`"
        )


def check_readable(user: str, top: Path, what: str) -> None:
    """Refuse a served directory the container's ``user`` could not read in full.

    Every directory needs read and search, every file read, by the kernel's owner / group / other
    rule (:func:`_allows`); links are judged by their targets, as NIM opening them would be.

    Raises:
        DeploymentError: naming the first path the user cannot read, its owner and mode, the user and the fix.
    """
    uid, gid = container_ids(user)
    if uid == 0:
        return
    for directory, _, files in os.walk(top, followlinks=True):
        for path, wanted in [(Path(directory), 0o5), *((Path(directory) / name, 0o4) for name in files)]:
            info = path.stat()
            if not _allows(info, uid, gid, wanted):
                bare = (" (a bare uid's group is the image's choice, so group bits do not count: give deploy.user "
                        "as uid:gid)") if gid is None else ""
                raise DeploymentError(
                    f"{_describe(path, info)}, in {top} ({what}), is not readable for the NIM container's user "
                    f"deploy.user={user!r}{bare}; NIM would fail loading it. Fix: `chmod -R a+rX {top}`, or chown it to "
                    f"uid {uid}, or set deploy.user to a user that can read it"
                )


def deployment_labels(weights_identity: str, engine_key: str | None, adapters_digest: str | None = None) -> dict[str, str]:
    """The provenance labels of a NIM container: what it serves."""
    labels = {f"{LABEL_PREFIX}weights": weights_identity[:200]}
    if engine_key is not None:
        labels[f"{LABEL_PREFIX}engine-key"] = engine_key
    if adapters_digest is not None:
        labels[f"{LABEL_PREFIX}adapters"] = adapters_digest[:64]
    return labels


def backend_identity(client: docker.DockerClient, deploy: DeploySpec, rollout: RolloutSpec, image: str,
                     config: ServingConfig, labels: Mapping[str, str]) -> str:
    """The hash of everything that makes a backend what it is.

    Secrets are excluded (they never leave this process), and so is where the front listens
    (``host_port``): a new endpoint replaces the front, not the model server.

    Raises:
        DeploymentError: the image is not on this Docker host.
    """
    return spec_hash({
        "image_id": image_id(client, image),
        "model_env": dict(config.environment),
        "env_defaults": dict(config.defaults),
        "volumes": config.volumes,
        "layout": SERVING_LAYOUT,
        "deploy": deploy.model_dump(mode="json", exclude={"host_port"}),
        "standby_gpus": rollout.standby_gpus,
        "labels": dict(labels),
    })


def guard_engine(client: docker.DockerClient, deploy: DeploySpec, engine: Engine) -> list[str]:
    """Refuse an engine built for another GPU or TensorRT-LLM version than this deployment's.

    The same probe as the build's, run with the deployment's image, GPUs and env, before any
    container is started or stopped.

    Returns:
        The differences ``deploy.force`` overrode (empty when the engine matches).

    Raises:
        EngineIncompatible: naming both GPUs / versions, unless ``deploy.force``.
        EngineStoreError: the engine directory has no manifest.
    """
    manifest = read_local_manifest(Path(engine.path))
    if manifest is None:
        raise EngineStoreError(f"{engine.path}: no engine manifest; cannot tell which GPU the engine was built for")
    return check_serving_target(client, deploy, manifest["key_inputs"], engine_key=engine.engine_key)


def candidate_gpus(deploy: DeploySpec, rollout: RolloutSpec, strategy: str, running_old_gpus: str | None) -> Any:
    """The GPUs of a new backend: ``rollout.standby_gpus`` while the running old one holds ``deploy.gpus``.

    Args:
        running_old_gpus: the ``nimflow.gpus`` label (JSON) of the old backend if it runs, ``""``
            for a running one without the label (legacy: it holds ``deploy.gpus``), None when none runs.
    """
    if strategy != "blue-green" or rollout.standby_gpus is None or running_old_gpus is None:
        return deploy.gpus
    held = json.loads(running_old_gpus) if running_old_gpus else deploy.gpus
    if held == "all" or deploy.gpus == "all":
        return rollout.standby_gpus
    overlaps = isinstance(held, list) and isinstance(deploy.gpus, list) and bool(set(held) & set(deploy.gpus))
    return rollout.standby_gpus if overlaps else deploy.gpus


def _port_in_use_outside_docker(host: str, port: int) -> bool:
    """True when something on this machine listens on ``host:port`` (a bind probe)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE  # other errors (address not local here) say nothing
    return False


def _own_endpoint(client: docker.DockerClient, container: Any, host: str) -> str:
    return url(host, published_port(client, container.id))


# --- start ------------------------------------------------------------------------------------------


def _is_unchanged(active: Any | None, route: Route | None, identity: str) -> bool:
    return (active is not None and active.status == "running" and active.labels.get(SPEC_HASH_LABEL) == identity
            and route is not None and route.upstream == upstream_of(active.name))


def unchanged_backend(client: docker.DockerClient, deploy: DeploySpec, name: str, container_name: str,
                      identity: str) -> Any | None:
    """The routed, running backend that already has exactly this identity (nothing to roll out), else None."""
    names = Names(name, container_name)
    route = read_route(route_dir(deploy.cache_dir, name))
    active = active_backend(client, names, route)
    return active if _is_unchanged(active, route, identity) else None


def start_candidate(
    deploy: DeploySpec,
    rollout: RolloutSpec,
    strategy: Literal["blue-green", "recreate"],
    name: str,
    container_name: str,
    serving: ServingImage,
    model_path: str | None,
    adapters_path: str | None,
    adapters: list[str],
    api: Literal["chat", "completions"],
    labels: dict[str, str],
    engine: Engine | None = None,
    lora_max_rank: int = 32,
    custom_weights: bool = False,
) -> Deployment:
    """Start the candidate backend of a rollout (or keep an identical one that serves already).

    blue-green: beside the active backend, in the other colour. recreate: the active backend is
    stopped first (not removed: :func:`abort` starts it again if the candidate fails). The
    candidate has restart policy ``no`` until promoted, so a crashing candidate shows as exited.

    Raises:
        EngineIncompatible: the engine was built for another GPU or TensorRT-LLM version.
        DeploymentError: the image is missing, a foreign container has one of the deployment's
            names or holds the port, the container cannot be started, or (before Docker is asked
            anything) ``deploy.user`` could not write its cache or read what it serves.
        ServiceUnavailable: the Docker daemon did not answer.
    """
    config = serving_config(deploy, serving, model_path, adapters_path, lora_max_rank,
                            adapter_count=len(adapters), custom_weights=custom_weights)
    Path(deploy.cache_dir).mkdir(parents=True, exist_ok=True)
    volumes = container_volumes(deploy, name, config)  # before Docker: what the user cannot read or write is refused first
    client = docker_client()
    names = Names(name, container_name)
    directory = route_dir(deploy.cache_dir, name)
    stable = url(deploy.host, deploy.host_port)
    action = f"starting a candidate for deployment {name}"
    with daemon_errors(action):
        ours = claim_names(client, names)
        identity = backend_identity(client, deploy, rollout, serving.image, config, labels)
        route = read_route(directory)
        active = active_backend(client, names, route)
        common = dict(name=name, stable_endpoint=stable, served_model_name=deploy.served_model_name,
                      model_root=config.model_root, model_source=config.model_source, labels=dict(labels),
                      nim_api=serving.nim_api, api=api, adapters=adapters, strategy=strategy)
        if active is not None and _is_unchanged(active, route, identity):
            return Deployment(container_id=active.id, container_name=active.name,
                              endpoint=_own_endpoint(client, active, deploy.host), reused=True, **common)
        check_port_free(client, FrontSpec(name, names.front, deploy.host, deploy.host_port, directory),
                        allowed={c.id for c in ours.values()})
        if not port_holders(client, deploy.host, deploy.host_port) and _port_in_use_outside_docker(deploy.host, deploy.host_port):
            raise DeploymentError(
                f"port {deploy.host}:{deploy.host_port} (deploy.host_port) is in use by a process outside Docker; "
                "free it or change deploy.host_port"
            )
    forced = guard_engine(client, deploy, engine) if engine is not None else []
    with daemon_errors(action):
        slot = "green" if active is not None and active.labels.get(SLOT_LABEL) == "blue" else "blue"
        candidate_name = names.backend(slot)
        if (leftover := ours.get(candidate_name)) is not None:
            remove_container(client, leftover.id, stop_timeout=10)  # a failed candidate of an earlier run
        running_old = active is not None and active.status == "running"
        old_gpus = active.labels.get(GPUS_LABEL, "") if active is not None and running_old else None
        gpus = candidate_gpus(deploy, rollout, strategy, old_gpus)
        ensure_network(client)
        stops_old = strategy == "recreate" and active is not None and running_old
        stopped_old = False

        def stop_old() -> None:  # once the candidate exists, labelled with what it stops: see run_leftovers
            nonlocal stopped_old
            if stops_old and active is not None:
                stopped_old = True  # before the call: a stop cut short is undone too (start is a no-op if it runs)
                active.stop(timeout=STOP_TIMEOUT)

        try:
            candidate_id = start_container(
                client, serving.image, name=candidate_name, before_start=stop_old,
                environment=container_environment(deploy, config.environment, source=config.source,
                                                  defaults=config.defaults),
                # Not the cache dir: the route files, the other deployments' caches and engines stay out.
                volumes=volumes,
                ports={CONTAINER_PORT: (deploy.host, None)},  # Docker picks the host port; the front owns host_port
                network=NETWORK,
                device_requests=device_requests(gpus),
                shm_size=deploy.shm_size,
                user=deploy.user,
                # Not restarted until promoted: a crashing candidate must show as exited to verification.
                restart_policy={"Name": "no", "MaximumRetryCount": 0},
                labels={
                    **labels,
                    DEPLOYMENT_LABEL: name,
                    ROLE_LABEL: "serve",
                    SLOT_LABEL: slot,
                    SPEC_HASH_LABEL: identity,
                    SERVED_LABEL: deploy.served_model_name,
                    GPUS_LABEL: json.dumps(gpus),
                    MODEL_ROOT_LABEL: config.model_root[:200],
                    CONTAINER_NAME_LABEL: container_name,
                    STRATEGY_LABEL: strategy,
                    ENDPOINT_LABEL: f"{deploy.host}:{deploy.host_port}",
                    ROUTE_DIR_LABEL: str(directory),
                    # Which run started it, and (recreate) which backend it stopped: the next run on this
                    # host undoes a rollout whose run died before promoting it (nimflow.run_leftovers).
                    **run_labels(),
                    **({STOPPED_BACKEND_LABEL: active.id} if stops_old and active is not None else {}),
                },
            )
        except BaseException:  # a cancellation (SIGTERM) here too: the stopped old backend must not stay down
            if stopped_old and active is not None:
                start_existing(client, active.id)  # the old one serves again; the start error is the news
            raise
        endpoint = _own_endpoint(client, client.containers.get(candidate_id), deploy.host)
    return Deployment(container_id=candidate_id, container_name=candidate_name, endpoint=endpoint,
                      previous_container_id=active.id if active is not None else None, forced_despite=forced, **common)


# --- promote ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Promotion:
    """What :func:`promote` did, for the task's log."""

    generation: int
    switched: bool = False
    front: str = "kept"
    previous_upstream: str | None = None
    still_in_flight: int = 0
    removed: list[str] = field(default_factory=list)


def _candidate(client: docker.DockerClient, deployment: Deployment) -> Any:
    container = find_container(client, deployment.container_id)
    if container is None:
        raise DeploymentError(
            f"container {deployment.container_name} ({deployment.container_id[:12]}) is gone; run nimflow again"
        )
    if not owned_by(container, deployment.name):
        raise DeploymentError(f"container {describe_container(container)} is not part of deployment {deployment.name!r}")
    return container


def _front_of(container: Any, deployment: str) -> FrontSpec:
    labels = container.labels
    host, _, port = labels[ENDPOINT_LABEL].rpartition(":")
    return FrontSpec(deployment, f"{labels[CONTAINER_NAME_LABEL]}-front", host, int(port), Path(labels[ROUTE_DIR_LABEL]))


def promote(deployment: Deployment, rollout: RolloutSpec, *, apply_timeout: float = 60.0) -> Promotion:
    """Switch the stable endpoint to a verified candidate, drain the old backend, and retire it.

    Writes the route (the front proxy is created, started or updated as needed and reads it),
    waits until the proxy applied it, then until the old backend has no request in flight (at most
    ``rollout.drain_seconds``), then removes the old backend. A legacy container publishing the
    port itself is removed just before the front proxy takes the port (a gap of about a second).
    For a reused deployment nothing is switched; a missing front is restored, and backends an
    earlier failed run left behind (not routed) are retired.

    Raises:
        DeploymentError: the candidate is gone or not running, a foreign container holds the
            front's name or port, or the proxy did not apply the route.
        ServiceUnavailable: the Docker daemon did not answer.
    """
    client = docker_client()
    with daemon_errors(f"switching deployment {deployment.name} to {deployment.container_name}"):
        candidate = _candidate(client, deployment)
        if candidate.status != "running":
            raise DeploymentError(
                f"candidate {deployment.container_name} is {candidate.status}, not running; the endpoint was not switched"
            )
        front = _front_of(candidate, deployment.name)
        names = Names(deployment.name, candidate.labels[CONTAINER_NAME_LABEL])
        ours = claim_names(client, names)
        route = read_route(front.directory)
        new_upstream = upstream_of(candidate.name)
        switched = route is None or route.upstream != new_upstream
        generation = (route.generation if route else 0) + (1 if switched else 0)
        if not deployment.reused:
            set_restart_policy(client, candidate.id, "unless-stopped")
            if switched:
                write_route(front.directory, Route(generation, new_upstream))
        removed = []
        legacy = ours.get(names.container_name)
        if legacy is not None and legacy.id != candidate.id:
            # It publishes host_port itself and takes no route: retired just before the front binds
            # the port, once the proxy image exists (a failed build must not leave the port unserved).
            ensure_proxy_image(client, candidate.attrs["Image"])
            remove_container(client, legacy.id, stop_timeout=STOP_TIMEOUT)
            removed.append(legacy.name)
        outcome = ensure_front(client, front, candidate.attrs["Image"])
        wait_applied(front.directory, generation, timeout=apply_timeout, give_up=front_exit_check(client, front))
        # Every other backend of ours is retired once idle: the old one of this rollout, and any
        # left over by an earlier run that failed half-way (a reused deployment included).
        deadline = time.monotonic() + rollout.drain_seconds
        left = 0
        for backend_name in names.backends:
            old = ours.get(backend_name)
            if old is None or old.id == candidate.id or backend_name in removed:
                continue
            left += wait_drained(front.directory, upstream_of(backend_name), timeout=max(0.0, deadline - time.monotonic()))
            remove_container(client, old.id, stop_timeout=STOP_TIMEOUT)
            removed.append(backend_name)
    return Promotion(generation=generation, switched=switched, front=outcome,
                     previous_upstream=route.upstream if route is not None and switched else None,
                     still_in_flight=left, removed=removed)


# --- abort ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Abort:
    """What :func:`abort` did, for the task's log."""

    removed: str | None = None
    restored: str | None = None


def abort(deployment: Deployment, *, deadline_seconds: float = 600.0, wait_for_old: bool = True) -> Abort:
    """Undo a candidate that failed verification; the route was never switched to it.

    The candidate is removed (verification already reported its logs). A reused deployment is
    the serving one and is left alone. For recreate, the stopped old backend is started again and
    checked (ready, and /v1/models lists its model) through its own port; with ``wait_for_old``
    false (a run being cancelled, with seconds left), it is only started.

    Raises:
        DeploymentError: the old backend could not be brought back (the endpoint is down; the
            message names the container and its last log lines).
        ServiceUnavailable: the Docker daemon did not answer.
    """
    client = docker_client()
    if deployment.reused:
        return Abort()
    with daemon_errors(f"undoing the rollout of deployment {deployment.name}"):
        removed = None
        candidate = find_container(client, deployment.container_id)
        if candidate is not None and owned_by(candidate, deployment.name):
            remove_container(client, candidate.id, stop_timeout=10)
            removed = candidate.name
        if deployment.strategy != "recreate" or deployment.previous_container_id is None:
            return Abort(removed=removed)
        old = find_container(client, deployment.previous_container_id)
        if old is None or not owned_by(old, deployment.name):
            raise DeploymentError(
                f"deployment {deployment.name} is down: the container it served from before the recreate "
                f"({deployment.previous_container_id[:12]}) is gone; fix the new version and run nimflow again"
            )
        start_existing(client, old.id)
    if not wait_for_old:
        return Abort(removed=removed, restored=old.name)
    try:
        with daemon_errors(f"restarting {old.name}"):
            endpoint = url(*_published_on(client, old.id))
        wait_until_ready(endpoint, deadline_seconds=deadline_seconds, give_up=exit_watch(client, old.id, old.name))
        served = old.labels.get(SERVED_LABEL, deployment.served_model_name)
        models = list_models(endpoint)
        if served not in models:
            raise DeploymentError(f"{endpoint}/v1/models lists {models}, not {served!r}")
    except NimflowError as exc:
        raise DeploymentError(
            f"deployment {deployment.name} is down: the previous container {old.name} ({old.id[:12]}) did not come "
            f"back after the failed recreate ({exc}); its last log lines:\n{last_log_lines(client, old.id)}"
        ) from None
    return Abort(removed=removed, restored=old.name)


def unpromoted_candidate(container: Any) -> bool:
    """True for a rollout's candidate that was never promoted: a backend with restart policy ``no``
    (promotion sets ``unless-stopped`` just before switching the route) that the route does not name.

    A promoted backend that a later rollout retired is not one: it may still be draining requests.
    """
    labels = container.labels or {}
    if labels.get(ROLE_LABEL) != "serve" or DEPLOYMENT_LABEL not in labels:
        return False
    policy = ((container.attrs.get("HostConfig") or {}).get("RestartPolicy") or {}).get("Name") or "no"
    route = read_route(Path(labels[ROUTE_DIR_LABEL])) if ROUTE_DIR_LABEL in labels else None
    return policy == "no" and (route is None or route.upstream != upstream_of(container.name))


def undo_candidate(client: docker.DockerClient, candidate: Any) -> Abort:
    """Undo the rollout of a candidate whose run ended before promoting it (killed, crashed, cancelled).

    The candidate is removed. If its run stopped the deployment's backend for it (recreate; the
    candidate's ``stopped-backend`` label) and that backend is still the one the route names (nothing
    else serves the deployment), it is started again, without waiting for it to answer: reconcile
    checks it. Run by the next nimflow run on the host and by reconcile (:mod:`nimflow.run_leftovers`),
    and by the run's own ``on_crashed`` / ``on_cancellation`` hooks.

    Raises:
        ServiceUnavailable: the Docker daemon did not answer.
        NimflowError: another Docker error (translated).
    """
    labels = candidate.labels
    name = labels[DEPLOYMENT_LABEL]
    with daemon_errors(f"undoing the unfinished rollout of deployment {name} ({candidate.name})"):
        remove_container(client, candidate.id, stop_timeout=10)
        stopped = labels.get(STOPPED_BACKEND_LABEL)
        if not stopped:
            return Abort(removed=candidate.name)
        names = Names(name, labels.get(CONTAINER_NAME_LABEL, name))
        active = active_backend(client, names, read_route(Path(labels[ROUTE_DIR_LABEL])))
        if active is None or active.id != stopped or active.status == "running":
            return Abort(removed=candidate.name)  # gone, replaced, or serving again: nothing to restore
        start_existing(client, active.id)
    return Abort(removed=candidate.name, restored=active.name)


def _published_on(client: docker.DockerClient, container_id: str) -> tuple[str, int]:
    """(host, port) where a backend's port 8000 is published (Docker may pick a new port on start)."""
    container = client.containers.get(container_id)
    bindings = ((container.attrs.get("NetworkSettings") or {}).get("Ports") or {}).get(CONTAINER_PORT) or [{}]
    host = bindings[0].get("HostIp") or "127.0.0.1"
    return host, published_port(client, container_id)
