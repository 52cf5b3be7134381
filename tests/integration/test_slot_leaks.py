"""Slots that cannot leak or hide (issue 15): a wait for a slot is logged, bounded, and frees a slot
whose holder is gone; ``nimflow doctor`` shows and frees leaked slots. Against real Prefect servers.

The restart test and the doctor tests start Prefect servers of their own (the restart one restarts
it; the doctor lists every nimflow limit on its server, so other tests' limits must not be there).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from prefect import flow
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Running

from nimflow.bootstrap import IN_MEMORY_LEASE_STORAGE, check_lease_storage
from nimflow.cli import main
from nimflow.errors import SlotWaitTimeout
from nimflow.slot_doctor import diagnose, holder_tag, inspect_limit, record_holder
from nimflow.spec_concurrency import ensure_spec_limit, one_run_per_spec, spec_limit_name
from nimflow.testbed import TestbedError
from nimflow.testbed.services import Service, start_prefect_server

pytestmark = pytest.mark.testbed

#: A generous bound for a wait that must end (a run that hangs on old main is stopped waiting here).
WAIT_BOUND_SECONDS = 150


class OwnPrefect:
    """A Prefect server of this test's own, which it may restart (same port, same database)."""

    def __init__(self, root: Path) -> None:
        self.home, self.logs = root / "prefect", root / "logs"
        self.service: Service = start_prefect_server(self.home, self.logs)

    def restart(self) -> None:
        """Stop the server and start it again on its port: its in-memory lease storage starts empty."""
        port = int(self.service.url.rsplit(":", 1)[1].split("/")[0])
        self.service.stop()
        self.service = start_prefect_server(self.home, self.logs, port=port)


def _own_prefect(root: Path) -> Iterator[OwnPrefect]:
    try:
        server = OwnPrefect(root)
    except TestbedError as exc:
        pytest.fail(f"no Prefect server: {exc}") if _ci() else pytest.skip(f"no Prefect server: {exc}")
    with temporary_settings(updates={PREFECT_API_URL: server.service.url}):
        try:
            yield server
        finally:
            APILogHandler().flush()
    server.service.stop()


def _ci() -> bool:
    import os

    return bool(os.environ.get("CI"))


@pytest.fixture
def restartable_prefect(tmp_path: Path) -> Iterator[OwnPrefect]:
    yield from _own_prefect(tmp_path)


@pytest.fixture(scope="module")
def doctor_prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnPrefect]:
    yield from _own_prefect(tmp_path_factory.mktemp("doctor"))


