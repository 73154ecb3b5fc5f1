"""Log output for operators: JSON lines, the audit trail, recent associations.

Everything here is a ``twisted.logger`` observer of the structured events
described in :mod:`gateway.interfaces`; no service calls into it.

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
from collections import deque
from datetime import datetime, timezone

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThreadPool
from twisted.logger import (FilteringLogObserver, ILogObserver, Logger, LogLevel,
                            LogLevelFilterPredicate, formatEvent, globalLogPublisher)
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.interfaces import IReconfigurable

_JSON_TYPES = (str, int, float, bool, type(None))


def _jsonable(value, depth=0):
    if isinstance(value, _JSON_TYPES):
        return True
    if depth < 3 and isinstance(value, (list, tuple)):
        return all(_jsonable(v, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v, depth + 1) for k, v in value.items())
    return False


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_as_record(event: dict) -> dict:
    """One log event as a flat JSON-ready dict (see the module docstring)."""
    level = event.get("log_level")
    record = {
        "time": _iso(event.get("log_time") or 0.0),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in record or key == "format":
            continue
        if _jsonable(value):
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


def _association_fields(event: dict) -> dict:
    keys = ("association", "calling_ae", "called_ae", "peer", "tls_subject", "result", "outcome",
            "instances", "bytes", "failures", "duration", "reject_result", "reject_source",
            "reject_reason")
    record = {"time": _iso(event.get("log_time") or 0.0)}
    for k in keys:
        if k in event and _jsonable(event[k]):
            record[k] = event[k]
    return record


@implementer(ILogObserver)
class RecentAssociations:
    """A bounded ring of the most recent ``association.closed`` events."""

    def __init__(self, size: int = 1000):
        self.ring: deque = deque(maxlen=size)

    def __call__(self, event):
        if event.get("event") == "association.closed":
            self.ring.append(_association_fields(event))

    def page(self, limit: int, offset: int) -> tuple[int, list]:
        """(total kept, up to ``limit`` records newest first from ``offset``)."""
        items = list(reversed(self.ring))
        return len(items), items[offset:offset + limit]


_REOPEN = object()  # queued like a line: reopen the file here

# An association's audit record lists at most this many instances by UID.
AUDIT_MAX_INSTANCES = 10000


@implementer(ILogObserver)
class AuditTrail:
    """One JSON line per association: who, from where, which AE and TLS
    subject, what was stored (SOP instances with sizes), what failed (with
    the status answered) or why the association was refused or ended.

    Lines are appended (no fsync) as each association closes.  With a
    ``pool`` the writes run there, one job at a time so lines stay in order,
    never on the reactor thread; without one (tests) they are written at once.
    :meth:`reopen` (on every reload, i.e. SIGHUP) reopens the file by name,
    for logrotate.
    """

    log = Logger()

    def __init__(self, path: str, reactor=None, pool=None):
        self.path = path
        self.reactor = reactor
        self.pool = pool
        self._open: dict[str, dict] = {}
        self._file = None
        self._pending: list[str] = []
        self._busy = False
        self._waiters: list[Deferred] = []

    def open(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._file = io.open(self.path, "a", encoding="utf-8")

    def close(self) -> Deferred:
        """Fires once every line is written and the file is closed."""
        d = Deferred()
        if self._busy:
            self._waiters.append(d)
        else:
            d.callback(None)

        def finish(_):
            if self._pending and self._file is not None:
                self._write_lines(self._pending)  # the pool may be gone by now
                self._pending = []
            if self._file is not None:
                self._file.close()
                self._file = None

        return d.addCallback(finish)

    def reopen(self):
        """Close and reopen the file (after logrotate moved it), in order with the lines."""
        self._emit(_REOPEN)

    def _emit(self, line):
        if self._file is None:
            return
        self._pending.append(line)
        if self.pool is None:
            lines, self._pending = self._pending, []
            self._write_lines(lines)
            return
        self._kick()

    def _kick(self):
        if self._busy or not self._pending:
            return
        self._busy = True
        lines, self._pending = self._pending, []
        d = deferToThreadPool(self.reactor, self.pool, self._write_lines, lines)
        d.addBoth(self._written)

    def _write_lines(self, lines):
        for line in lines:
            if line is _REOPEN:
                self._file.close()
                self._file = io.open(self.path, "a", encoding="utf-8")
            else:
                self._file.write(line)
        self._file.flush()

    def _written(self, result):
        self._busy = False
        if isinstance(result, Failure):
            self.log.failure("could not write the audit trail {path}", result, path=self.path)
        self._kick()
        if not self._busy:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def __call__(self, event):
        kind = event.get("event")
        if kind == "instance.stored" or kind == "instance.failed":
            entry = self._open.setdefault(event.get("association", "?"), {"stored": [], "failed": []})
            if kind == "instance.stored":
                if len(entry["stored"]) < AUDIT_MAX_INSTANCES:
                    entry["stored"].append({"sop_class_uid": event.get("sop_class_uid"),
                                            "sop_instance_uid": event.get("sop_instance_uid"),
                                            "bytes": event.get("bytes")})
            elif len(entry["failed"]) < AUDIT_MAX_INSTANCES:
                entry["failed"].append({"sop_instance_uid": event.get("sop_instance_uid"),
                                        "status": f"0x{event.get('status', 0):04X}"})
        elif kind == "association.closed":
            record = _association_fields(event)
            entry = self._open.pop(event.get("association", "?"), {"stored": [], "failed": []})
            record["stored"] = entry["stored"]
            record["failed"] = entry["failed"]
            try:
                self._emit(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            except Exception:
                pass  # an observer must never raise; the log line still says it all


@implementer(IReconfigurable)
class ObserverService(Service):
    """Attaches log observers to the global log publisher while running.

    On a reload it reopens the files of observers that have them (logrotate)."""

    def __init__(self, *observers):
        self.observers = list(observers)

    def startService(self):
        super().startService()
        for o in self.observers:
            if hasattr(o, "open"):
                o.open()
            globalLogPublisher.addObserver(o)

    def reconfigure(self, config):
        for o in self.observers:
            if hasattr(o, "reopen"):
                o.reopen()

    def stopService(self):
        super().stopService()
        closing = []
        for o in self.observers:
            globalLogPublisher.removeObserver(o)
            if hasattr(o, "close"):
                closing.append(o.close())
        return gatherResults(closing).addCallback(lambda _: None)
