"""JSON log lines on stdout: one object a line, whatever a file name holds.

Fields: ts, level, msg, and where they apply job_id, route, name (escaped), state,
outcome, error_class, elapsed_s. Names pass through `display_name`, and the JSON
encoder escapes the rest, so a newline in a name never splits a line.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from service.storage.names import display_name

__all__ = ["get_logger", "job_fields", "setup_logging"]


class _Formatter(JsonFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        _Formatter(
            "%(asctime)s %(levelname)s %(message)s",
            # `name` is a LogRecord attribute (the logger's): file names travel as
            # `file_name` and are written out as `name`.
            rename_fields={
                "asctime": "ts",
                "levelname": "level",
                "message": "msg",
                "file_name": "name",
            },
            json_ensure_ascii=True,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The client libraries log a line per request or connection; their failures reach
    # our own log lines, with the job, sink or channel they hit.
    for noisy in (
        "watchfiles",
        "uvicorn",
        "uvicorn.error",
        "uvicorn.access",
        "httpx",
        "httpcore",
        "asyncssh",
        "aiormq",
        "aio_pika",
        "nats",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def job_fields(
    job_id: str | None = None,
    *,
    route: str | None = None,
    name: bytes | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The `extra=` of a job's log line, with the name escaped."""
    fields: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}
    if job_id is not None:
        fields["job_id"] = job_id
    if route is not None:
        fields["route"] = route
    if name is not None:
        fields["file_name"] = display_name(name)
    if "elapsed_s" in fields:
        fields["elapsed_s"] = round(float(fields["elapsed_s"]), 4)
    return fields