def _in_thread(target: Callable[[], Any]) -> Callable[[float], tuple[bool, Any]]:
    """Run ``target`` in a daemon thread; the returned join(bound) says (finished, result or exception).

    The thread runs in a copy of this context: Prefect's settings (the API URL) live in context variables,
    and a thread without them would start a throwaway server of its own.
    """
    outcome: dict[str, Any] = {}
    context = contextvars.copy_context()

    def run() -> None:
        try:
            outcome["value"] = context.run(target)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["value"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join(bound: float) -> tuple[bool, Any]:
        thread.join(bound)
        return not thread.is_alive(), outcome.get("value")

    return join


def _run_logs(flow_run_id: UUID, expected: str) -> str:
    """The run's log messages once one contains ``expected`` (logs reach the API in batches), or as they are after a bound."""
    APILogHandler().flush()
    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        text = "\n".join(log.message for log in logs)
        if expected in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def test_after_a_server_restart_the_next_run_logs_its_wait_and_frees_the_slot_of_the_gone_holder(
    restartable_prefect: OwnPrefect, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 item 2: the server restarts while a run holds its spec's slot (in-memory lease storage).

    Checked on old main (ee35de2) with this test: the holder's release found no lease, the limit stayed
    at 1/1, and the next run of the spec was still waiting, silent, after the 150 s bound
    ("the next run still waits for the slot"): it waited forever.
    """
    monkeypatch.setenv("NIMFLOW_SLOT_WAIT_LOG_SECONDS", "1")
    spec = f"restart-{unique}"
    name = spec_limit_name(spec)
    ids: dict[str, UUID] = {}

    @flow(name="slot-holder")
    def holder() -> None:
        ids["holder"] = flow_run.get_id()  # type: ignore[assignment]
        with one_run_per_spec(spec):
            restartable_prefect.restart()

    @flow(name="slot-waiter")
    def waiter() -> str:
        ids["waiter"] = flow_run.get_id()  # type: ignore[assignment]
        with one_run_per_spec(spec):
            return "hosted"

    holder()
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 1  # the leak, reproduced

    finished, result = _in_thread(waiter)(WAIT_BOUND_SECONDS)
    assert finished, "the next run still waits for the slot"
    assert result == "hosted", result
    logs = _run_logs(ids["waiter"], "Freed a slot")
    assert f"Waiting for 1 slot(s) of {name} (1/1 in use), held by flow run" in logs, logs
    assert "Freed a slot whose holder is gone" in logs, logs
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


def test_a_wait_behind_a_running_holder_times_out_naming_the_limit_the_holder_and_the_way_out(
    prefect_api: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 item 2/3: a run queued behind a live holder fails after its timeout, and never frees
    the slot of a Running holder.

    Checked on old main (ee35de2): the waiting subflow never returned (no timeout, no log line); the
    test's 150 s bound ended it ("the waiting run neither got the slot nor timed out").
    """
    monkeypatch.setenv("NIMFLOW_SLOT_WAIT_LOG_SECONDS", "1")
    monkeypatch.setenv("NIMFLOW_SLOT_WAIT_TIMEOUT_SECONDS", "10")
    spec = f"busy-{unique}"
    name = spec_limit_name(spec)

    @flow(name="slot-waiter")
    def waiter() -> None:
        with one_run_per_spec(spec):
            pass

    @flow(name="slot-holder", flow_run_name=f"holder-{unique}")
    def holder() -> str:
        with one_run_per_spec(spec):
            try:
                waiter()
            except SlotWaitTimeout as exc:
                with get_client(sync_client=True) as client:
                    still = client.read_global_concurrency_limit_by_name(name).active_slots
                return f"{still} {exc}"
            return "the waiting run got a slot its Running holder held"

    finished, result = _in_thread(holder)(WAIT_BOUND_SECONDS)
    assert finished, "the waiting run neither got the slot nor timed out"
    assert isinstance(result, str), result
    assert result.startswith("1 "), result  # the Running holder's slot was left alone
    assert name in result and f"holder-{unique}" in result and "Running" in result, result
    assert "`nimflow doctor --free`" in result, result


def _leave_a_leaked_slot(client: SyncPrefectClient, spec: str, state: Any = None) -> UUID:
    """A flow run recorded as holder of the spec's slot, the slot taken without a lease: the state a
    server restart leaves (the lease gone, ``active_slots`` still counting it). Returns the run's id."""

    @flow(name="slot-holder-gone")
    def ended() -> UUID:
        return flow_run.get_id()  # type: ignore[return-value]

    name = ensure_spec_limit(spec)
    if state is None:
        run_id = ended()
    else:
        run_id = client.create_flow_run(ended, state=state).id
    client.increment_concurrency_slots([name], 1, mode="concurrency")  # a slot with no lease
    record_holder(client, run_id, name, 1, uuid4())  # its lease: one the server does not have
    return run_id


def test_doctor_lists_holders_fails_on_a_leak_and_free_frees_only_the_gone_holder(
    doctor_prefect: OwnPrefect, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15 item 4: `nimflow doctor` shows each nimflow limit with its holders, exits 1 on a leaked
    slot, and `--free` frees the gone holder's slot but not a Running holder's.

    Checked on old main (ee35de2): `nimflow doctor` did not exist (argparse: invalid choice, exit 2).
    """
    with get_client(sync_client=True) as client:
        gone = _leave_a_leaked_slot(client, f"gone-{unique}")
        live = _leave_a_leaked_slot(client, f"live-{unique}", state=Running())
    gone_limit, live_limit = spec_limit_name(f"gone-{unique}"), spec_limit_name(f"live-{unique}")

    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert f"{gone_limit}: 1/1 slot(s) in use" in out and f"({gone}) Completed" in out, out
    assert f"{live_limit}: 1/1 slot(s) in use" in out and f"({live}) Running" in out, out
    assert f"leaked: {gone_limit}:" in out and "run `nimflow doctor --free`" in out, out
    assert f"leaked: {live_limit}" not in out, out

    with get_client(sync_client=True) as client:
        report = diagnose(client, free=True, lease_seconds=300, grace_seconds=0.5)
        assert any(line.startswith(f"{gone_limit}: freed 1 slot(s)") for line in report.freed), report.freed
        after_gone, after_live = inspect_limit(client, gone_limit), inspect_limit(client, live_limit)
        assert (after_gone.active_slots, after_gone.holders) == (0, ())
        assert holder_tag(gone_limit) not in client.read_flow_run(gone).tags
        assert after_live.active_slots == 1 and [h.flow_run_id for h in after_live.holders] == [live]
    assert main(["doctor"]) == 0, capsys.readouterr().out  # the Running holder is no leak
    assert "no leaked slots" in capsys.readouterr().out


def test_doctor_free_from_the_command_line(doctor_prefect: OwnPrefect, unique: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`nimflow doctor --free` frees a gone holder's slot and exits 0; output has no traceback.

    Checked on old main (ee35de2): no `doctor` command (exit 2).
    """
    with get_client(sync_client=True) as client:
        _leave_a_leaked_slot(client, f"cli-{unique}")
    name = spec_limit_name(f"cli-{unique}")
    assert main(["doctor", "--free"]) == 0
    out = capsys.readouterr().out
    assert f"freed: {name}: freed 1 slot(s)" in out and "Traceback" not in out, out
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


def test_doctor_without_a_server_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """No PREFECT_API_URL: one line naming the setting, exit 2, no traceback."""
    with temporary_settings(updates={PREFECT_API_URL: ""}):
        assert main(["doctor"]) == 2
    err = capsys.readouterr().err
    assert "PREFECT_API_URL" in err and "nimflow doctor" in err and "Traceback" not in err, err


def test_bootstrap_warns_that_the_servers_lease_storage_is_in_memory(prefect_api: str) -> None:
    """Issue 15 item 5: the test server runs Prefect's default lease storage; bootstrap's check reads it
    from the server's /admin/settings and warns, naming the setting that fixes it.

    Checked on old main (ee35de2): bootstrap had no such check (nimflow.bootstrap.check_lease_storage missing).
    """
    with get_client(sync_client=True) as client:
        module, result = check_lease_storage(client)
    assert module == IN_MEMORY_LEASE_STORAGE
    assert result.startswith("warning: in memory") and "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE" in result, result
