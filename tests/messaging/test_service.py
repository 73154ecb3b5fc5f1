"""The messaging service on the real index database, not started (no
broker): its interfaces, what a reload applies, the request it records in a
payload's closing transaction, what it holds."""

from __future__ import annotations

import json
import os

from twisted.internet import defer, reactor
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from gateway.config import config_from_string
from gateway.interfaces import (
    IDegradation,
    IMessageBroker,
    IPayloadCloseParticipant,
    IPayloadHold,
    IReconfigurable,
    IStatusReport,
)
from gateway.messaging import monai
from gateway.messaging.broker import Broker
from gateway.messaging.service import MessagingService
from gateway.store.index import open_index
from tests.pgtest import Backend, on_postgres
from gateway.testing import FakeDestinations, FakeExportQueue, FakeMessageBroker, RecordingParticipant

URL = "amqp://guest:guest@127.0.0.1:1/%2F"  # nothing listens; nothing connects here


def config(extra="", workflows=("wf-1",)):
    return config_from_string(f'[messaging]\nurl = "{URL}"\n{extra}\n'
                              f'[[ae]]\ntitle = "DICOMGW"\nworkflows = {json.dumps(list(workflows))}\n')


def closed_payload(conn, root):
    """A payload of one instance from one association, as closing leaves it."""
    conn.execute("INSERT INTO associations (id, calling_ae, called_ae, peer, started, state) "
                 "VALUES ('a1', 'CT01', 'DICOMGW', 'x', 1, 'released')")
    conn.execute("INSERT INTO payloads (id, ae, grouping, key, state, created) "
                 "VALUES ('p1', 'DICOMGW', 'study', 'k', 'closed', 1700000000)")
    conn.execute("INSERT INTO payload_associations (payload, association) VALUES ('p1', 'a1')")
    conn.execute("INSERT INTO instances (association, ae, path, state, payload) "
                 "VALUES ('a1', 'DICOMGW', ?, 'payload', 'p1')", (os.path.join(root, "payloads", "p1", "1.dcm"),))


class MessagingServiceTests(Backend, unittest.TestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.db = open_index(self.root, reactor, durable=False, **self.index_options())
        self.addCleanup(self.db.stop)
        self.service = MessagingService(config(), self.root, self.db, reactor, None, FakeExportQueue(),
                                        FakeDestinations())
        return self.db.start()

    def test_provides_its_interfaces(self):
        for interface in (IPayloadCloseParticipant, IPayloadHold, IStatusReport, IDegradation, IReconfigurable):
            self.assertTrue(verifyObject(interface, self.service), interface)
        self.assertTrue(verifyObject(IMessageBroker, self.service.broker))
        self.assertTrue(verifyObject(IMessageBroker, FakeMessageBroker()))
        self.assertIsInstance(self.service.broker, Broker)
        participant = RecordingParticipant()
        self.assertTrue(verifyObject(IPayloadCloseParticipant, participant))
        self.assertTrue(verifyObject(IPayloadHold, participant))

    def test_export_request_queues_are_consumed_per_agent(self):
        self.assertEqual([q for q, _key, _h in self.service.broker.consumers], ["md.export.request.monaiscu"])

    @defer.inlineCallbacks
    def test_the_request_is_recorded_in_the_closing_transaction_and_held_until_sent(self):
        def close(conn):
            closed_payload(conn, self.root)
            return self.service.close_transaction(conn, "p1", 5.0), self.service.held_payloads(conn, ["p1", "p2"])

        held, kept = yield self.db.run(close)
        self.assertTrue(held)
        self.assertEqual(kept, {"p1"})
        [(key, message_id, body)] = yield self.db.run(
            lambda c: [tuple(r) for r in c.execute("SELECT routing_key, message_id, body FROM outbox")])
        self.assertEqual((key, message_id), ("md.workflow.request", monai.derived_uuid("workflow-request", "p1")))
        body = json.loads(body)
        self.assertEqual((body["bucket"], body["workflows"], body["correlation_id"]), ("dicomgw", ["wf-1"], "a1"))
        self.assertEqual(body["payload"], [{"path": "payloads/p1/1.dcm", "metadata": ""}])

    @defer.inlineCallbacks
    def test_a_reload_applies_bucket_routing_keys_and_workflows_not_the_connection(self):
        new = config('bucket = "b2"\nworkflow_request = "w.r"\nexport_complete = "e.c"\nexchange = "ex2"\n'
                     'prefetch = 9\n', workflows=("wf-2",))
        self.service.reconfigure(new)
        settings = self.service.settings
        self.assertEqual((settings.bucket, settings.workflow_request, settings.export_complete),
                         ("b2", "w.r", "e.c"))
        self.assertEqual((settings.exchange, settings.prefetch), ("monaideploy", 4))  # until a restart
        self.assertEqual(self.service.broker.settings.exchange, "monaideploy")
        self.assertEqual(self.service.handler.settings.export_complete, "e.c")

        def close(conn):
            closed_payload(conn, self.root)
            self.service.close_transaction(conn, "p1", 5.0)
            return conn.execute("SELECT routing_key, body FROM outbox").fetchone()

        key, body = yield self.db.run(close)
        self.assertEqual(key, "w.r")
        self.assertEqual((json.loads(body)["bucket"], json.loads(body)["workflows"]), ("b2", ["wf-2"]))

    def test_degraded_while_the_broker_is_away_without_its_password(self):
        [reason] = self.service.degraded_reasons()
        self.assertIn("message broker amqp://guest@127.0.0.1:1/%2F", reason)
        self.assertNotIn("guest:guest", reason)
        self.service.broker.connected = True
        self.assertEqual(self.service.degraded_reasons(), [])


MessagingServiceTestsOnPostgres = on_postgres(MessagingServiceTests)
