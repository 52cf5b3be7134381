"""Benchmark: the whole ``host_model`` flow when everything is cached and the deployment is healthy.

Starts the local test bed (as ``make demo`` does: Docker engine, NIM stand-in image, S3, hub, a
Prefect API), runs the demo spec once so everything is in place, then ``--rounds`` more times and
reports, per rerun: the wall time, what moved (files, bytes: the target is 0) and where the time
went (each stage as the flow timed it; the rest is Prefect's flow-run creation and teardown). Also
measured once each: importing the flow (Prefect's start-up in a fresh process) and the full
``nimflow host`` command in a fresh process.

    .venv/bin/python bench/noop_rerun.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nimflow.testbed import local

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "configs" / "demo.yaml"


def fresh_process_seconds(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--state-dir", default=str(REPO / ".testbed"))
    args = parser.parse_args()
    local.activate(local.up(Path(args.state_dir)))
    os.chdir(REPO)
    from nimflow.flows.host_model import host_model

    host_model(spec=str(SPEC))  # everything in place (a no-op too when the demo ran before)
    walls, overheads = [], []
    for round_no in range(args.rounds):
        started = time.perf_counter()
        record = host_model(spec=str(SPEC))
        wall = time.perf_counter() - started
        stages = sum(record["timings"].values())
        moved = sum(t["bytes"] for t in record["transfers"])
        walls.append(wall)
        overheads.append(wall - stages)
        timings = ", ".join(f"{k} {v:.2f}" for k, v in record["timings"].items())
        print(f"rerun {round_no + 1}: {wall:.2f} s wall; stages: {timings}; outside the stages {wall - stages:.2f} s; "
              f"moved {record['downloaded_files']} files down, {record['uploaded_files']} up, {moved} bytes; "
              f"container kept: {record['unchanged']}", flush=True)
    imports = fresh_process_seconds("import nimflow.flows.host_model")
    cli = fresh_process_seconds(f"import sys; from nimflow.cli import main; sys.exit(main(['host', {str(SPEC)!r}]))")
    print(f"\nmedian rerun in a warm process: {statistics.median(walls):.2f} s "
          f"(outside the stages: {statistics.median(overheads):.2f} s)")
    print(f"importing the flow in a fresh process (Python + Prefect start-up): {imports:.2f} s")
    print(f"`nimflow host {SPEC.relative_to(REPO)}` in a fresh process, end to end: {cli:.2f} s")


if __name__ == "__main__":
    main()
