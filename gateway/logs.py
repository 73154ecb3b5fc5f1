"""Log output for operators: JSON lines.

Everything here is a ``twisted.logger`` observer of the structured events
described in :mod:`gateway.interfaces`; no service calls into it.  The audit
trail and the recent associations are in :mod:`gateway.ops.audit`.

JSON lines for journald/ELK::

    twistd -n --pidfile= --logger gateway.logs.json_observer dicomgw --config ...

writes one JSON object per line to standard output: ``time`` (ISO 8601,
UTC), ``level``, ``namespace``, ``message`` (the formatted text), ``event``
when the event has one, every other named field whose value is JSON data,
and ``failure`` (the traceback) for ``log.failure`` events.  Events below
``$DICOMGW_LOG_LEVEL`` (default ``info``) are left out.
``gateway.logs.json_file_observer`` does the same into the file named by the
``DICOMGW_JSON_LOG`` environment variable.
"""

from __future__ import annotations

import io
import json
import os
import sys
from datetime import datetime, timezone

from twisted.logger import FilteringLogObserver, ILogObserver, LogLevel, LogLevelFilterPredicate, formatEvent
from zope.interface import implementer

_JSON_TYPES = (str, int, float, bool, type(None))


def jsonable(value, depth=0):
    if isinstance(value, _JSON_TYPES):
        return True
    if depth < 3 and isinstance(value, (list, tuple)):
        return all(jsonable(v, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict):
        return all(isinstance(k, str) and jsonable(v, depth + 1) for k, v in value.items())
    return False


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_as_record(event: dict) -> dict:
    """One log event as a flat JSON-ready dict (see the module docstring)."""
    level = event.get("log_level")
    record = {
        "time": iso_time(event.get("log_time") or 0.0),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in record or key == "format":
            continue
        if jsonable(value):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["failure"] = failure.getTraceback()
        except Exception:
            record["failure"] = repr(failure)
    return record


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one line of JSON to a text stream."""

    def __init__(self, stream):
        self.stream = stream

    def __call__(self, event):
        try:
            line = json.dumps(event_as_record(event), ensure_ascii=False, default=str)
        except Exception:  # an observer must never raise
            line = json.dumps({"message": repr(event.get("log_format")), "level": "error",
                               "error": "could not encode this log event"})
        self.stream.write(line + "\n")
        self.stream.flush()


def _at_level(observer):
    """Drop events below ``$DICOMGW_LOG_LEVEL`` (default ``info``; per-instance
    events are ``debug``)."""
    name = os.environ.get("DICOMGW_LOG_LEVEL", "info").lower()
    try:
        level = LogLevel.levelWithName(name)
    except Exception:
        level = LogLevel.info
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])


def json_observer():
    """``twistd --logger gateway.logs.json_observer``: JSON lines on stdout."""
    return _at_level(JSONLinesObserver(sys.stdout))


def json_file_observer():
    """``twistd --logger gateway.logs.json_file_observer``: JSON lines appended
    to the file named by ``$DICOMGW_JSON_LOG``."""
    path = os.environ.get("DICOMGW_JSON_LOG", "dicomgw.log.jsonl")
    return _at_level(JSONLinesObserver(io.open(path, "a", encoding="utf-8", buffering=1)))
