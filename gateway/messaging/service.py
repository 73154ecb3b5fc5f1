"""The messaging service: broker, outbox and export request consumers, wired.

:class:`MessagingService` (the service "messaging") is made by
``makeService`` when ``[messaging] url`` is set, and handed to those it
serves: the payload service (it takes part in closing payloads: the
workflow request is recorded in the closing transaction), the reclaimer
(it keeps payloads whose request the broker has not confirmed), and the
management API (a ``/status`` section, ``/health`` degraded while the
broker is away, since DICOM is still received, and gauges for ``/metrics``).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from twisted.application.service import MultiService
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from gateway.config.options import reloaded
from gateway.interfaces import (
    IDegradation,
    IPayloadCloseParticipant,
    IPayloadHold,
    IReconfigurable,
    IStatusReport,
)
from gateway.messaging import monai
from gateway.messaging.broker import Broker
from gateway.messaging.export_requests import ExportRequestHandler
from gateway.messaging.outbox import Outbox, db_held, db_record
from gateway.net.tls import verified_client_options


def _db_close(conn, pid, now, config, settings, root):
    """The workflow request of payload ``pid``, recorded (closing transaction)."""
    payload = conn.execute("SELECT id, ae, created FROM payloads WHERE id = ?", (pid,)).fetchone()
    instances = [dict(r) for r in conn.execute(
        "SELECT path FROM instances WHERE payload = ? AND state = 'payload' ORDER BY id", (pid,))]
    if payload is None or not instances:
        return False  # nothing to hand on (every file was gone)
    associations = [dict(r) for r in conn.execute(
        "SELECT a.id, a.calling_ae, a.called_ae FROM associations a JOIN payload_associations pa "
        "ON pa.association = a.id WHERE pa.payload = ? ORDER BY a.started, a.id", (pid,))]
    ae = config.ae_named(payload["ae"])
    message = monai.workflow_request(dict(payload), instances, associations, root=root, bucket=settings.bucket,
                                     workflows=ae.workflows if ae else (), routing_key=settings.workflow_request)
    db_record(conn, message, now, payload=pid)
    return True


def broker_tls(settings, source: str = "<string>"):
    """TLS options for an ``amqps://`` broker (reads ``ca_certificates``:
    call it at start-up); None for ``amqp://``."""
    parts = urlsplit(settings.url)
    if parts.scheme != "amqps":
        return None
    return verified_client_options(parts.hostname, settings.ca_certificates, "messaging.ca_certificates", source)


@implementer(IPayloadCloseParticipant, IPayloadHold, IStatusReport, IDegradation, IReconfigurable)
class MessagingService(MultiService):
    """``storage_root`` is where the files named in messages are; ``exports`` an IExportQueue and
    ``destinations`` an IDestinations (export requests are consumed only
    with both)."""

    log = Logger()
    name = "messaging"

    def __init__(self, config, storage_root, db, reactor, pool, exports=None, destinations=None):
        super().__init__()
        self.config = config
        self.settings = config.messaging
        self.storage_root = os.path.abspath(storage_root)
        self.db = db
        self.broker = Broker(self.settings, reactor, broker_tls(self.settings, config.path))
        self.broker.setServiceParent(self)
        shared = config.index.shared
        self.outbox = Outbox(db, self.broker, reactor, node=config.gateway.node if shared else "",
                             lease=config.cluster.lease)
        # Nodes sharing the outbox look for rows a stopped node left, every lease.
        self._sweep = LoopingCall(self.outbox.kick) if shared else None
        if self._sweep is not None:
            self._sweep.clock = reactor
        self.lease = config.cluster.lease
        self.broker.when_connected(self.outbox.kick)
        self.handler = None
        if exports is not None and destinations is not None:
            self.handler = ExportRequestHandler(self.settings, self.storage_root, db, exports, destinations,
                                                self.outbox, reactor, pool)
            for agent in self.settings.export_agents:
                queue = self.settings.export_queue(agent)
                self.broker.consume(queue, queue, self.handler)

    def reconfigure(self, config):
        # New payloads get the new AE titles' workflows, new messages the new
        # bucket and routing keys; the connection keeps its settings until a
        # restart (each option says which it is).
        self.config = config
        self.settings = reloaded(self.settings, config.messaging)
        if self.handler is not None:
            self.handler.settings = self.settings

    def startService(self):
        self.outbox.stopped = False
        super().startService()
        # Requests left by an earlier run go out once the broker is there.
        self.outbox.kick()
        if self._sweep is not None and not self._sweep.running:
            self._sweep.start(self.lease, now=False)

    def stopService(self):
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        self.outbox.stop()
        return super().stopService()

    # ---- IPayloadCloseParticipant, IPayloadHold ----------------------------------

    def close_transaction(self, conn, payload_id, now):
        return _db_close(conn, payload_id, now, self.config, self.settings, self.storage_root)

    def payload_closed(self, payload_id):
        self.log.info("payload {payload}: workflow request {message_id} recorded; {state}",
                      event="messaging.recorded", type="WorkflowRequestEvent", payload=payload_id,
                      message_id=monai.derived_uuid("workflow-request", payload_id),
                      state="publishing" if self.broker.connected else "it waits for the broker")
        self.outbox.kick()

    def held_payloads(self, conn, payload_ids):
        return db_held(conn, payload_ids)

    # ---- reports -----------------------------------------------------------------

    def degraded_reasons(self):
        if self.broker.connected:
            return []
        state = self.broker.state()
        return [f"message broker {state['url']} is {state['state']}"
                + (f": {state['reason']}" if state["reason"] else "") + "; messages wait in the outbox"]

    @inlineCallbacks
    def status_report(self):
        counts = yield self.outbox.counts()
        state = self.broker.state()
        return "messaging", {**state, "since": monai.iso_utc(state["since"]), "waiting": counts["waiting"],
                             "sent": counts["sent"], "published": self.outbox.published,
                             "confirmed": self.outbox.confirmed,
                             "export_requests_handled": self.handler.handled if self.handler else 0}

    @inlineCallbacks
    def metric_gauges(self):
        counts = yield self.outbox.counts()
        return [("dicomgw_messaging_waiting", "Messages recorded and not yet confirmed by the broker.",
                 [({}, counts["waiting"])]),
                ("dicomgw_messaging_connected", "1 while connected to the message broker, else 0.",
                 [({}, 1 if self.broker.connected else 0)])]
