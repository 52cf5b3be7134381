"""Make sure a headless-capable Chromium and its WebDriver are installed (Debian's packages).

The UI test drives the Prefect UI with Selenium through the system browser and driver: nothing is
downloaded at test time (no Selenium Manager). On a fresh Debian machine, as root, the packages
``chromium`` and ``chromium-driver`` are installed with apt-get, as ``docker_engine`` does for
Docker. Anything else (not root, no apt, an install that fails) is a :class:`TestbedError` that says
what to do.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from nimflow.testbed import TestbedError

PACKAGES = ("chromium", "chromium-driver")
_LOCK = Path("/var/lock/nimflow-chromium.lock")  # serialises the install across processes
_BROWSER_NAMES = ("chromium", "chromium-browser")
_DRIVER_NAMES = ("chromedriver",)
_DRIVER_PATHS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


@dataclass(frozen=True)
class Browser:
    """Paths of the browser binary and of the matching WebDriver."""

    binary: str
    driver: str


def _find() -> Browser | None:
    binary = next((found for name in _BROWSER_NAMES if (found := shutil.which(name))), None)
    driver = next((found for name in _DRIVER_NAMES if (found := shutil.which(name))), None)
    driver = driver or next((path for path in _DRIVER_PATHS if os.access(path, os.X_OK)), None)
    return Browser(binary, driver) if binary and driver else None


def _apt_install() -> None:
    if shutil.which("apt-get") is None:
        raise TestbedError(f"Chromium is not installed and apt-get is not available: install {' and '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise TestbedError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")


def ensure_chromium() -> Browser:
    """Return the paths of Chromium and chromedriver, installing Debian's packages as root if missing.

    Raises:
        TestbedError: they are missing and cannot be installed here.
    """
    found = _find()
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise TestbedError(
            "Chromium or chromedriver is missing and this process is not root, so it cannot install them. "
            f"Run `sudo apt-get install -y {' '.join(PACKAGES)}`.")
    _LOCK.parent.mkdir(parents=True, exist_ok=True)
    with _LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel caller may have installed them meanwhile
        found = _find()
        if found is None:
            _apt_install()
            found = _find()
    if found is None:
        raise TestbedError(f"installed {' and '.join(PACKAGES)} but found no chromium/chromedriver on PATH")
    return found


def main() -> int:
    """``python -m nimflow.testbed.browser``: ensure Chromium and chromedriver, print their paths."""
    try:
        browser = ensure_chromium()
    except TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"chromium: {browser.binary}\nchromedriver: {browser.driver}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
