"""What ``nimflow doctor`` and a waiting run say about a limit's slots (no server needed)."""

from __future__ import annotations

from datetime import datetime, timezone
from uuid import UUID

import pytest

from nimflow.errors import ConfigError
from nimflow.settings import Settings
from nimflow.slot_doctor import DoctorReport, LimitSlots, SlotHolder

RUN = UUID("00000000-0000-0000-0000-000000000001")


def _holder(state: str = "Running", ended: bool = False, slots: int = 1) -> SlotHolder:
    return SlotHolder(RUN, "tiny@706dadd", state, ended, slots, datetime(2026, 12, 3, 16, 4, 30, tzinfo=timezone.utc), None)


def test_a_holder_is_named_with_its_run_state_slots_and_since() -> None:
    assert _holder().describe() == f"flow run 'tiny@706dadd' ({RUN}) Running, 1 slot(s) since 2026-12-03 16:04:30 UTC"


def test_slots_no_record_accounts_for_are_called_out() -> None:
    view = LimitSlots("nimflow-spec-tiny", 2, 2, True, (_holder(),))
    assert view.unaccounted == 1 and view.gone == []
    assert "1 slot(s) with no recorded holder" in view.describe_holders()
    lost = view.describe_holders(["flow run 'old' (x) Completed, 1 slot(s)"])
    assert "flow run 'old' (x) Completed, 1 slot(s) (ended, its lease lost" in lost
    assert LimitSlots("nimflow-spec-tiny", 1, 0, True).describe_holders() == "nobody"


def test_an_ended_holder_is_gone() -> None:
    view = LimitSlots("nimflow-spec-tiny", 1, 1, True, (_holder("Crashed", ended=True),))
    assert [h.state for h in view.gone] == ["Crashed"] and view.unaccounted == 0


def test_the_report_says_what_to_run_and_when_all_is_well() -> None:
    view = LimitSlots("nimflow-gpus-a", 8, 1, True, (_holder("Crashed", ended=True),))
    found = DoctorReport([view], leaks=["nimflow-gpus-a: ... ended but still holds its slot(s)"]).render()
    assert found.splitlines()[0] == "nimflow-gpus-a: 1/8 slot(s) in use"
    assert "leaked: nimflow-gpus-a" in found and found.endswith("run `nimflow doctor --free` to free the leaked slots")
    assert DoctorReport([LimitSlots("nimflow-gpus-a", 8, 0, False)]).render() == (
        "nimflow-gpus-a: 0/8 slot(s) in use (inactive: holds nobody back)\nno leaked slots")
    assert "no nimflow concurrency limits" in DoctorReport().render()


@pytest.mark.parametrize("variable", ["NIMFLOW_SLOT_WAIT_TIMEOUT_SECONDS", "NIMFLOW_SLOT_WAIT_LOG_SECONDS"])
def test_slot_wait_settings_are_checked(variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: "0"})
    defaults = Settings.from_env({})
    assert (defaults.slot_wait_timeout_seconds, defaults.slot_wait_log_seconds) == (4 * 3600, 60)
