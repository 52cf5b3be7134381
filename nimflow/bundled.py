"""Programs nimflow runs that live in the repository's ``deployments/`` folder, found in a wheel or a checkout.

The front proxy (``deployments/front-proxy/front_proxy.py``) goes into the proxy image, and the NIM
stand-in (``deployments/nim-standin/nim_standin.py``) into the test bed's image. They stay in
``deployments/`` in the repository; the wheel carries them as package data under
``nimflow/deployments/`` (pyproject.toml maps the folder there), so an installed nimflow works
outside a checkout. An editable install reads them from the checkout itself.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
#: Where the wheel puts them (pyproject.toml: ``[tool.setuptools.package-dir]``).
PACKAGED_DIR = _PACKAGE_DIR / "deployments"
#: Where a checkout has them: the folder beside ``nimflow/``.
CHECKOUT_DIR = _PACKAGE_DIR.parent / "deployments"


def bundled_file(*parts: str) -> Path:
    """The path of ``deployments/<parts...>``: the wheel's copy if installed, else the checkout's.

    Never raises: when neither exists (a broken install), it returns the checkout's path, and the
    caller's read names that path in its error.
    """
    packaged = PACKAGED_DIR.joinpath(*parts)
    return packaged if packaged.is_file() else CHECKOUT_DIR.joinpath(*parts)
