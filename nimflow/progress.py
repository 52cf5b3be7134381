"""Progress of long transfers and builds, shown while they run: a Prefect progress artifact and a periodic log line.

Moving tens of GB must not look like a hang. A :class:`TransferProgress` counts the bytes and files
of one stage (download, upload, restore) from any number of worker threads; a reporter thread
writes, every ``interval`` seconds while something changed, one concise log line::

    upload engine 3f2a9c1e04b7: 1.2/2.0 GiB (60%), 5/8 files, 210 MiB/s

and updates the stage's progress artifact in the Prefect UI (Prefect's own
``create_progress_artifact`` / ``update_progress_artifact``). Outside a Prefect run (the CLI's own
commands, plain function calls) only the log line is written. Reporting never fails a transfer:
an unreachable Prefect API is logged once and then left alone.

The stage's :class:`~nimflow.records.TransferStats` (bytes, files, seconds, MiB/s) go into the
flow's record. Anything with the :class:`Reportable` methods can be reported the same way
(:func:`reporting`): an engine build's phases (:mod:`nimflow.build_progress`) are.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, cast
from uuid import UUID

from nimflow.records import TransferStats
from nimflow.run_names import artifact_key

#: Seconds between two progress reports (log line and artifact update) of one transfer.
REPORT_INTERVAL_SECONDS = 5.0
GIB = 1 << 30
MIB = 1 << 20

_fallback_logger = logging.getLogger("nimflow.progress")

#: The spec whose run reports progress (see :func:`artifacts_for`); empty outside one.
_artifact_scope: contextvars.ContextVar[str] = contextvars.ContextVar("nimflow_artifact_scope", default="")


@contextmanager
def artifacts_for(spec_name: str) -> Iterator[None]:
    """Key the progress artifacts reported in this block by ``spec_name``: ``nimflow-<stage>-<spec_name>``.

    Without it every model's download would be a new version of one ``nimflow-download`` artifact.
    A context variable: tasks called in the block and the reporter threads (started in a copy of
    the context) see it; nested blocks (a heal run inside reconcile) restore the outer one after.
    """
    token = _artifact_scope.set(spec_name)
    try:
        yield
    finally:
        _artifact_scope.reset(token)


def progress_artifact_key(stage: str) -> str:
    """The progress artifact's key for ``stage``: ``nimflow-<stage>-<spec>`` in a spec's run, else ``nimflow-<stage>``."""
    return artifact_key("nimflow", stage, _artifact_scope.get())


def _run_logger() -> Any:
    """The Prefect run's logger (its lines reach the UI), or a plain logger outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return _fallback_logger


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


class StageClock:
    """The wall time of one stage: running from creation until :meth:`stop` (later calls keep the first stop)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._ended: float | None = None

    def stop(self) -> None:
        if self._ended is None:
            self._ended = self._clock()

    def seconds(self) -> float:
        """Seconds so far, or in all once stopped."""
        end = self._ended if self._ended is not None else self._clock()
        return max(0.0, end - self._started)


class TransferProgress:
    """Bytes and files of one transfer stage, counted from any thread, reported periodically.

    Args:
        stage: ``download``, ``upload`` or ``restore``.
        subject: what moves, e.g. ``engine 3f2a9c1e04b7`` (never a secret or a signed URL).
        total_bytes: bytes the stage will move (0 when unknown).
        total_files: files the stage will move.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, stage: str, subject: str, total_bytes: int, total_files: int, *,
                 clock: Callable[[], float] = time.monotonic,
                 sampler: Callable[[], tuple[int, int]] | None = None) -> None:
        self.stage, self.subject = stage, subject
        self.total_bytes, self.total_files = total_bytes, total_files
        self._timer = StageClock(clock)
        self._sampler = sampler
        self._lock = threading.Lock()
        self._bytes = 0
        self._files = 0
        self._reported: tuple[int, int] | None = None

    def add_bytes(self, count: int) -> None:
        """Count ``count`` more bytes moved (negative: an attempt restarted). Thread-safe."""
        with self._lock:
            self._bytes = max(0, self._bytes + count)

    def file_done(self, _path: str = "") -> None:
        """Count one more file finished. Thread-safe."""
        with self._lock:
            self._files += 1

    def refresh(self) -> None:
        """Take bytes and files from the sampler, for transfers that report no callbacks (a library's
        download measured on disk). Never raises: a failed sample keeps the last counts."""
        if self._sampler is None:
            return
        try:
            moved, files = self._sampler()
        except OSError:
            return
        with self._lock:
            self._bytes, self._files = moved, files

    def finish(self) -> TransferStats:
        """Stop the clock; the stage's totals and throughput."""
        self._timer.stop()
        return self.stats()

    def stats(self) -> TransferStats:
        """Bytes, files and seconds so far (or in all, once finished)."""
        with self._lock:
            moved, files = self._bytes, self._files
        return TransferStats(stage=self.stage, bytes=moved, files=files, seconds=round(self._timer.seconds(), 3))

    def percent(self) -> float:
        """Bytes moved of the total, 0-100 (files when no byte total is known)."""
        with self._lock:
            moved, files = self._bytes, self._files
        if self.total_bytes > 0:
            return min(100.0, 100.0 * moved / self.total_bytes)
        if self.total_files > 0:
            return min(100.0, 100.0 * files / self.total_files)
        return 100.0

    def line(self) -> str:
        """The concise progress line, e.g. ``upload engine 3f2a…: 1.2/2.0 GiB (60%), 5/8 files, 210 MiB/s``."""
        stats = self.stats()
        scale, unit = (GIB, "GiB") if max(self.total_bytes, stats.bytes) >= GIB // 10 else (MIB, "MiB")
        amount = f"{stats.bytes / scale:.1f}" + (f"/{self.total_bytes / scale:.1f}" if self.total_bytes else "")
        return (f"{self.stage} {self.subject}: {amount} {unit} ({self.percent():.0f}%), "
                f"{stats.files}/{self.total_files} files, {stats.mib_per_s:.0f} MiB/s")

    def changed_since_report(self) -> bool:
        """True when bytes or files moved since the last report (and marks this state reported)."""
        with self._lock:
            now = (self._bytes, self._files)
            changed, self._reported = now != self._reported, now
        return changed


