"""Benchmark: how late nimflow notices that a NIM became ready.

The NIM stand-in program runs as a local process (the container adds nothing to what is measured:
nimflow polls an HTTP endpoint either way) with ``NIMSTANDIN_READY_DELAY`` seconds before
``/v1/health/ready`` answers 200. Each round starts it, then runs side by side:
- a reference poller hitting ``/v1/health/ready`` every 5 ms, which records when 200 first came;
- nimflow's ``wait_until_ready`` with its default poll interval (what verification uses).
The delay is the moment ``wait_until_ready`` returned minus the reference's first 200. The reference
shares the process (and the GIL) with nimflow's poller, so single rounds scatter by about 0.1 s,
either way; the median and the maximum over rounds with shifted phases are what count.

    .venv/bin/python bench/readiness.py --rounds 10
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from nimflow.nim_api import READY_PATH, READY_POLL_SECONDS, wait_until_ready
from nimflow.testbed.nim_image import STANDIN_SOURCE
from nimflow.testbed.tiny_model import write_tiny_llama

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def one_round(model_dir: Path, ready_delay: float, poll: float) -> float:
    """Seconds between the endpoint turning ready and ``wait_until_ready`` returning."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIM")}
    env.update(NIM_SERVER_PORT=str(port), NIM_MODEL_NAME=str(model_dir), NIM_SERVED_MODEL_NAME="bench",
               NIMSTANDIN_READY_DELAY=str(ready_delay))
    process = subprocess.Popen([sys.executable, "-S", str(STANDIN_SOURCE), "serve"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    first_ready: list[float] = []

    def reference() -> None:
        with httpx.Client(timeout=5) as client:
            while not first_ready:
                try:
                    if client.get(endpoint + READY_PATH).status_code == 200:
                        first_ready.append(time.monotonic())
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.005)

    poller = threading.Thread(target=reference, daemon=True)
    try:
        poller.start()
        wait_until_ready(endpoint, deadline_seconds=60, poll_seconds=poll)
        noticed = time.monotonic()
        poller.join(10)
        return noticed - first_ready[0]
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--ready-delay", type=float, default=2.0, help="seconds the stand-in stays unready")
    parser.add_argument("--poll", type=float, default=READY_POLL_SECONDS, help="poll interval (default: nimflow's)")
    parser.add_argument("--work", default=str(REPO / ".testbed" / "bench"))
    args = parser.parse_args()
    model_dir = write_tiny_llama(Path(args.work) / "readiness-model")
    delays = []
    for round_no in range(args.rounds):
        delay = one_round(model_dir, args.ready_delay + 0.1 * round_no, args.poll)  # phases vary against the poll interval
        delays.append(delay)
        print(f"round {round_no + 1}: noticed {delay:.3f} s after ready", flush=True)
    print(f"\npoll interval {args.poll} s, {args.rounds} rounds: median {statistics.median(delays):.3f} s, "
          f"max {max(delays):.3f} s (target <= 0.5 s)")


if __name__ == "__main__":
    main()
