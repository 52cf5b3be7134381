"""Retry policy shared by every task that talks to a network or a daemon.

Only transient faults are retried (see :mod:`nimflow.errors`); permanent ones fail the task at once.
"""

from __future__ import annotations

from typing import Any

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


def transient_retries() -> dict[str, Any]:
    """Task options: a few retries with exponential backoff and jitter, on transient faults only."""
    settings = get_settings()
    return {
        "retries": settings.max_retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=settings.retry_delay_seconds),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_on_transient,
    }
