"""Images nimflow derives from an image already on the Docker host, tagged by their content.

Two things need one: guide §1 (another model's ``model_manifest.yaml`` in an existing NIM image)
and the front proxy of a rollout (a small Python program on top of an image that has Python).
Both are ``FROM <base>`` plus a few small files, environment variables and labels, built with the
docker SDK from an in-memory context. Nothing is pulled: the base must be on the host.

The tag is ``<repository>:<content hash>``, the hash covering the base image's id and everything
added, so an unchanged input is never rebuilt and a changed one never reuses a stale image.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping

import docker

from nimflow.containers import image_id, spec_hash
from nimflow.errors import DeploymentError, translated_errors

#: Label recording the content hash on every derived image (what the tag is derived from).
CONTENT_LABEL = "nimflow.derived-from"


def _dockerfile(base_id: str, files: Mapping[str, bytes], env: Mapping[str, str], labels: Mapping[str, str],
                cmd: list[str] | None, entrypoint: list[str] | None) -> str:
    lines = [f"FROM {base_id}"]
    for index, destination in enumerate(sorted(files)):
        lines.append(f"COPY file{index} {json.dumps(destination)}")
    for key in sorted(env):
        lines.append(f"ENV {key}={json.dumps(env[key])}")
    for key in sorted(labels):
        lines.append(f"LABEL {json.dumps(key)}={json.dumps(labels[key])}")
    if entrypoint is not None:
        lines.append(f"ENTRYPOINT {json.dumps(entrypoint)}")
    if cmd is not None:
        lines.append(f"CMD {json.dumps(cmd)}")
    return "\n".join(lines) + "\n"


def _context(dockerfile: str, files: Mapping[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        entries = {"Dockerfile": dockerfile.encode()}
        entries.update({f"file{i}": files[dest] for i, dest in enumerate(sorted(files))})
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def derived_tag(client: docker.DockerClient, repository: str, base_image: str, *, files: Mapping[str, bytes],
                env: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None,
                cmd: list[str] | None = None, entrypoint: list[str] | None = None) -> str:
    """The tag the derived image has (or will have): ``repository:<content hash>``.

    Raises:
        DeploymentError: the base image is not on this Docker host.
    """
    content = {
        "base": image_id(client, base_image),
        "files": {dest: spec_hash({"bytes": data.hex()}) for dest, data in files.items()},
        "env": dict(env or {}), "labels": dict(labels or {}), "cmd": cmd, "entrypoint": entrypoint,
    }
    return f"{repository}:{spec_hash(content)}"


def ensure_derived_image(client: docker.DockerClient, repository: str, base_image: str, *,
                         files: Mapping[str, bytes], env: Mapping[str, str] | None = None,
                         labels: Mapping[str, str] | None = None, cmd: list[str] | None = None,
                         entrypoint: list[str] | None = None) -> tuple[str, bool]:
    """Build ``FROM base_image`` with ``files`` (absolute destination -> bytes), env, labels, cmd.

    Returns:
        (tag, built): ``built`` is False when an image with this content already existed.

    Raises:
        DeploymentError: the base image is missing, or the build failed (naming the step's output).
        ServiceUnavailable: the Docker daemon did not answer.
    """
    for destination in files:
        if not destination.startswith("/"):
            raise ValueError(f"derived image files need absolute destinations, got {destination!r}")
    env, labels = dict(env or {}), dict(labels or {})
    tag = derived_tag(client, repository, base_image, files=files, env=env, labels=labels, cmd=cmd, entrypoint=entrypoint)
    with translated_errors(f"building image {tag} from {base_image}"):
        try:
            client.images.get(tag)
            return tag, False
        except docker.errors.ImageNotFound:
            pass
        dockerfile = _dockerfile(image_id(client, base_image), files, env, {**labels, CONTENT_LABEL: tag}, cmd, entrypoint)
        try:
            client.images.build(fileobj=_context(dockerfile, files), custom_context=True, tag=tag, rm=True,
                                forcerm=True, pull=False)
        except docker.errors.BuildError as exc:
            output = "".join(str(item.get("stream") or item.get("error") or "") for item in exc.build_log)[-2000:]
            raise DeploymentError(f"building {tag} FROM {base_image} failed: {exc.msg}\n{output}") from None
    return tag, True
