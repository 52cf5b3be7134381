"""Reconcile: find the unhealthy nimflow deployments on a Docker host and heal them from their specs.

A deployment (see :mod:`nimflow.deployments_admin`) is healthy when its stable endpoint answers
``/v1/health/ready``, ``/v1/models`` there lists the model it serves, and its active backend container
is running. An unhealthy one whose spec still exists by name (the deployment name is the spec's
``name``) is healed by running its rollout again (``host_model``, given by the caller); one whose spec
is gone is reported and left alone. The result is one :class:`Finding` per deployment.

Every deployment found serving an engine has its in-use marker in the engine store refreshed
(:func:`refresh_in_use`, :mod:`nimflow.engine_use`), so ``nimflow cache gc`` on any host keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import httpx

from nimflow.deployments_admin import DeploymentStatus

HEALTHY = "healthy"


@dataclass(frozen=True)
class HealResult:
    """What healing one deployment gave: whether it worked, and a one-line account."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class Finding:
    """One deployment as reconcile found it and what it did (a row of the reconcile table)."""

    name: str
    state: str
    action: str
    result: str

    @property
    def failed(self) -> bool:
        """True when a heal was tried and did not bring the deployment back."""
        return self.action == "heal" and not self.result.startswith("healed")


def served_models(endpoint: str, timeout: float = 5.0) -> list[str]:
    """The model ids ``GET /v1/models`` lists at ``endpoint``.

    Raises:
        httpx.HTTPError: the request failed or did not answer 200.
        ValueError: the answer is not the OpenAI model list.
    """
    response = httpx.get(f"{endpoint}/v1/models", timeout=timeout)
    response.raise_for_status()
    return [str(model["id"]) for model in response.json()["data"]]


def _backend_running(status: DeploymentStatus) -> bool:
    """True when the active backend is running."""
    return status.active_state == "running"


def health_problem(status: DeploymentStatus, models: Callable[[str], list[str]] = served_models) -> str | None:
    """Why ``status`` is unhealthy (one line), or None when it is healthy."""
    problems = []
    if status.active is None:
        problems.append("no active backend container")
    elif not _backend_running(status):
        problems.append(f"active backend {status.active}")
    if status.health != "ready":
        problems.append(f"endpoint {status.stable_endpoint or '-'} {status.health}")
    elif status.stable_endpoint and status.served_model_name:
        try:
            listed = models(status.stable_endpoint)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"/v1/models failed ({type(exc).__name__})")
        else:
            if status.served_model_name not in listed:
                problems.append(f"/v1/models lists {listed}, not {status.served_model_name!r}")
    return "; ".join(problems) or None


def reconcile_deployments(
    statuses: Iterable[DeploymentStatus],
    known_specs: set[str],
    heal: Callable[[str], HealResult] | None,
    recheck: Callable[[str], str | None],
    models: Callable[[str], list[str]] = served_models,
) -> list[Finding]:
    """Check each deployment; heal the unhealthy ones whose spec exists; return one finding per deployment.

    Args:
        statuses: the deployments on the Docker host (``deployment_status``).
        known_specs: the spec names that exist (the specs directory).
        heal: runs the rollout for a spec name again; None only reports (a dry run).
        recheck: after a heal, why the deployment is still unhealthy, or None when it is healthy now.
        models: lists the models an endpoint serves (``served_models``).
    """
    findings = []
    for status in statuses:
        problem = health_problem(status, models)
        if problem is None:
            findings.append(Finding(status.name, HEALTHY, "none", "-"))
            continue
        state = f"unhealthy: {problem}"
        if status.name not in known_specs:
            findings.append(Finding(status.name, state, "report", f"no spec named {status.name!r}: left as it is"))
        elif heal is None:
            findings.append(Finding(status.name, state, "report", "heal disabled (dry run)"))
        else:
            outcome = heal(status.name)
            if not outcome.ok:
                findings.append(Finding(status.name, state, "heal", f"failed: {outcome.detail}"))
                continue
            still = recheck(status.name)
            result = f"healed: {outcome.detail}" if still is None else f"rollout completed, still unhealthy: {still}"
            findings.append(Finding(status.name, state, "heal", result))
    return findings


def refresh_in_use(statuses: Iterable[DeploymentStatus], mark: Callable[[DeploymentStatus], str | None]) -> list[str]:
    """Refresh the in-use marker of each deployment whose active backend runs with an engine; the failures.

    Args:
        mark: writes one deployment's marker (``record_in_use`` with its spec's store); returns
            None, or why it could not.
    """
    problems = []
    for status in statuses:
        if status.engine_key and _backend_running(status) and (problem := mark(status)):
            problems.append(problem)
    return problems


def as_table(findings: list[Finding]) -> list[dict[str, str]]:
    """The findings as rows for a Prefect table artifact (columns name, state, action, result)."""
    return [asdict(f) for f in findings]
