"""Per-spec queueing against a real Prefect API: the limit is created when missing, held for the run, released."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency

from nimflow.spec import HostingSpec, parse_spec
from nimflow.spec_concurrency import (
    ensure_spec_limit,
    gpu_limit_name,
    gpus_used,
    host_gpu_slots,
    one_run_per_spec,
    spec_limit_name,
)

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


def _spec(**deploy: object) -> HostingSpec:
    return parse_spec({
        "name": "gpu-slots", "source": {"repo_id": "org/model"},
        "deploy": {"image": "nim:1", "served_model_name": "m", "cache_dir": "/tmp/c", **deploy},
        "rollout": {"strategy": "recreate"},
    })


def test_gpus_used_counts_the_largest_container_and_a_blue_green_candidate() -> None:
    assert gpus_used(_spec(), 8) == 0  # no GPUs: nothing to hold
    assert gpus_used(_spec(gpus=[0, 1]), 8) == 2
    assert gpus_used(_spec(gpus="all"), 8) == 8
    blue_green = parse_spec({**_spec(gpus=[0, 1]).model_dump(mode="json"), "rollout": {"strategy": "blue-green"}})
    assert gpus_used(blue_green, 8) == 4  # the candidate loads beside the serving container
    assert gpus_used(blue_green, 3) == 3  # never more than the host has


def test_a_run_holds_its_gpu_slots_of_this_host_only_where_the_fleet_set_a_limit(
    prefect_api: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIMFLOW_HOST_NAME", f"gpu-host-{unique}")  # settings are read on each call
    spec = _spec(gpus=[0, 1])
    with host_gpu_slots(spec) as held:  # no limit for this host yet: nothing is held
        assert held == 0
    name = gpu_limit_name(f"gpu-host-{unique}")
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=3))
    with host_gpu_slots(spec) as held:
        assert held == 2 and _active_slots(name) == (3, 2)
        with pytest.raises(TimeoutError):  # another 2-GPU run on this host waits
            with concurrency(name, occupy=2, timeout_seconds=2, strict=True):
                pass
    assert _active_slots(name) == (3, 0)
