"""Helpers for testing code that runs a gateway: in-memory and in-process."""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from gateway.interfaces import (
    IAssociationProvider,
    IDestinations,
    IExportQueue,
    IInstanceStorage,
    IInstanceStoredObserver,
    IPayloadQuery,
)
from gateway.dimse.sop import is_valid_uid
from gateway.store.header import header_attributes
from gateway.store.writer import RESERVE_FILE, SPARE_PREFIX, StoredInstance
from gateway.threads import run_with_callback


def listening_port(service, name: str = "dicom") -> Deferred:
    """Fire with the IListeningPort of the named listener of a running gateway."""
    return service.getServiceNamed(name).listening()


# ---- a reactor and threads that run everything at once, in the test's thread --


class ThreadlessClock(Clock):
    """A Clock that is also the reactor ``deferToThreadPool`` and the
    worker pools call back into."""

    def callFromThread(self, f, *args, **kw):
        f(*args, **kw)


class InlinePool:
    """A :class:`gateway.threads.WorkerPool` that runs each job at once, in
    the caller's thread."""

    def callInThread(self, f, *args, **kw):
        f(*args, **kw)

    def callInThreadWithCallback(self, on_result, f, *args, **kw):
        run_with_callback(on_result, f, args, kw)

    def queued(self) -> int:
        return 0


# ---- in-memory fakes of the provider interfaces (gateway.interfaces) --------


@implementer(IAssociationProvider)
class FakeProvider:
    """An upper layer that records what its user asks of it (no bytes, no timers)."""

    peer = "192.0.2.1:104"
    peer_host = "192.0.2.1"
    peer_max_pdu = 16384
    closed = False
    disconnect_reason = None
    can_send_data = True
    can_request_release = True

    def __init__(self):
        self.accepted = None
        self.rejected = None
        self.sent: list[bytes] = []  # P-DATA-TF PDUs
        self.calls: list[tuple] = []  # every other request, by name

    def peer_certificate_subject(self):
        return None

    def peer_verify_error(self):
        return None

    def accept(self, ac):
        self.accepted = ac

    def reject(self, rj):
        self.rejected = rj

    def send_pdata(self, pdu_bytes):
        self.sent.append(bytes(pdu_bytes))

    def release_request(self):
        self.calls.append(("release_request",))

    def release_response(self):
        self.calls.append(("release_response",))

    def abort(self, reason=0, why="aborted", now=False):
        self.calls.append(("abort", reason, why))

    def provider_abort(self, reason, detail):
        self.calls.append(("provider_abort", reason, detail))

    def pause(self):
        self.calls.append(("pause",))

    def resume(self):
        self.calls.append(("resume",))

    def register_producer(self, producer):
        self.calls.append(("register_producer", producer))

    def unregister_producer(self):
        self.calls.append(("unregister_producer",))



@implementer(IExportQueue)
class FakeExportQueue:
    """Export jobs kept in a list; ``submit`` only records them."""

    def __init__(self, destinations=("pacs",)):
        self.destinations = set(destinations)
        self._jobs: list[dict] = []

    def submit(self, destinations, paths, origin):
        for name in destinations:
            if name not in self.destinations:
                return fail(KeyError(name))
        ids = []
        for name in destinations:
            job_id = str(len(self._jobs) + 1)
            self._jobs.append({"id": job_id, "destination": name, "state": "queued", "origin": origin,
                               "created": 0, "updated": 0, "files": len(paths), "done": 0, "failed": 0,
                               "file_statuses": [{"path": p, "state": "queued", "status": None,
                                                  "attempts": 0, "reason": None} for p in paths]})
            ids.append(job_id)
        return succeed(ids)

    def jobs(self, limit=100, offset=0, state=None):
        items = [{k: v for k, v in j.items() if k != "file_statuses"}
                 for j in reversed(self._jobs) if state is None or j["state"] == state]
        return succeed(items[offset:offset + limit])

    def job(self, job_id):
        for j in self._jobs:
            if j["id"] == job_id:
                return succeed(dict(j))
        return succeed(None)


@implementer(IDestinations)
class FakeDestinations:
    """``results`` maps a destination name to the echo answer it gives."""

    def __init__(self, results=None):
        self.results = dict(results or {"pacs": True})
        self.echoed: list[str] = []

    def names(self):
        return list(self.results)

    def echo(self, name):
        if name not in self.results:
            from twisted.internet.defer import fail

            return fail(KeyError(name))
        self.echoed.append(name)
        ok = self.results[name]
        return succeed({"destination": name, "ok": ok, "rtt_ms": 1.5 if ok else None,
                        "reason": None if ok else "connection refused"})


@implementer(IPayloadQuery)
class FakePayloadQuery:
    def __init__(self, payloads=()):
        self.items = list(payloads)

    def payloads(self, limit=100, offset=0, state=None):
        items = [p for p in self.items if state is None or p.get("state") == state]
        return succeed(items[offset:offset + limit])


# ---- payloads and pipelines -----------------------------------------------------


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


def partial_files(tmp_dir: str) -> list[str]:
    """What is in ``tmp_dir`` besides empty spares and the databases'
    reserve: instances being received (or, after a crash, left half-written)."""
    out = []
    for name in sorted(os.listdir(tmp_dir)):
        if name == RESERVE_FILE:
            continue
        if name.startswith(SPARE_PREFIX):
            try:
                if os.path.getsize(os.path.join(tmp_dir, name)) == 0:
                    continue
            except FileNotFoundError:
                continue
        out.append(name)
    return out


# ---- storage, in memory ------------------------------------------------------------


class _MemoryWriter:
    """An InstanceWriter that keeps the bytes; finishes at once."""

    def __init__(self, storage, meta):
        self.storage = storage
        self.meta = meta
        self.data = bytearray()
        self.pending = 0
        self.on_drained = None

    def write(self, data):
        self.data += data

    def finish(self):
        if self.storage.fail_with is not None:
            return fail(self.storage.fail_with)
        m = self.meta
        path = f"{m['called_ae']}/{m['sop_instance_uid']}.dcm"
        replaced = path in self.storage.files
        data = self.storage.files[path] = bytes(self.data)
        return succeed(StoredInstance(path, m["sop_class_uid"], m["sop_instance_uid"], m["transfer_syntax_uid"],
                                      len(data), len(data), replaced, sha256="0" * 64,
                                      attributes=header_attributes(path, data, m["transfer_syntax_uid"], True)))

    def discard(self):
        self.storage.discarded.append(self.meta["sop_instance_uid"])


@implementer(IInstanceStorage)
class MemoryStorage:
    """Instances kept in ``files`` (``AE/UID.dcm`` -> data set bytes);
    ``discarded`` lists the SOP Instance UIDs of discarded writers;
    ``fail_with`` makes every ``finish`` fail with that exception."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.discarded: list[str] = []
        self.fail_with = None

    def begin(self, *, called_ae, calling_ae, sop_class_uid, sop_instance_uid, transfer_syntax_uid):
        if not is_valid_uid(sop_instance_uid):
            raise ValueError(f"not a valid UID: {sop_instance_uid!r}")
        return _MemoryWriter(self, dict(called_ae=called_ae, calling_ae=calling_ae, sop_class_uid=sop_class_uid,
                                        sop_instance_uid=sop_instance_uid,
                                        transfer_syntax_uid=transfer_syntax_uid))
