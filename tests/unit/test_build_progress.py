"""A build's phase and percentage, read from the lines TensorRT-LLM prints while it builds.

The log below is one rank of a real ``trtllm-build`` run (TensorRT-LLM 0.20, as posted publicly in a
GitHub issue), trimmed of its ``Set <plugin> to <value>`` lines.
"""

from __future__ import annotations

import pytest

from nimflow.build_progress import STILL_RUNNING_SECONDS, BuildProgress

REAL_RANK_LOG = """\
[TensorRT-LLM] TensorRT-LLM version: 0.20.0
[08/27/2025-09:13:59] [TRT-LLM] [I] Set dtype to float16.
[08/27/2025-09:14:00] [TRT] [I] [MemUsageChange] Init CUDA: CPU +26, GPU +0, now: CPU 296, GPU 424 (MiB)
[08/27/2025-09:14:03] [TRT-LLM] [I] Total time of constructing network from module object 3.822653293609619 seconds
[08/27/2025-09:14:03] [TRT-LLM] [I] Total optimization profiles added: 1
[08/27/2025-09:14:03] [TRT-LLM] [I] Total time to initialize the weights in network Unnamed Network 0: 00:00:00
[08/27/2025-09:14:03] [TRT-LLM] [I] Build TensorRT engine Unnamed Network 0
[08/27/2025-09:14:10] [TRT] [I] Global timing cache in use. Profiling results in this builder pass will be stored.
[08/27/2025-09:14:16] [TRT] [I] Detected 17 inputs and 1 output network tensors.
[08/27/2025-09:14:20] [TRT] [I] Engine generation completed in 9.17555 seconds.
[08/27/2025-09:14:20] [TRT-LLM] [I] Total time of building Unnamed Network 0: 00:00:16
[08/27/2025-09:14:20] [TRT-LLM] [I] Serializing engine to /workspace/test_model/engine_dual_gpu/rank0.engine...
[08/27/2025-09:14:21] [TRT-LLM] [I] Engine serialized. Total time: 00:00:00
"""
FINAL_LINE = "[08/27/2025-09:14:26] [TRT-LLM] [I] Total time of building all engines: 00:00:37"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def trace(progress: BuildProgress, lines: str) -> list[tuple[str, float]]:
    """(phase, percent) after each line."""
    seen = []
    for line in lines.splitlines():
        progress.feed(line)
        seen.append((progress.phase(), progress.percent()))
    return seen


def test_a_real_single_rank_log_walks_through_the_phases_in_order() -> None:
    progress = BuildProgress("engine 3f2a9c1e04b7", "nim-optimize", ranks=1)
    seen = trace(progress, REAL_RANK_LOG)

    phases = [phase for phase, _ in seen]
    order = ["loading weights into the network", "weights loaded", "optimizing the engine (TensorRT)",
             "engine generated", "writing the engine", "engine written"]
    assert [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]] == ["starting", *order]
    percents = [percent for _, percent in seen]
    assert percents == sorted(percents) and percents[0] == 0.0
    at_optimize = percents[phases.index("optimizing the engine (TensorRT)")]
    assert 20 <= at_optimize <= 30 and percents[phases.index("engine generated")] >= 80
    # Not 100 until the build is known to have succeeded (the container exited 0, the engine checked).
    progress.feed(FINAL_LINE)
    assert progress.percent() == 99.0
    progress.complete()
    assert progress.percent() == 100.0 and progress.line().startswith("build engine 3f2a9c1e04b7: done (100%)")


def test_ranks_and_steps_each_take_their_share() -> None:
    progress = BuildProgress("engine k", "trtllm-build", ranks=2)
    progress.start_step("convert_checkpoint.py")
    progress.feed("Loading checkpoint shards:  50%|#####     | 1/2 [00:03<00:03,  3.1s/it]")
    assert progress.phase() == "loading checkpoint shards 50%" and 0 < progress.percent() < 20
    progress.feed("Total time of converting checkpoints: 00:00:07")
    assert progress.percent() == pytest.approx(20.0)  # convert_checkpoint.py is a fifth of the whole

    progress.start_step("trtllm-build")
    assert progress.line().startswith("build engine k: trtllm-build, starting, rank 1/2 (20%)")
    trace(progress, REAL_RANK_LOG)  # rank 0 written: half of trtllm-build's share
    assert progress.percent() == pytest.approx(20 + 80 / 2)
    progress.feed("[TRT-LLM] [I] Build TensorRT engine Unnamed Network 0")
    assert "optimizing the engine (TensorRT), rank 2/2" in progress.line()
    assert progress.percent() == pytest.approx(20 + 80 * 1.25 / 2)


def test_a_step_that_exits_0_is_done_even_without_the_lines() -> None:
    progress = BuildProgress("engine k", "trtllm-build", ranks=4)
    progress.start_step("convert_checkpoint.py")
    progress.step_done()
    progress.start_step("trtllm-build")
    assert progress.percent() == pytest.approx(20.0)
    progress.step_done()
    assert progress.percent() == 99.0 and progress.phase() == "done"


def test_interleaved_ranks_never_move_backwards() -> None:
    # --workers 2 builds two ranks at once: a second rank's early line after the first's late one.
    progress = BuildProgress("engine k", "nim-optimize", ranks=2)
    progress.feed("[TRT] [I] Engine generation completed in 9.1 seconds.")
    high = progress.percent()
    progress.feed("[TRT-LLM] [I] Total time of constructing network from module object 3.8 seconds")
    assert progress.percent() == high


def test_output_it_does_not_know_gets_no_invented_percentage_but_is_still_reported() -> None:
    clock = Clock()
    progress = BuildProgress("engine k", "nim-jit", ranks=1, clock=clock)
    progress.start_step("NIM JIT build")
    assert progress.changed_since_report()  # the first report
    for line in ("INFO 2026-11-29 nim] Starting NIM", '{"level": "INFO", "message": "Loading model"}', "", "\x1b[0m"):
        progress.feed(line)
    assert (progress.phase(), progress.percent()) == ("starting", 0.0)
    clock.now += STILL_RUNNING_SECONDS - 1
    assert not progress.changed_since_report()
    clock.now += 1
    assert progress.changed_since_report()  # still running: said again, with the time so far
    assert progress.line() == "build engine k: NIM JIT build, starting (0%), 1m00s"


def test_a_new_phase_is_reported_at_once() -> None:
    progress = BuildProgress("engine k", "nim-optimize", ranks=1, clock=Clock())
    assert progress.changed_since_report()
    assert not progress.changed_since_report()
    progress.feed("[TRT-LLM] [I] Build TensorRT engine Unnamed Network 0")
    assert progress.changed_since_report()
