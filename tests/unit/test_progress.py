"""Transfer progress: counting from many threads, the progress line, throughput, and reporting outside a run."""

from __future__ import annotations

import logging
import threading

import pytest

from nimflow.progress import GIB, MIB, TransferProgress, transfer_progress


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_counts_from_many_threads_add_up() -> None:
    progress = TransferProgress("upload", "engine abc", total_bytes=8 * 1000 * 64, total_files=8)

    def worker() -> None:
        for _ in range(1000):
            progress.add_bytes(64)
        progress.file_done("f")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = progress.finish()
    assert (stats.bytes, stats.files) == (8 * 1000 * 64, 8)
    assert progress.percent() == 100.0


def test_line_and_throughput_follow_the_clock() -> None:
    clock = Clock()
    progress = TransferProgress("upload", "engine 3f2a9c1e04b7", total_bytes=2 * GIB, total_files=8, clock=clock)
    progress.add_bytes(GIB + GIB // 5)
    for _ in range(5):
        progress.file_done()
    clock.now += 6.0
    assert progress.line() == "upload engine 3f2a9c1e04b7: 1.2/2.0 GiB (60%), 5/8 files, 205 MiB/s"
    stats = progress.finish()
    clock.now += 100.0  # finished: the clock no longer counts
    assert progress.stats() == stats and stats.seconds == 6.0
    assert stats.mib_per_s == pytest.approx((GIB + GIB // 5) / MIB / 6.0)


def test_small_transfers_are_shown_in_mib_and_a_restart_counts_back() -> None:
    clock = Clock()
    progress = TransferProgress("restore", "engine x", total_bytes=40 * MIB, total_files=2, clock=clock)
    progress.add_bytes(30 * MIB)
    progress.add_bytes(-20 * MIB)  # a streamed GET cut short starts again
    clock.now += 1.0
    assert progress.line() == "restore engine x: 10.0/40.0 MiB (25%), 0/2 files, 10 MiB/s"


def test_unknown_byte_total_uses_files_and_empty_stage_is_complete() -> None:
    progress = TransferProgress("download", "org/m@abc", total_bytes=0, total_files=4)
    progress.file_done()
    assert progress.percent() == 25.0
    assert TransferProgress("upload", "nothing", 0, 0).percent() == 100.0


def test_report_only_when_something_moved() -> None:
    progress = TransferProgress("upload", "e", total_bytes=10, total_files=1)
    assert progress.changed_since_report()  # the first state is news
    assert not progress.changed_since_report()
    progress.add_bytes(1)
    assert progress.changed_since_report()


def test_sampler_sets_counts_and_a_failed_sample_keeps_the_last() -> None:
    samples: list[object] = [(5, 1), OSError("gone")]

    def sample() -> tuple[int, int]:
        value = samples.pop(0)
        if isinstance(value, Exception):
            raise value
        return value  # type: ignore[return-value]

    progress = TransferProgress("download", "r", total_bytes=10, total_files=2, sampler=sample)
    progress.refresh()
    progress.refresh()
    assert (progress.stats().bytes, progress.stats().files) == (5, 1)


def test_outside_a_prefect_run_the_final_line_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """No run context (the CLI, plain calls): no artifact, the log line still comes, at 100%."""
    with caplog.at_level(logging.INFO, logger="nimflow.progress"), \
            transfer_progress("upload", "engine e", total_bytes=3 * MIB, total_files=1, interval=3600) as progress:
        for _ in range(3 * 1024):  # one callback per KiB, as botocore calls them
            progress.add_bytes(1024)
        progress.file_done("a")
    lines = [r.getMessage() for r in caplog.records if r.name == "nimflow.progress"]
    # Throttled: thousands of callbacks inside one interval give no line of their own, only the final one.
    assert len(lines) == 1 and lines[0].startswith("upload engine e: 3.0/3.0 MiB (100%), 1/1 files")


@pytest.mark.filterwarnings("ignore:Artifact creation outside of a flow:FutureWarning")  # forced here on purpose
def test_an_unreachable_prefect_api_is_logged_once_and_the_transfer_goes_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The artifact cannot be created (nothing listens at the API URL): one warning, the counts still complete."""
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from nimflow import progress as progress_module
    from nimflow.testbed.services import free_port

    monkeypatch.setattr(progress_module, "_in_prefect_run", lambda: True)  # as inside a run: artifacts are tried
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api", PREFECT_CLIENT_MAX_RETRIES: 0}), \
            caplog.at_level(logging.INFO, logger="nimflow.progress"), \
            transfer_progress("restore", "engine e", total_bytes=2 * MIB, total_files=2, interval=3600) as progress:
        progress.add_bytes(2 * MIB)
        progress.file_done("a")
        progress.file_done("b")
    records = [r for r in caplog.records if r.name == "nimflow.progress"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not shown in the UI" in warnings[0]
    assert records[-1].getMessage().startswith("restore engine e: 2.0/2.0 MiB (100%), 2/2 files")
    assert progress.finish().bytes == 2 * MIB


def test_a_failed_transfer_gets_no_final_report(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nimflow.progress"), pytest.raises(RuntimeError), \
            transfer_progress("upload", "engine e", total_bytes=10, total_files=1, interval=3600) as progress:
        progress.add_bytes(5)
        raise RuntimeError("boom")
    assert not [r for r in caplog.records if r.name == "nimflow.progress"]
