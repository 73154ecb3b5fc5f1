"""The audit trail and the recent associations: observers of the structured events.

No service calls into these: :class:`ObserverService` attaches them to the
global log publisher while the gateway runs, and they follow the events
described in :mod:`gateway.interfaces` (``association.closed``,
``instance.failed``).  The audit trail is also told of every stored instance
directly, as an :class:`~gateway.interfaces.IInstanceStoredObserver` of the
ways in.
"""

from __future__ import annotations

import io
import json
import os
from collections import deque

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.interfaces import IInstanceStoredObserver, IReconfigurable
from gateway.logs import iso_time, jsonable


def _association_fields(event: dict) -> dict:
    keys = ("association", "calling_ae", "called_ae", "peer", "tls_subject", "result", "outcome",
            "instances", "bytes", "failures", "duration", "reject_result", "reject_source",
            "reject_reason")
    record = {"time": iso_time(event.get("log_time") or 0.0)}
    for k in keys:
        if k in event and jsonable(event[k]):
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


@implementer(ILogObserver, IInstanceStoredObserver)
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
            if result.check(OSError):  # a full disk, say: those lines are lost, the gateway goes on
                self.log.error("could not write the audit trail {path}: {error}", path=self.path,
                               error=result.getErrorMessage())
            else:
                self.log.failure("could not write the audit trail {path}", result, path=self.path)
        # While closing, the rest is written by close() itself: the disk pool
        # may be stopped by now, and a job queued there would never run.
        if not self._waiters:
            self._kick()
        if not self._busy:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def instance_stored(self, instance, association):
        stored = self._entry(association.id)["stored"]
        if len(stored) < AUDIT_MAX_INSTANCES:
            stored.append({"sop_class_uid": instance.sop_class_uid,
                           "sop_instance_uid": instance.sop_instance_uid, "bytes": instance.dataset_size})

    def association_released(self, association):
        pass  # the association.closed event writes the record

    def association_ended(self, association, result):
        pass

    def _entry(self, association_id) -> dict:
        return self._open.setdefault(association_id, {"stored": [], "failed": []})

    def __call__(self, event):
        kind = event.get("event")
        if kind == "instance.failed":
            entry = self._entry(event.get("association", "?"))
            if len(entry["failed"]) < AUDIT_MAX_INSTANCES:
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
