"""Keep tracebacks out of the logs for user mistakes, and credentials out of every run log line.

Prefect logs every failed task and flow run with its traceback. For a permanent nimflow error
(bad config, unknown revision, invalid weights) the message already names the cause and the fix;
a traceback only buries it. Bugs (any other exception) keep their tracebacks.

Run log lines (which Prefect also ships to its API) have any URL's ``user:password@`` redacted
(:mod:`nimflow.redaction`): a library error quoting an endpoint is logged by Prefect, not by nimflow.
"""

from __future__ import annotations

import logging

from nimflow.errors import NimflowError, is_transient
from nimflow.redaction import redact_credentials

_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine")


class DropUserErrorTracebacks(logging.Filter):
    """Strip ``exc_info`` from records about permanent nimflow errors (any not :func:`~nimflow.errors.is_transient`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        # Not `PermanentError` alone: a domain base such as EngineStoreError is permanent too.
        if isinstance(exc, NimflowError) and not is_transient(exc):
            record.exc_info = None
            record.exc_text = None
        return True


class RedactCredentials(logging.Filter):
    """Replace the user-info of any URL in a record's message (``http://u:pw@h`` -> ``http://***@h``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_credentials(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def install() -> None:
    """Attach the filters to Prefect's run loggers (idempotent)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        for kind in (DropUserErrorTracebacks, RedactCredentials):
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())
