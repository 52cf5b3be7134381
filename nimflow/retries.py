"""Retry policy shared by every task that talks to a network or a daemon.

Only transient faults are retried (see :mod:`nimflow.errors`); permanent ones fail the task at once.

How often and how soon come from ``NIMFLOW_MAX_RETRIES`` and ``NIMFLOW_RETRY_DELAY_SECONDS``
(checked by :mod:`nimflow.settings`). Prefect 3 fixes a task's retries when the ``Task`` object is
made: ``@task(...)`` runs at import, and turns ``retry_delay_seconds`` into a list there. A process
worker imports the flow afresh for each run, but a long-lived process (``nimflow host``, a served
flow, tests) would keep the values of its import. So the flow calls each task through
:func:`with_current_retries`, which makes the task's copy with the options of the environment now
(Prefect's ``Task.with_options``); the options given at decoration are the defaults for a task
called on its own. A bad value fails the import, or the run, with a ConfigError naming it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from prefect import Task
from prefect.tasks import exponential_backoff

from nimflow.errors import is_transient
from nimflow.settings import get_settings


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the task failed with a transient fault."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we only inspect it
        return is_transient(exc)
    return False


T = TypeVar("T", bound=Task[Any, Any])


def transient_retries() -> dict[str, Any]:
    """Task options: a few retries with exponential backoff and jitter, on transient faults only.

    Raises:
        ConfigError: NIMFLOW_MAX_RETRIES or NIMFLOW_RETRY_DELAY_SECONDS is not a number in range.
    """
    settings = get_settings()
    return {
        "retries": settings.max_retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=settings.retry_delay_seconds),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_on_transient,
    }


def with_current_retries(task: T) -> T:
    """``task`` with :func:`transient_retries` as the environment says now, for one call in a flow.

    Raises:
        ConfigError: NIMFLOW_MAX_RETRIES or NIMFLOW_RETRY_DELAY_SECONDS is not a number in range.
    """
    return task.with_options(**transient_retries())  # type: ignore[return-value]