class Reportable(Protocol):
    """What the reporter needs of a stage's progress; every method is called from the reporter's thread."""

    stage: str  # the artifact's key is nimflow-<stage>-<spec> (progress_artifact_key)

    def line(self) -> str:
        """The concise progress line (log line and artifact description)."""

    def percent(self) -> float:
        """0-100."""

    def refresh(self) -> None:
        """Update counts that are sampled rather than pushed; never raises."""

    def changed_since_report(self) -> bool:
        """True when a report is due (and marks the current state reported)."""

    def finish(self) -> Any:
        """Stop the clock (on every path, success or not)."""


class _Reporter:
    """Writes a stage's log line and artifact update every interval, from its own thread."""

    def __init__(self, progress: Reportable, interval: float) -> None:
        self.progress = progress
        self.interval = interval
        self.logger = _run_logger()
        self.artifact: UUID | None = None
        self.artifact_failed = False
        self._stop = threading.Event()
        # The thread runs in a copy of this context: a new thread starts with empty contextvars, and
        # Prefect keeps its settings (the API URL) and the run's logger context in contextvars.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._loop,),
                                        name=f"nimflow-progress-{progress.stage}", daemon=True)
        if _in_prefect_run():
            # Created here, in the run's own thread: the artifact belongs to this task run.
            self._artifact_call("create", 0.0)
        self._thread.start()

    def _artifact_call(self, action: str, value: float) -> None:
        if self.artifact_failed:
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        description = self.progress.line()
        try:
            # _sync: the blocking call even where an event loop runs (an async flow), never a coroutine.
            if action == "create":
                created = create_progress_artifact(  # type: ignore[call-arg]  # _sync: see above
                    progress=value, key=progress_artifact_key(self.progress.stage), description=description, _sync=True
                )
                self.artifact = cast(UUID, created)
            elif self.artifact is not None:
                update_progress_artifact(  # type: ignore[call-arg]  # _sync: see above
                    self.artifact, progress=value, description=description, _sync=True
                )
        except Exception as exc:  # noqa: BLE001 - progress is for watching; the transfer goes on
            self.artifact_failed = True
            self.logger.warning("Progress of %s is not shown in the UI (%s)", self.progress.stage, type(exc).__name__)

    def report(self) -> None:
        self.logger.info("%s", self.progress.line())
        self._artifact_call("update", self.progress.percent())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.progress.refresh()
            if self.progress.changed_since_report():
                self.report()

    def close(self, completed: bool) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 30)
        if completed:
            self.progress.refresh()
            self.report()  # the final state: 100% when every byte moved


@contextmanager
def transfer_progress(stage: str, subject: str, total_bytes: int, total_files: int, *,
                      interval: float = REPORT_INTERVAL_SECONDS,
                      sampler: Callable[[], tuple[int, int]] | None = None) -> Iterator[TransferProgress]:
    """Count one transfer stage and report it while it runs; a final report once it completed.

    Args:
        sampler: for a transfer without callbacks: returns (bytes, files) so far, asked before each report.

    Yields:
        The counter: pass ``add_bytes`` / ``file_done`` as the transfer's callbacks, and read
        :meth:`TransferProgress.finish` after the block for the stage's throughput.
    """
    progress = TransferProgress(stage, subject, total_bytes, total_files, sampler=sampler)
    with reporting(progress, interval):
        yield progress


@contextmanager
def reporting(progress: Reportable, interval: float = REPORT_INTERVAL_SECONDS) -> Iterator[None]:
    """Report ``progress`` every ``interval`` seconds while the block runs, and once more if it completes.

    The artifact (``nimflow-<stage>-<spec>``, :func:`progress_artifact_key`) is created at once when
    this runs inside a Prefect run.
    A block that raises gets no final report: its error says what happened.
    """
    reporter = _Reporter(progress, interval)
    completed = False
    try:
        yield
        completed = True
    finally:
        progress.finish()
        reporter.close(completed)
