"""Credentials never leave nimflow inside a URL it prints.

An endpoint may carry ``user:password@`` (``HF_ENDPOINT``, ``AWS_ENDPOINT_URL``, ``cache.endpoint_url``,
``PREFECT_API_URL``), and library errors quote the URL they failed on. Every message nimflow builds
goes through :func:`redact_credentials`: nimflow errors redact their own message (``NimflowError``),
the run loggers redact each record (:mod:`nimflow.log_filter`), and places that format an endpoint
use :func:`redact_url`. This module imports nothing of nimflow, so all of them can use it.
"""

from __future__ import annotations

import re

__all__ = ["REDACTED", "redact_credentials", "redact_url"]

#: What replaces the user-info part (``user:password``) of a URL.
REDACTED = "***"
# scheme://userinfo@ : the user-info runs to the authority's last `@` (a password may hold an
# unescaped `@`), never past the first `/`, `?`, `#` or whitespace.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s]*@")


def redact_credentials(text: str) -> str:
    """``text`` with the user-info of every URL in it replaced: ``http://u:pw@host/`` -> ``http://***@host/``."""
    return _USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)


def redact_url(url: str | None, default: str = "") -> str:
    """One URL as it may be printed (user-info replaced); ``default`` when there is none."""
    return redact_credentials(url) if url else default
