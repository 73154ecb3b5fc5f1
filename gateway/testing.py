"""Helpers for testing code that runs a gateway: in-memory and in-process."""

from __future__ import annotations

import itertools

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from gateway.interfaces import IExportQueue, IInstanceStoredObserver


def listening_port(service, name: str = "dicom") -> Deferred:
    """Fire with the IListeningPort of the named listener of a running gateway.

    The listener is Twisted's StreamServerEndpointService (made by
    ``strports.service``), which keeps the port only privately.
    """
    listener = service.getServiceNamed(name)
    d = Deferred()
    listener._waitingForPort.addCallback(lambda port: (d.callback(port), port)[1])
    return d


@implementer(IExportQueue)
class RecordingExportQueue:
    """An IExportQueue that records submissions and sends nothing.

    The gateway uses it until the real export queue is wired in; its jobs
    stay in state ``recorded`` (so the reclaimer keeps their files).
    ``destinations``: names accepted (None: any).
    """

    def __init__(self, destinations=None):
        self.destinations = destinations
        self.submissions: list[tuple[list, list, str]] = []
        self._jobs: dict[int, dict] = {}
        self._ids = itertools.count(1)

    def submit(self, destinations, paths, origin):
        destinations, paths = list(destinations), list(paths)
        if self.destinations is not None:
            unknown = [d for d in destinations if d not in self.destinations]
            if unknown:
                return fail(KeyError(unknown[0]))
        self.submissions.append((destinations, paths, origin))
        ids = []
        for d in destinations:
            job_id = next(self._ids)
            self._jobs[job_id] = {"id": job_id, "destination": d, "state": "recorded", "origin": origin,
                                  "files": len(paths), "done": 0, "failed": 0, "paths": paths}
            ids.append(job_id)
        return succeed(ids)

    def jobs(self, limit=100, offset=0, state=None):
        rows = [j for j in reversed(self._jobs.values()) if state is None or j["state"] == state]
        return succeed(rows[offset:offset + limit])

    def job(self, job_id):
        return succeed(self._jobs.get(job_id))


@implementer(IInstanceStoredObserver)
class RecordingObserver:
    """An IInstanceStoredObserver that records what it is told."""

    def __init__(self, config=None):
        self.stored: list = []
        self.released: list = []
        self.ended: list = []

    def instance_stored(self, instance, association):
        self.stored.append((instance, association))

    def association_released(self, association):
        self.released.append(association)

    def association_ended(self, association, result):
        self.ended.append((association, result))
