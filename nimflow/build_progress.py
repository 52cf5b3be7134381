"""Progress of an engine build, read from the build container's log: its phase, rank and a percentage.

A TensorRT-LLM build runs for minutes to over an hour, and most of that time is one long
phase (TensorRT timing kernels) with little output. nimflow follows the build container's log
and recognises the lines TensorRT-LLM's builder prints for each rank, in order (from
``tensorrt_llm/builder.py`` and ``tensorrt_llm/commands/build.py``, and TensorRT's own
``Engine generation completed`` line)::

    [TRT-LLM] [I] Total time of constructing network from module object 2.36 seconds
    [TRT-LLM] [I] Total time to initialize the weights in network Unnamed Network 0: 00:00:00
    [TRT-LLM] [I] Build TensorRT engine Unnamed Network 0
    [TRT] [I] Engine generation completed in 5.37531 seconds.
    [TRT-LLM] [I] Serializing engine to /out/rank0.engine...
    [TRT-LLM] [I] Engine serialized. Total time: 00:00:00
    [TRT-LLM] [I] Total time of building all engines: 00:00:11

plus ``Loading checkpoint shards: 40%`` (transformers) and ``Total time of converting
checkpoints`` (``convert_checkpoint.py``). Every backend runs TensorRT-LLM's builder, so the same
lines serve all three; a build that prints none of them (another NIM version) still gets its
step, elapsed time and a line every :data:`STILL_RUNNING_SECONDS`, never a made-up percentage.

:func:`build_progress` reports it through :mod:`nimflow.progress` as the ``nimflow-build-<spec>``
progress artifact and periodic log lines such as::

    build engine 3f2a9c1e04b7: trtllm-build, optimizing the engine (TensorRT), rank 2/4 (52%), 6m10s
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from nimflow.progress import REPORT_INTERVAL_SECONDS, StageClock, reporting

#: Without any new phase, a build is still reported this often (seconds), so it never looks hung.
STILL_RUNNING_SECONDS = 60.0


@dataclass(frozen=True)
class BuildStep:
    """One container a backend runs, and its share of the whole build."""

    name: str
    weight: float
    ranked: bool  # prints the builder's per-rank lines (convert_checkpoint.py does not)


#: The containers each backend runs, in order. convert_checkpoint.py only rewrites the weights;
#: the builder's kernel timing dominates a build.
BACKEND_STEPS: dict[str, tuple[BuildStep, ...]] = {
    "trtllm-build": (BuildStep("convert_checkpoint.py", 0.2, ranked=False), BuildStep("trtllm-build", 0.8, ranked=True)),
    "nim-optimize": (BuildStep("nim-optimize", 1.0, ranked=True),),
    "nim-jit": (BuildStep("NIM JIT build", 1.0, ranked=True),),
}

#: Builder lines of one rank, in the order it prints them: (pattern, phase from then on, share of the rank done).
_RANK_MARKS: tuple[tuple[re.Pattern[str], str, float], ...] = (
    (re.compile(r"Total time of constructing network from module object"), "loading weights into the network", 0.10),
    (re.compile(r"Total time to initialize the weights in network"), "weights loaded", 0.20),
    (re.compile(r"Build TensorRT engine |Building Engine for rank"), "optimizing the engine (TensorRT)", 0.25),
    (re.compile(r"Engine generation completed in"), "engine generated", 0.85),
    (re.compile(r"Serializing engine to "), "writing the engine", 0.90),
)
_RANK_DONE = re.compile(r"Engine serialized\. Total time")
_STEP_DONE = re.compile(r"Total time of building all engines|Total time of converting checkpoints")
_SHARDS = re.compile(r"Loading checkpoint shards:\s*(\d{1,3})%")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


class BuildProgress:
    """Where a build is, from its log lines (fed from any thread), as a phase and a percentage.

    Args:
        subject: what is built, e.g. ``engine 3f2a9c1e04b7``.
        backend: the build backend (:data:`BACKEND_STEPS`).
        ranks: engine ranks the build writes (tp_size x pp_size).
        clock: seconds, monotonic (tests pass their own).
    """

    stage = "build"

    def __init__(self, subject: str, backend: str, ranks: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.subject, self.ranks = subject, max(1, ranks)
        self.steps = BACKEND_STEPS[backend]
        self._clock = clock
        self._timer = StageClock(clock)
        self._lock = threading.Lock()
        self._step = 0  # steps before it are done
        self._ranks_done = 0
        self._rank_share = 0.0  # of the rank being built
        self._phase = "starting"
        self._percent = 0.0
        self._complete = False
        self._reported: tuple[object, ...] | None = None
        self._reported_at = clock()

    # --- fed by the build ----------------------------------------------------------------------
    def start_step(self, name: str) -> None:
        """The next container (``name`` as in :data:`BACKEND_STEPS`) starts; earlier steps count as done."""
        with self._lock:
            index = next((i for i, step in enumerate(self.steps) if step.name == name), self._step)
            self._step, self._ranks_done, self._rank_share, self._phase = index, 0, 0.0, "starting"
            self._update()

    def step_done(self) -> None:
        """The current container exited 0."""
        with self._lock:
            self._ranks_done, self._rank_share, self._phase = self.ranks, 0.0, "done"
            self._update()

    def feed(self, line: str) -> None:
        """Take one line the build container printed. Thread-safe; unknown lines are ignored."""
        with self._lock:
            if _RANK_DONE.search(line):
                self._ranks_done = min(self.ranks, self._ranks_done + 1)
                self._rank_share, self._phase = 0.0, "engine written"
            elif _STEP_DONE.search(line):
                self._ranks_done, self._rank_share, self._phase = self.ranks, 0.0, "done"
            elif shards := _SHARDS.search(line):
                share = min(100, int(shards.group(1))) / 100
                self._rank_share = max(self._rank_share, share * (0.9 if not self.steps[self._step].ranked else 0.1))
                self._phase = f"loading checkpoint shards {shards.group(1)}%"
            else:
                for pattern, phase, share in _RANK_MARKS:
                    if pattern.search(line):
                        self._rank_share, self._phase = share, phase
                        break
                else:
                    return
            self._update()

    def complete(self) -> None:
        """The whole build succeeded: 100%."""
        with self._lock:
            self._complete, self._phase, self._percent = True, "done", 100.0

    def _update(self) -> None:
        done = sum(step.weight for step in self.steps[: self._step])
        within = min(1.0, (self._ranks_done + self._rank_share) / self.ranks)
        # Never backwards, and never 100 before the build is known to have succeeded.
        self._percent = max(self._percent, min(99.0, 100.0 * (done + self.steps[self._step].weight * within)))

    # --- read by the reporter (nimflow.progress.Reportable) --------------------------------------
    def percent(self) -> float:
        with self._lock:
            return self._percent

    def elapsed(self) -> float:
        return self._timer.seconds()

    def phase(self) -> str:
        with self._lock:
            return self._phase

    def line(self) -> str:
        """E.g. ``build engine 3f2a…: trtllm-build, optimizing the engine (TensorRT), rank 2/4 (52%), 6m10s``."""
        with self._lock:
            step, phase, percent = self.steps[self._step], self._phase, self._percent
            rank = min(self.ranks, self._ranks_done + 1)
            complete = self._complete
        where = "" if complete or not step.ranked or self.ranks == 1 or phase == "done" else f", rank {rank}/{self.ranks}"
        what = "done" if complete else f"{step.name}, {phase}{where}"
        return f"build {self.subject}: {what} ({percent:.0f}%), {_duration(self.elapsed())}"

    def refresh(self) -> None:
        """Nothing to sample: the log follower pushes lines."""

    def changed_since_report(self) -> bool:
        """True when the phase, rank or percentage changed, or :data:`STILL_RUNNING_SECONDS` passed."""
        now = self._clock()
        with self._lock:
            state = (self._step, self._phase, self._ranks_done, round(self._percent), self._complete)
            due = state != self._reported or now - self._reported_at >= STILL_RUNNING_SECONDS
            if due:
                self._reported, self._reported_at = state, now
        return due

    def finish(self) -> float:
        """Stop the clock; the build's seconds."""
        self._timer.stop()
        return self._timer.seconds()


@contextmanager
def build_progress(subject: str, backend: str, ranks: int, *,
                   interval: float = REPORT_INTERVAL_SECONDS) -> Iterator[BuildProgress]:
    """Report a build's phase while the block runs (``nimflow-build-<spec>`` artifact and log lines); 100% once it completes.

    Yields:
        The tracker: call :meth:`BuildProgress.start_step` as each container starts, pass
        :meth:`BuildProgress.feed` as the container's log-line callback, :meth:`BuildProgress.step_done`
        when it exits 0.
    """
    progress = BuildProgress(subject, backend, ranks)
    with reporting(progress, interval):
        yield progress
        progress.complete()
