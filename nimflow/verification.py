"""Verification levels: what a new NIM container must prove before it takes traffic.

Levels, in order (each builds on the one before; the first that fails ends verification):

* ``live``: ``/v1/health/live`` answers (the server process is up).
* ``ready``: ``/v1/health/ready`` answers 200 before ``verify.deadline_seconds``.
* ``model``: ``/v1/models`` lists the served name, its ``root`` is no model other than the one the
  NIM was told to serve (see :func:`root_problem`), the NIM generation matches (``/v1/version``), on
  NIM 2.x ``/v1/metadata`` has its documented shape, every LoRA adapter is listed (``parent`` =
  served name), and the container behind the endpoint is the one nimflow started for these weights:
  its provenance labels, the model variable and the read-only mount of the directory nimflow
  prepared (see :func:`container_identity_problem`).
* ``answer``: a real chat or text completion from the served model and from each adapter.
* ``golden``: each golden prompt's answer contains every expected substring (when configured).
* ``latency``: the slowest verifying request is within ``verify.max_latency_seconds`` (when set).

Ready does not prove the model answers, and a listed name does not prove it is the model that was
asked for (a model-specific NIM image serves its bundled model whatever NIM_MODEL_NAME says), so
each level checks something the previous one cannot. Only the ``golden`` level proves, on real NIM,
that the weights answering are the ones intended: what ``model`` proves is that the right container
was given the right directory and does not report another model (docs/rollouts.md).

Verification only observes: it never stops or removes the container. The rollout decides what
happens to a candidate that fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker

from nimflow.containers import CONTAINER_PORT, DaemonSilence, daemon_errors, last_log_lines
from nimflow.errors import EndpointUnhealthy, is_transient
from nimflow.nim_api import LIVE_PATH, READY_PATH, READY_POLL_SECONDS, GiveUpCheck, generate, model_cards, optional_json, wait_for_status
from nimflow.nim_generation import running_generation_problem
from nimflow.records import Deployment, EndpointHealth
from nimflow.settings import get_settings
from nimflow.spec import VerifySpec

logger = logging.getLogger(__name__)

LEVELS = ("live", "ready", "model", "answer", "golden", "latency")
#: Lines of the container's log appended to a failure.
LOG_LINES = 20
#: NIM 1.0 had no /v1/health/live; any HTTP answer there still proves the server process is up.
_LIVE_STATUSES = frozenset({200, 404})

LogSink = logging.Logger | logging.LoggerAdapter


@dataclass(frozen=True)
class ContainerProbe:
    """What verification may ask about the container behind the endpoint (all optional).

    ``give_up`` says why waiting is pointless (it exited or restarted); ``describe`` is a one-line
    state for progress messages (status, restarts, latest log line); ``identity`` says what is wrong
    when the container is not the one nimflow started for the deployment (None: it is).
    """

    give_up: GiveUpCheck | None = None
    describe: Callable[[], str] | None = None
    identity: Callable[[], str | None] | None = None


@dataclass
class _Timings:
    """Seconds each verifying request took, by what it asked."""

    requests: list[tuple[str, float]] = field(default_factory=list)

    def timed(self, label: str, call: Callable[[], str]) -> str:
        started = time.monotonic()
        try:
            return call()
        finally:
            self.requests.append((label, time.monotonic() - started))

    def slowest(self) -> tuple[str, float] | None:
        return max(self.requests, key=lambda item: item[1]) if self.requests else None


def _failed(level: str, detail: str) -> EndpointUnhealthy:
    return EndpointUnhealthy(f"verification failed at {level}: {detail}")


def _same_model(a: str, b: str) -> bool:
    """Equal as model references: a trailing slash on a directory does not make another model."""
    return a.rstrip("/") == b.rstrip("/")


def _is_path(text: str) -> bool:
    return text.startswith("/")


def root_problem(deployment: Deployment, root: Any) -> str | None:
    """What is wrong with the ``root`` ``/v1/models`` gives for the served name (None: nothing).

    Real NIM does not echo what it was told. Published NIM 1.x answers report ``root`` as the
    model's name: ``"id": "meta/llama3-8b-instruct", ..., "root": "meta/llama3-8b-instruct"``
    (GoogleCloudPlatform/ai-on-gke, best-practices/ml-platform/terraform/features/nim/README.md,
    the `/v1/models` output of a llama3-8b-instruct NIM); vLLM, which serves NIM's vLLM profiles and
    all of NIM 2.x, reports the path it loaded (``ModelCard(id=base_model.name,
    root=base_model.model_path)``, vllm-project/vllm ``vllm/entrypoints/openai/serving_models.py``),
    which may be a copy in NIM's cache rather than the path given. So any path passes, and so does a
    name that is the model nimflow gave or the served name. What does not pass is the name of
    *another* model where nimflow gave a directory or a model name: that is what a model-specific
    NIM image answers when it serves its bundled model and ignores NIM_MODEL_NAME. A 2.x URI
    (``hf://org/model``) is downloaded and served under a name NIM chooses, so it is not compared.
    """
    if not isinstance(root, str) or not root:
        return None
    given = deployment.model_root
    if _is_path(root) or _same_model(root, given) or root == deployment.served_model_name or urlsplit(given).scheme:
        return None
    variable = "NIM_MODEL_PATH" if deployment.nim_api == "2.x" else "NIM_MODEL_NAME"
    return (
        f"{deployment.served_model_name!r} is served as the model {root!r}, but the container was told to serve "
        f"{given!r} ({variable}): it serves another model. A model-specific NIM image may serve its bundled model "
        f"whatever {variable} says; use a multi-LLM NIM image for your own weights, or source.manifest to serve "
        "another NIM model"
    )


def check_model(deployment: Deployment, identity: Callable[[], str | None] | None = None) -> list[str]:
    """The ``model`` level: the NIM serves the model it was given, under the right names.

    Args:
        identity: says what is wrong when the container behind the endpoint is not the one
            nimflow started for this deployment (see :func:`container_identity_problem`).

    Returns:
        The model ids ``/v1/models`` lists.

    Raises:
        EndpointUnhealthy: ``verification failed at model: ...`` naming what differs and the fix.
    """
    endpoint, served = deployment.endpoint, deployment.served_model_name
    # The generation first: a NIM 2.x image routed as 1.x ignores NIM_MODEL_NAME, and saying so
    # explains the root mismatch that would follow.
    try:
        problem = running_generation_problem(endpoint, deployment.nim_api)
        cards = model_cards(endpoint)
    except EndpointUnhealthy as exc:
        raise _failed("model", str(exc)) from None
    if problem:
        raise _failed("model", problem)
    ids = [str(card.get("id")) for card in cards]
    by_id = {str(card.get("id")): card for card in cards}
    if served not in by_id:
        raise _failed(
            "model",
            f"{endpoint}/v1/models lists {ids}, not {served!r}; check deploy.served_model_name (NIM_SERVED_MODEL_NAME)",
        )
    if (wrong := root_problem(deployment, by_id[served].get("root"))):
        raise _failed("model", wrong)
    if identity is not None and (stranger := identity()):
        raise _failed("model", stranger)
    if deployment.nim_api == "2.x":
        _check_metadata(deployment)
    for adapter in deployment.adapters:
        card = by_id.get(adapter)
        if card is None:
            raise _failed(
                "model",
                f"{endpoint}/v1/models lists {ids}, not the LoRA adapter {adapter!r}; check lora.adapters (each "
                "adapter is a sub-directory of NIM_PEFT_SOURCE) and that the NIM profile supports LoRA (feat_lora)",
            )
        parent = card.get("parent")
        if parent and parent != served:
            raise _failed(
                "model",
                f"the LoRA adapter {adapter!r} is listed on {parent!r}, not on the served model {served!r}; "
                "an adapter is served on the base model it was trained for",
            )
    return ids


#: The fields NIM 2.x documents for ``GET /v1/metadata`` that verification reads, with their JSON
#: types ("Deployment metadata", https://docs.nvidia.com/nim/large-language-models/latest/reference/api-reference/get-metadata:
#: ``version`` string, ``modelInfo`` list of the models served, ``selectedModelProfileId`` string).
#: The schema says nothing about where a model was loaded from, so the local NIM_MODEL_PATH is not
#: looked for in it; which weights are served is proven by the container's mount and ``golden``.
METADATA_FIELDS: dict[str, type] = {"version": str, "modelInfo": list, "selectedModelProfileId": str}


def _check_metadata(deployment: Deployment) -> None:
    """NIM 2.x: ``/v1/metadata`` answers its documented shape and lists at least one model.

    Raises:
        EndpointUnhealthy: ``verification failed at model: ...``.
    """
    endpoint = deployment.endpoint
    try:
        metadata = optional_json(endpoint, "/v1/metadata")
    except EndpointUnhealthy as exc:
        raise _failed("model", str(exc)) from None
    if metadata is None:
        raise _failed(
            "model",
            f"{endpoint}/v1/metadata does not exist, but NIM 2.x serves it; the image may not be NIM 2.x: "
            "check deploy.image, or set deploy.nim_api: 1.x",
        )
    wrong = [f"{key} ({kind.__name__})" for key, kind in METADATA_FIELDS.items() if not isinstance(metadata.get(key), kind)]
    if wrong or not metadata.get("modelInfo"):
        lacks = f"lacks {', '.join(wrong)}" if wrong else "lists no model in modelInfo"
        raise _failed(
            "model",
            f"{endpoint}/v1/metadata {lacks}, which NIM 2.x documents ({str(metadata)[:300]}); the server is not a "
            "NIM 2.x that loaded a model: check deploy.image, or set deploy.nim_api: 1.x",
        )


def _generate(deployment: Deployment, model: str, prompt: str, level: str, timings: _Timings, label: str) -> str:
    """One verifying request, timed, its failure named by ``level``."""
    try:
        return timings.timed(label, lambda: generate(deployment.endpoint, model, prompt, deployment.api))
    except EndpointUnhealthy as exc:
        hint = ""
        if deployment.api == "chat" and "HTTP 400" in str(exc):
            hint = ("; a model without a chat template (tokenizer_config.json `chat_template`) cannot chat: "
                    "set verify.api: completions, or add a chat template")
        raise _failed(level, f"{exc}{hint}") from None


def check_answers(deployment: Deployment, prompt: str, timings: _Timings) -> str:
    """The ``answer`` level: the served model, and each adapter by its name, answer ``prompt``.

    Returns:
        The served model's answer.

    Raises:
        EndpointUnhealthy: ``verification failed at answer: ...``.
    """
    api = "chat completion" if deployment.api == "chat" else "completion"
    answer = _generate(deployment, deployment.served_model_name, prompt, "answer", timings,
                       f"{api} by {deployment.served_model_name!r}")
    for adapter in deployment.adapters:
        _generate(deployment, adapter, prompt, "answer", timings, f"{api} by adapter {adapter!r}")
    return answer


def check_golden(deployment: Deployment, verify: VerifySpec, timings: _Timings) -> None:
    """The ``golden`` level: each golden prompt's answer contains every expected substring.

    Raises:
        EndpointUnhealthy: ``verification failed at golden: ...`` naming the prompt, the missing
            text and the answer.
    """
    for index, golden in enumerate(verify.golden):
        answer = _generate(deployment, deployment.served_model_name, golden.prompt, "golden", timings,
                           f"golden prompt {index}")
        missing = [text for text in golden.expect if text not in answer]
        if missing:
            raise _failed(
                "golden",
                f"verify.golden[{index}]: the answer to {golden.prompt!r} lacks {missing} (answer: {answer[:300]!r}); "
                "the served weights may not be the ones intended, or fix verify.golden",
            )


def check_latency(verify: VerifySpec, timings: _Timings) -> None:
    """The ``latency`` level: the slowest verifying request is within ``verify.max_latency_seconds``.

    Raises:
        EndpointUnhealthy: ``verification failed at latency: ...`` naming the slowest request.
    """
    slowest = timings.slowest()
    budget = verify.max_latency_seconds
    if budget is not None and slowest is not None and slowest[1] > budget:
        label, seconds = slowest
        raise _failed(
            "latency",
            f"the slowest verifying request ({label}) took {seconds:.3f}s, over verify.max_latency_seconds "
            f"({budget:g}s); give the model more GPUs or a faster profile, or raise the budget",
        )


class _Progress:
    """Reports a long wait every ``every`` seconds: the container's state and latest log line, so a
    JIT engine build that takes half an hour reads differently from a hung start-up."""

    def __init__(self, deployment: Deployment, every: float, log: LogSink, probe: ContainerProbe) -> None:
        self.deployment, self.every, self.log, self.probe = deployment, every, log, probe
        self.reported_at = 0.0

    def __call__(self, elapsed: float, last: str) -> None:
        if elapsed - self.reported_at < self.every:
            return
        self.reported_at = elapsed
        state = self.probe.describe() if self.probe.describe else "state unknown"
        self.log.info(
            "waiting for %s to be ready: %.0fs so far (last answer: %s); container %s: %s",
            self.deployment.endpoint, elapsed, last, self.deployment.container_name, state,
        )


def check_levels(
    deployment: Deployment,
    verify: VerifySpec,
    *,
    probe: ContainerProbe | None = None,
    log: LogSink | None = None,
    poll_seconds: float = READY_POLL_SECONDS,
) -> EndpointHealth:
    """Run every verification level against ``deployment.endpoint``, in order.

    Args:
        probe: how to watch the container while waiting (give up when it exits or restarts, and
            what to report); none: only the HTTP endpoint is watched.
        log: where progress goes (the task passes Prefect's run logger).

    Returns:
        What was seen, with the levels passed in order and the slowest request's seconds.

    Raises:
        EndpointUnhealthy: ``verification failed at <level>: ...`` for the first level that fails.
    """
    probe = probe or ContainerProbe()
    log = log or logger
    endpoint, checks = deployment.endpoint, []
    started = time.monotonic()
    log.info("verifying %s (%s, NIM %s): waiting up to %gs for it to be ready",
             endpoint, deployment.served_model_name, deployment.nim_api, verify.deadline_seconds)
    progress = _Progress(deployment, verify.progress_seconds, log, probe)

    def remaining() -> float:
        return max(0.0, verify.deadline_seconds - (time.monotonic() - started))

    gave_up: list[str] = []

    def give_up() -> str | None:
        reason = probe.give_up() if probe.give_up else None
        if reason:
            gave_up.append(reason)
        return reason

    for level, path, accept in (("live", LIVE_PATH, _LIVE_STATUSES), ("ready", READY_PATH, frozenset({200}))):
        try:
            wait_for_status(endpoint, path, deadline_seconds=remaining(), accept=accept, give_up=give_up,
                            on_poll=lambda waited, last: progress(time.monotonic() - started, last),
                            poll_seconds=poll_seconds, what=level)
        except EndpointUnhealthy as exc:
            if gave_up:  # the container ended this start: waiting longer cannot help
                raise _failed(level, f"{gave_up[0]}, before {endpoint} was {level}") from None
            last = str(exc).partition("(last answer: ")[2].rstrip(")") or "none"
            raise _failed(
                level,
                f"{endpoint} was not {level} within verify.deadline_seconds ({verify.deadline_seconds:g}s; last answer: "
                f"{last}); raise verify.deadline_seconds if the NIM is still loading or building its engine",
            ) from None
        checks.append(level)
    ready_after = time.monotonic() - started

    models = check_model(deployment, probe.identity)
    checks.append("model")
    timings = _Timings()
    completion = check_answers(deployment, verify.prompt, timings)
    checks.append("answer")
    if verify.golden:
        check_golden(deployment, verify, timings)
        checks.append("golden")
    if verify.max_latency_seconds is not None:
        check_latency(verify, timings)
        checks.append("latency")
    slowest = timings.slowest()
    return EndpointHealth(
        ready_after_seconds=round(ready_after, 3),
        models=models,
        completion=completion,
        checks=checks,
        latency_seconds=round(slowest[1], 3) if slowest else None,
    )


# --- the container behind the endpoint ------------------------------------------------------------


def _inspect(client: docker.DockerClient, container_id: str) -> dict[str, Any]:
    return client.api.inspect_container(container_id)


def _published_port(attrs: dict[str, Any]) -> str | None:
    bindings = ((attrs.get("NetworkSettings") or {}).get("Ports") or {}).get(CONTAINER_PORT) or []
    return str(bindings[0].get("HostPort")) if bindings and bindings[0].get("HostPort") else None


def container_identity_problem(attrs: dict[str, Any], deployment: Deployment) -> str | None:
    """What shows, in ``docker inspect`` of the container, that it is not the one nimflow started to
    serve ``deployment`` (None: it is). Holds on real NIM, whatever its HTTP answers say:

    * the endpoint verification talks to is this container's published API port;
    * every provenance label nimflow gave it (weights identity, engine key, adapters) has the value
      this deployment expects;
    * where nimflow served a directory: the model variable (NIM_MODEL_NAME / NIM_MODEL_PATH) names
      ``model_root``, and the directory nimflow prepared is bind-mounted there, read-only.
    """
    name = deployment.container_name
    port = _published_port(attrs)
    endpoint_port = str(urlsplit(deployment.endpoint).port)
    if port is not None and port != endpoint_port:
        return (f"{deployment.endpoint} is not container {name}'s API (it publishes {CONTAINER_PORT} on port {port}): "
                "another server answers there")
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    for key, expected in sorted(deployment.labels.items()):
        if labels.get(key) != expected:
            return (f"container {name} carries {key}={labels.get(key)!r}, not {expected!r}: it was not started for "
                    "the weights this run prepared; run nimflow again to replace it")
    if deployment.model_source is None:
        return None
    variable = "NIM_MODEL_PATH" if deployment.nim_api == "2.x" else "NIM_MODEL_NAME"
    env = dict(item.partition("=")[::2] for item in (attrs.get("Config") or {}).get("Env") or [])
    if env.get(variable) != deployment.model_root:
        return f"container {name} has {variable}={env.get(variable)!r}, not {deployment.model_root!r}"
    source = str(Path(deployment.model_source).resolve())
    mounts = [m for m in attrs.get("Mounts") or [] if _same_model(str(m.get("Destination", "")), deployment.model_root)]
    if not any(str(m.get("Source")) == source and m.get("RW") is False for m in mounts):
        seen = ", ".join(f"{m.get('Source')} ({'rw' if m.get('RW') else 'ro'})" for m in mounts) or "nothing"
        return (f"container {name} has {seen} mounted at {deployment.model_root}, not the directory nimflow prepared, "
                f"{source}, read-only")
    return None


def container_identity(client: docker.DockerClient, deployment: Deployment) -> Callable[[], str | None]:
    """An ``identity`` check for :class:`ContainerProbe`: :func:`container_identity_problem` on a fresh inspect."""
    return lambda: container_identity_problem(_inspect(client, deployment.container_id), deployment)


def container_watch(
    client: docker.DockerClient, container_id: str, name: str, *, daemon_grace_seconds: float = 60.0
) -> GiveUpCheck:
    """A ``give_up`` check: says why once the container has exited or restarted.

    NIM containers run with a restart policy, so a crash during start-up shows as a restart (the
    restart count rises, or the status is ``restarting``), not as an exit: either means this
    start failed, and waiting out the deadline would only hide it. A Docker daemon that briefly
    stops answering is not a reason to give up (a JIT build survives a daemon restart with
    live-restore); one silent for ``daemon_grace_seconds`` is. An exit says who may have stopped
    the container: the OOM killer, a signal (``docker stop``, a daemon restart), or a daemon that
    stopped answering before the exit was seen.

    Raises:
        ServiceUnavailable: (from the returned check) the daemon stayed silent too long.
    """
    silence = DaemonSilence(daemon_grace_seconds, f"watching container {name}")
    baseline: list[int] = []  # the restart count when watching began (a kept container may have restarted before)
    daemon_was_silent: list[bool] = []

    def check() -> str | None:
        try:
            attrs = _inspect(client, container_id)
        except Exception as exc:  # noqa: BLE001 - DaemonSilence classifies it
            silence.silent(exc)
            daemon_was_silent.append(True)
            return None
        silence.heard()
        state = attrs.get("State") or {}
        restarts = int(attrs.get("RestartCount") or 0)
        if not baseline:
            baseline.append(restarts)
        status = str(state.get("Status") or "")
        if restarts > baseline[0] or status == "restarting" or state.get("Restarting"):
            return (f"container {name} restarted (restart count {baseline[0]} -> {restarts}, last exit code "
                    f"{state.get('ExitCode')}): the NIM crashed while starting")
        if status in ("exited", "dead"):
            return f"container {name} {status} with exit code {state.get('ExitCode')}{_why_stopped(state, bool(daemon_was_silent))}"
        return None

    check()  # takes the baseline now, before the first poll
    return check


#: Exit codes of a process ended by SIGKILL / SIGTERM (128 + the signal).
_SIGNALLED = {137: "SIGKILL", 143: "SIGTERM"}


def _why_stopped(state: dict[str, Any], daemon_was_silent: bool) -> str:
    """What an exit code says about who stopped the container, for the give-up message ("" if nothing)."""
    if state.get("OOMKilled"):
        return " (killed by the kernel's OOM killer: the container ran out of memory)"
    if daemon_was_silent:
        return (" after the Docker daemon stopped answering: a daemon restart stops every container unless "
                "live-restore is on; run nimflow again once `docker info` answers")
    signal = _SIGNALLED.get(int(state.get("ExitCode") or 0))
    if signal is None:
        return ""
    return (f" (stopped by {signal}: `docker stop`/`docker kill`, a Docker daemon restart or a host shutdown; "
            "a daemon restart stops every container unless live-restore is on)")


def _log_lines_or_why(client: docker.DockerClient, container_id: str) -> str:
    """The container's last log lines for a failure message; why not, when they cannot be read.

    Reading them must never replace the verification failure being reported: a daemon that went
    away (the likely reason the container stopped) is named instead.
    """
    try:
        return last_log_lines(client, container_id, LOG_LINES)
    except Exception as exc:  # noqa: BLE001 - the logs only add to the error being raised
        if is_transient(exc):
            return (f"(not available: the Docker daemon at {get_settings().docker_host} did not answer: "
                    f"{type(exc).__name__}: {str(exc)[:300]})")
        return f"(not available: {type(exc).__name__}: {str(exc)[:300]})"


def container_summary(client: docker.DockerClient, container_id: str) -> str:
    """One line for progress messages: status, restart count and the latest log line."""
    try:
        attrs = _inspect(client, container_id)
        latest = client.containers.get(container_id).logs(tail=1).decode("utf-8", "replace").strip()
    except Exception as exc:  # noqa: BLE001 - a progress line must never end the wait
        return f"could not be inspected ({type(exc).__name__})"
    state = attrs.get("State") or {}
    return f"{state.get('Status')}, restarts {attrs.get('RestartCount', 0)}; latest log line: {latest[-300:] or '(none yet)'}"


def verify_deployment(
    client: docker.DockerClient,
    deployment: Deployment,
    verify: VerifySpec,
    *,
    log: LogSink | None = None,
    daemon_grace_seconds: float = 60.0,
    poll_seconds: float = READY_POLL_SECONDS,
) -> EndpointHealth:
    """Verify a deployment's container level by level, watching the container while it starts.

    The container is left as it is, whatever the outcome.

    Raises:
        EndpointUnhealthy: ``verification failed at <level>: ...``, ending with the container's
            name, id and last log lines (or why they could not be read).
        ServiceUnavailable: the Docker daemon stopped answering for ``daemon_grace_seconds``, naming it.
        NimflowError: any other Docker fault while watching the container, translated.
    """
    try:
        # Docker faults while watching (a daemon restart, a container removed meanwhile) become
        # nimflow errors that name the daemon, not library tracebacks.
        with daemon_errors(f"watching container {deployment.container_name} while verifying {deployment.endpoint}"):
            probe = ContainerProbe(
                give_up=container_watch(client, deployment.container_id, deployment.container_name,
                                        daemon_grace_seconds=daemon_grace_seconds),
                describe=lambda: container_summary(client, deployment.container_id),
                identity=container_identity(client, deployment),
            )
            return check_levels(deployment, verify, probe=probe, log=log, poll_seconds=poll_seconds)
    except EndpointUnhealthy as exc:
        logs = _log_lines_or_why(client, deployment.container_id)
        raise EndpointUnhealthy(
            f"{exc}\nlast log lines of container {deployment.container_name} ({deployment.container_id[:12]}):\n{logs}"
        ) from None
