"""``make test-gpu`` sets NIMFLOW_GPU_REQUIRED=1: there a GPU test skipped for want of a GPU is a failure
(it verified nothing). Skips for an optional part left out (no TRTLLM_IMAGE, no STANDBY_GPU) stay skips."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome: Any = yield
    report = outcome.get_result()
    if os.environ.get("NIMFLOW_GPU_REQUIRED") and report.skipped and item.get_closest_marker("gpu") \
            and "no NVIDIA GPU" in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"skipped under make test-gpu (NIMFLOW_GPU_REQUIRED=1): {report.longrepr}"
