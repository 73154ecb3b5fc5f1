"""Helpers for testing code that runs a gateway: in-memory and in-process."""

from __future__ import annotations

from twisted.internet.defer import Deferred


def listening_port(service, name: str = "dicom") -> Deferred:
    """Fire with the IListeningPort of the named listener of a running gateway.

    The listener is Twisted's StreamServerEndpointService (made by
    ``strports.service``), which keeps the port only privately.
    """
    listener = service.getServiceNamed(name)
    d = Deferred()
    listener._waitingForPort.addCallback(lambda port: (d.callback(port), port)[1])
    return d


# ---- export: in-memory fakes of IExportQueue and IDestinations -------------


def _export_fakes():
    from twisted.internet import defer
    from zope.interface import implementer

    from gateway.interfaces import IDestinations, IExportQueue

    @implementer(IExportQueue)
    class FakeExportQueue:
        """Records submissions; every job stays ``queued`` unless a test sets it."""

        def __init__(self, destinations=("pacs",)):
            self.destination_names = set(destinations)
            self.submitted: list[tuple] = []
            self._jobs: dict[int, dict] = {}

        def submit(self, destinations, paths, origin):
            for name in destinations:
                if name not in self.destination_names:
                    raise KeyError(name)
            ids = []
            for name in destinations:
                job_id = len(self._jobs) + 1
                self._jobs[job_id] = {
                    "id": job_id, "destination": name, "state": "queued", "origin": origin,
                    "created": 0.0, "updated": 0.0, "files": len(paths), "done": 0, "failed": 0,
                    "file_statuses": [{"path": p, "state": "queued", "status": None, "attempts": 0,
                                       "reason": None} for p in paths],
                }
                ids.append(job_id)
            self.submitted.append((list(destinations), list(paths), origin))
            return defer.succeed(ids)

        def jobs(self, limit=100, offset=0, state=None):
            rows = [{k: v for k, v in j.items() if k != "file_statuses"}
                    for j in sorted(self._jobs.values(), key=lambda j: -j["id"])
                    if state is None or j["state"] == state]
            return defer.succeed(rows[offset:offset + limit])

        def job(self, job_id):
            return defer.succeed(self._jobs.get(job_id))

    @implementer(IDestinations)
    class FakeDestinations:
        """``results`` maps a name to the echo dict to answer (default: success)."""

        def __init__(self, results=None):
            self.results = dict(results or {"pacs": None})

        def names(self):
            return list(self.results)

        def echo(self, name):
            if name not in self.results:
                raise KeyError(name)
            result = self.results[name] or {"destination": name, "ok": True, "rtt_ms": 1.0, "reason": None}
            return defer.succeed(dict(result))

    return FakeExportQueue, FakeDestinations


FakeExportQueue, FakeDestinations = _export_fakes()
