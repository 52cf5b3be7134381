"""Per-spec queueing against a real Prefect API: the limit is created when missing, held for the run, released."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency

from nimflow.spec_concurrency import ensure_spec_limit, one_run_per_spec, spec_limit_name

pytestmark = pytest.mark.testbed


def _active_slots(name: str) -> tuple[int, int]:
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    return limit.limit, limit.active_slots


def test_a_missing_limit_is_created_and_a_second_run_of_the_spec_waits(prefect_api: str, unique: str) -> None:
    name = spec_limit_name(f"queued-{unique}")
    with one_run_per_spec(f"queued-{unique}"):
        assert _active_slots(name) == (1, 1)
        # A second run of the same spec cannot get a slot while the first holds it.
        with pytest.raises(TimeoutError):
            with concurrency(name, occupy=1, timeout_seconds=2, strict=True):
                pass
        # Another spec is not held up.
        with one_run_per_spec(f"other-{unique}"):
            assert _active_slots(spec_limit_name(f"other-{unique}")) == (1, 1)
    assert _active_slots(name) == (1, 0)


def test_the_slot_is_released_when_the_run_fails(prefect_api: str, unique: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with one_run_per_spec(f"failing-{unique}"):
            raise RuntimeError("boom")
    assert _active_slots(spec_limit_name(f"failing-{unique}")) == (1, 0)


def test_an_existing_limit_is_kept_as_the_operator_set_it(prefect_api: str, unique: str) -> None:
    name = ensure_spec_limit(f"wide-{unique}")
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=2))
    with one_run_per_spec(f"wide-{unique}"):
        assert _active_slots(name) == (2, 1)
