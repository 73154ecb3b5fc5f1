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
    IMessageBroker,
    IPayloadCloseParticipant,
    IPayloadHold,
    IPayloadQuery,
)
from gateway.dimse.sop import is_valid_uid
from gateway.store.spares import SPARE_PREFIX
from gateway.store.writer import HEAD_BYTES, RESERVE_FILE, StoredInstance
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

    def count(self, state=None):
        return succeed(sum(1 for j in self._jobs if state is None or j["state"] == state))

    def job(self, job_id):
        for j in self._jobs:
            if j["id"] == str(job_id):
                return succeed(dict(j))
        return succeed(None)

    def wait(self, job_id):
        """Fires at once with the job's state: a fake job never runs."""
        for j in self._jobs:
            if j["id"] == job_id:
                return succeed(j["state"])
        return fail(KeyError(job_id))

    def find(self, origin):
        return succeed([j["id"] for j in self._jobs if j["origin"] == origin])

    def finish(self, job_id, statuses):
        """Give a job its outcome: ``statuses`` maps path -> (state, reason)."""
        for j in self._jobs:
            if j["id"] == job_id:
                for f in j["file_statuses"]:
                    f["state"], f["reason"] = statuses.get(f["path"], ("sent", None))
                j["done"] = sum(f["state"] == "sent" for f in j["file_statuses"])
                j["failed"] = len(j["file_statuses"]) - j["done"]
                j["state"] = "done" if not j["failed"] else "failed"


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

    def count(self, state=None):
        return succeed(sum(1 for p in self.items if state is None or p.get("state") == state))


@implementer(IMessageBroker)
class FakeMessageBroker:
    """A broker in memory.  ``published`` lists every message handed over;
    each publish stays unconfirmed until the test calls :meth:`confirm` (or
    :meth:`refuse`), or settles at once with ``auto_confirm``.  ``deliver``
    hands a message to the consumer of a queue."""

    def __init__(self, auto_confirm=True):
        self.connected = True
        self.auto_confirm = auto_confirm
        self.published: list = []
        self.pending: list = []  # (message, Deferred)
        self.consumers: dict = {}
        self.observers: list = []

    def publish(self, message):
        if not self.connected:
            return fail(ConnectionError("not connected"))
        self.published.append(message)
        if self.auto_confirm:
            return succeed(None)
        d = Deferred()
        self.pending.append((message, d))
        return d

    def confirm(self, count=None):
        batch, self.pending = self.pending[:count], self.pending[count:] if count is not None else []
        for _m, d in batch:
            d.callback(None)

    def refuse(self, why="nack"):
        batch, self.pending = self.pending, []
        for _m, d in batch:
            d.errback(RuntimeError(why))

    def disconnect(self):
        self.connected = False
        self.refuse("connection lost")

    def reconnect(self):
        self.connected = True
        for callback in list(self.observers):
            callback()

    def consume(self, queue, routing_key, handler):
        self.consumers[queue] = handler

    def when_connected(self, callback):
        self.observers.append(callback)

    def state(self):
        return {"state": "connected" if self.connected else "disconnected", "url": "amqp://fake/",
                "since": 0.0, "reason": None, "exchange": "fake"}

    def deliver(self, queue, body, message_id=None):
        """Hand ``body`` to the queue's consumer; returns (the FakeDelivery, what the handler returned)."""
        delivery = FakeDelivery(body, message_id, queue)
        return delivery, self.consumers[queue](delivery)


class FakeDelivery:
    """What a consumer is handed; records how it was settled."""

    def __init__(self, body, message_id=None, routing_key="q"):
        self.body = body
        self.message_id = message_id
        self.routing_key = routing_key
        self.redelivered = False
        self.settled = None

    def ack(self):
        self.settled = self.settled or "ack"

    def reject(self):
        self.settled = self.settled or "reject"

    def requeue(self):
        self.settled = self.settled or "requeue"


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


@implementer(IPayloadCloseParticipant, IPayloadHold)
class RecordingParticipant:
    """Takes part in closing payloads, as the message broker's outbox does:
    records what it sees, and (with ``hold``) keeps each payload ``closed``
    and away from the reclaimer until :meth:`release`."""

    def __init__(self, hold=True):
        self.hold = hold
        self.in_transaction: list = []  # (payload id, its state as the closing transaction sees it)
        self.closed: list = []  # payload ids, once their closing committed
        self.held: set = set()

    def close_transaction(self, conn, payload_id, now):
        row = conn.execute("SELECT state FROM payloads WHERE id = ?", (payload_id,)).fetchone()
        self.in_transaction.append((payload_id, row[0] if row else None))
        if self.hold:
            self.held.add(payload_id)
        return self.hold

    def payload_closed(self, payload_id):
        self.closed.append(payload_id)

    def held_payloads(self, conn, payload_ids):
        return {p for p in payload_ids if p in self.held}

    def release(self, payload_id):
        self.held.discard(payload_id)


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


def finished(writer) -> Deferred:
    """A writer's ``finish(done)`` as a Deferred of the StoredInstance."""
    d = Deferred()
    writer.finish(lambda outcome: d.errback(outcome) if isinstance(outcome, BaseException) else d.callback(outcome))
    return d


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

    def finish(self, done, *args):
        if self.storage.fail_with is not None:
            done(self.storage.fail_with, *args)
            return
        m = self.meta
        path = f"{m['called_ae']}/{m['sop_instance_uid']}.dcm"
        replaced = path in self.storage.files
        data = self.storage.files[path] = bytes(self.data)
        done(StoredInstance(path, m["sop_class_uid"], m["sop_instance_uid"], m["transfer_syntax_uid"],
                            len(data), len(data), replaced, head=data[:HEAD_BYTES]), *args)

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
