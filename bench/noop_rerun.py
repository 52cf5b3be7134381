"""Benchmark: a no-op ``nimflow host`` and ``nimflow plan`` (everything cached, the deployment healthy).

Starts the local test bed (as ``make demo`` does: Docker engine, NIM stand-in image, S3, hub, a
Prefect API), runs the demo spec once so everything is in place (as its own deployment
``tiny-llama-bench`` on a free port, with the stand-in tagged by its source hash, so that it disturbs
no demo or test bed image of another checkout; removed at the end unless ``--keep``), then
measures, each round with the order of the commands rotated:

- in fresh processes: ``python -c pass`` and ``import prefect`` (the plain baselines: Python's and
  Prefect's start-up alone), ``nimflow host configs/demo.yaml`` and ``nimflow plan configs/demo.yaml``
  end to end;
- in this (warm) process: one ``host_model`` rerun: its wall time, each stage as the flow timed it
  (the rest is Prefect's flow-run and task-run creation and state reporting) and what moved (target: 0).

Probe containers started during the measured commands are counted from the Docker engine's events
(label ``nimflow.role=probe``; target: 0, the probes are cached). Prints medians over the rounds and
the machine. ``--profile FILE`` also writes a cProfile of one warm rerun (and prints its top entries).

    .venv/bin/python bench/noop_rerun.py --rounds 3
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from nimflow.testbed import local
from nimflow.testbed.nim_image import source_tag
from nimflow.testbed.services import free_port

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
NAME = "tiny-llama-bench"
CLI = "import sys; from nimflow.cli import main; sys.exit(main({argv!r}))"


def bench_spec(state_dir: Path, image: str) -> Path:
    """The demo spec as this benchmark's own deployment: its name, a free port, ``image``, an absolute cache dir."""
    spec = yaml.safe_load(DEMO.read_text())
    spec["name"] = NAME
    spec["build"]["image"] = spec["deploy"]["image"] = image
    spec["deploy"]["host_port"] = free_port()
    spec["deploy"]["cache_dir"] = str(state_dir / "nim-cache")
    path = state_dir / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def fresh_process_seconds(code: str) -> float:
    """Wall seconds of ``python -c code`` in a new process (it must succeed)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - started


def probe_containers(since: float) -> int:
    """Probe containers (``nimflow.role=probe``) the Docker engine created since ``since``."""
    from nimflow.containers import docker_client

    events = docker_client().events(since=int(since), until=int(time.time()) + 1, decode=True,
                                    filters={"type": "container", "event": "create", "label": "nimflow.role=probe"})
    return len(list(events))


def warm_rerun(host_model: Callable[..., dict[str, Any]], spec: Path) -> dict[str, float]:
    """One rerun in this process: wall, stage time, time outside the stages; refuses one that moved bytes."""
    started = time.perf_counter()
    record = host_model(spec=str(spec))
    wall = time.perf_counter() - started
    moved = sum(t["bytes"] for t in record["transfers"]) + record["downloaded_files"] + record["uploaded_files"]
    if moved or not record["unchanged"]:
        raise SystemExit(f"not a no-op: moved {moved} bytes/files, container kept: {record['unchanged']}")
    stages = sum(record["timings"].values())
    return {"host_model rerun (warm process)": wall, "  of which stages": stages, "  outside the stages": wall - stages,
            **{f"    {stage}": seconds for stage, seconds in record["timings"].items()}}


def machine() -> str:
    """One line describing this machine (the numbers depend on it)."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, load average {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--state-dir", default=str(REPO / ".testbed"))
    parser.add_argument("--profile", type=Path, help="write a cProfile of one warm rerun here")
    parser.add_argument("--image", default=source_tag(), help="the stand-in's tag (default: its source-hash tag)")
    parser.add_argument("--keep", action="store_true", help="keep the deployment and the test bed's servers")
    args = parser.parse_args()
    state_dir = Path(args.state_dir).resolve()
    local.activate(local.up(state_dir, args.image))
    os.chdir(REPO)
    spec = bench_spec(state_dir, args.image)
    fresh = {
        "python -c pass": "pass",
        "import prefect": "import prefect",
        "nimflow host (fresh process)": CLI.format(argv=["host", str(spec)]),
        "nimflow plan (fresh process)": CLI.format(argv=["plan", str(spec)]),
    }
    from nimflow.flows.host_model import host_model

    try:
        host_model(spec=str(spec))  # everything in place (a no-op too when the benchmark ran before)
        measure(args, host_model, spec, fresh)
    finally:
        if not args.keep:
            from nimflow.containers import docker_client
            from nimflow.deployments_admin import take_down

            take_down(docker_client(), NAME)
            local.down(state_dir)


def measure(args: argparse.Namespace, host_model: Callable[..., dict[str, Any]], spec: Path, fresh: dict[str, str]) -> None:
    """The rounds, the medians and (``--profile``) the cProfile of one warm rerun."""
    since = time.time()
    samples: dict[str, list[float]] = {}
    for round_no in range(args.rounds):
        names = list(fresh)
        shift = round_no % (len(names) + 1)
        order: list[str | None] = [*names, None]  # None: the warm rerun
        for name in order[shift:] + order[:shift]:
            if name is None:
                for label, seconds in warm_rerun(host_model, spec).items():
                    samples.setdefault(label, []).append(seconds)
            else:
                samples.setdefault(name, []).append(fresh_process_seconds(fresh[name]))
        print(f"round {round_no + 1}: " + ", ".join(f"{k.strip()} {v[-1]:.2f}" for k, v in samples.items()), flush=True)
    probes = probe_containers(since - 1)

    print(f"\nmachine: {machine()}")
    print(f"medians of {args.rounds} rounds (seconds; the order rotated each round):")
    width = max(len(name) for name in samples)
    for name, values in samples.items():
        print(f"  {name:<{width}}  {statistics.median(values):6.2f}   (min {min(values):.2f}, max {max(values):.2f})")
    prefect = statistics.median(samples["import prefect"])
    for name in ("nimflow host (fresh process)", "nimflow plan (fresh process)"):
        print(f"  {name} minus `import prefect`: {statistics.median(samples[name]) - prefect:.2f}")
    print(f"probe containers started by the {args.rounds * 3} measured runs and plans: {probes} (target 0: cached)")

    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(warm_rerun, host_model, spec)
        profiler.dump_stats(str(args.profile))
        print(f"\ncProfile of one warm rerun: {args.profile}; top 30 by cumulative time:")
        pstats.Stats(str(args.profile)).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
