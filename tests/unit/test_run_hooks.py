"""host_model's crash hooks: both entrypoints undo what their run left when Prefect marks it Crashed or Cancelled.

Another branch edits the flows' decorators (parameters, slots); this keeps the hooks from being lost in a
merge. What the hook does is shown against real containers in tests/integration/test_crash_hygiene.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from nimflow.flows.host_model import host_model, host_on_checkpoint
from prefect import Flow

from nimflow.run_leftovers import undo_run_hook


@pytest.mark.parametrize("entrypoint", [host_model, host_on_checkpoint], ids=["host_model", "host_on_checkpoint"])
def test_both_entrypoints_undo_their_run_when_crashed_or_cancelled(entrypoint: Flow[..., Any]) -> None:
    """On old main (ee35de2) both lists were empty: a worker that saw the flow process die ran nothing."""
    assert undo_run_hook in entrypoint.on_crashed_hooks
    assert undo_run_hook in entrypoint.on_cancellation_hooks
