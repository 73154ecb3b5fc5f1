"""The outbox and the export request flow, on the real index database with
the in-memory broker and export queue of gateway.testing."""

from __future__ import annotations

import json
import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from gateway.messaging import monai
from gateway.messaging.export_requests import ExportRequestHandler, db_begin, db_jobs
from gateway.messaging.outbox import Outbox, db_claim_waiting, db_counts, db_held, db_record
from gateway.config import Messaging
from gateway.store.index import open_index
from tests.pgtest import Backend, on_postgres
from gateway.testing import FakeDestinations, FakeExportQueue, FakeMessageBroker
from gateway.threads import WorkerPool


def message(n, payload=None):
    return monai.Message("md.workflow.request", json.dumps({"n": n}).encode(), f"id-{n}", f"c-{n}",
                         "WorkflowRequestEvent", 1.0)


class DatabaseCase(Backend, unittest.TestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.db = open_index(self.root, reactor, durable=False, **self.index_options())
        self.addCleanup(self.db.stop)
        return self.db.start()

    def rows(self, sql, *args):
        return self.db.run(lambda conn: [tuple(r) for r in conn.execute(sql, args)])

    @defer.inlineCallbacks
    def settle(self, outbox):
        for _ in range(200):
            if not outbox.running:
                return
            yield defer.succeed(None)
            from twisted.internet import task

            yield task.deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("the outbox did not settle")


class OutboxTests(DatabaseCase):
    @defer.inlineCallbacks
    def test_published_in_order_and_sent_only_when_confirmed(self):
        broker = FakeMessageBroker(auto_confirm=False)
        outbox = Outbox(self.db, broker, reactor)
        for n in range(3):
            self.assertTrue((yield self.db.run(db_record, message(n), 1.0)))
        self.assertFalse((yield self.db.run(db_record, message(0), 2.0)))  # recorded once
        outbox.kick()
        from twisted.internet import task

        for _ in range(100):
            if len(broker.pending) == 3:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual([m.message_id for m in broker.published], ["id-0", "id-1", "id-2"])
        self.assertEqual((yield self.db.run(db_counts)), {"waiting": 3, "sent": 0})
        broker.confirm()
        yield self.settle(outbox)
        self.assertEqual((yield self.db.run(db_counts)), {"waiting": 0, "sent": 3})
        self.assertEqual(outbox.confirmed, 3)

    @defer.inlineCallbacks
    def test_unconfirmed_messages_wait_and_go_again_with_the_same_id(self):
        broker = FakeMessageBroker(auto_confirm=False)
        outbox = Outbox(self.db, broker, reactor)
        outbox.stop()  # no retry timer in this test: reconnections drive it
        outbox.stopped = False
        for n in range(2):
            yield self.db.run(db_record, message(n), 1.0)
        broker.connected = False
        outbox.kick()
        yield self.settle(outbox)
        self.assertEqual(broker.published, [])  # nothing while disconnected
        broker.reconnect()
        outbox.kick()
        from twisted.internet import task

        for _ in range(100):
            if len(broker.pending) == 2:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        broker.disconnect()  # the connection drops before the confirms
        yield self.settle(outbox)
        self.assertEqual((yield self.db.run(db_counts)), {"waiting": 2, "sent": 0})
        broker.auto_confirm = True
        broker.reconnect()
        outbox.kick()
        yield self.settle(outbox)
        self.assertEqual([m.message_id for m in broker.published], ["id-0", "id-1", "id-0", "id-1"])
        self.assertEqual((yield self.db.run(db_counts)), {"waiting": 0, "sent": 2})
        self.assertEqual((yield self.rows("SELECT attempts FROM outbox ORDER BY seq")), [(2,), (2,)])

    @defer.inlineCallbacks
    def test_a_payload_is_held_until_its_request_is_confirmed(self):
        broker = FakeMessageBroker(auto_confirm=True)
        outbox = Outbox(self.db, broker, reactor)
        yield self.db.run(lambda conn: conn.execute(
            "INSERT INTO payloads (id, ae, grouping, key, state, created) VALUES ('p1', 'A', 'study', 'k', "
            "'closed', 1)"))
        yield self.db.run(db_record, message(1), 1.0, "p1")
        self.assertEqual((yield self.db.run(db_held, ["p1", "p2"])), {"p1"})
        outbox.kick()
        yield self.settle(outbox)
        self.assertEqual((yield self.db.run(db_held, ["p1"])), set())
        self.assertEqual((yield self.rows("SELECT state FROM payloads")), [("done",)])


class SharedOutboxTests(DatabaseCase):
    @defer.inlineCallbacks
    def test_nodes_claim_disjoint_rows_until_a_lease_expires(self):
        for n in range(5):
            yield self.db.run(db_record, message(n), 1.0)
        a = yield self.db.run(db_claim_waiting, 0, 3, "a", 30.0)
        b = yield self.db.run(db_claim_waiting, 0, 3, "b", 30.0)
        self.assertEqual([r[1] for r in a], ["id-0", "id-1", "id-2"])
        self.assertEqual([r[1] for r in b], ["id-3", "id-4"])  # in order, none of a's
        self.assertEqual((yield self.db.run(db_claim_waiting, 0, 10, "b", 30.0)), b)
        # a stops renewing: its rows' leases run out, and b takes them.
        yield self.db.run(lambda conn: conn.execute("UPDATE outbox SET lease_until = 0 WHERE node = 'a'"))
        taken = yield self.db.run(db_claim_waiting, 0, 10, "b", 30.0)
        self.assertEqual([r[1] for r in taken], [f"id-{n}" for n in range(5)])


class SlowQueue(FakeExportQueue):
    """Jobs end when the test says so."""

    def __init__(self, destinations=("pacs",)):
        super().__init__(destinations)
        self.waiting = {}
        self.submitted = 0

    def submit(self, destinations, paths, origin):
        self.submitted += 1
        return super().submit(destinations, paths, origin)

    def wait(self, job_id):
        return self.waiting.setdefault(job_id, defer.Deferred())

    def end(self, job_id, statuses=None):
        self.finish(job_id, statuses or {})
        self.waiting.setdefault(job_id, defer.Deferred()).callback("done")


class ExportRequestFlowTests(DatabaseCase):
    def setUp(self):
        d = super().setUp()
        self.pool = WorkerPool(1, "test-msg")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.files = []
        for name in ("a.dcm", "b.dcm"):
            path = os.path.join(self.root, "outputs", name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(b"x")
            self.files.append(path)
        self.queue = SlowQueue()
        self.broker = FakeMessageBroker()
        self.outbox = Outbox(self.db, self.broker, reactor)
        self.handler = ExportRequestHandler(Messaging(url="amqp://x/"), self.root, self.db, self.queue,
                                            FakeDestinations({"pacs": True}), self.outbox, reactor, self.pool)
        return d

    def body(self, task="t1", **extra):
        body = {"workflow_instance_id": "w", "export_task_id": task, "correlation_id": "c",
                "files": ["outputs/a.dcm", "outputs/b.dcm"], "destinations": ["pacs"]}
        body.update(extra)
        return json.dumps(body).encode()

    def completes(self):
        return self.rows("SELECT body FROM outbox WHERE type = 'ExportCompleteEvent' ORDER BY seq")

    @defer.inlineCallbacks
    def wait_submitted(self, count):
        from twisted.internet import task

        for _ in range(200):
            if self.queue.submitted >= count and self.queue.waiting:
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("no job submitted")

    @defer.inlineCallbacks
    def test_exported_then_answered_then_acked(self):
        from gateway.testing import FakeDelivery

        delivery = FakeDelivery(self.body(), "m1")
        done = self.handler(delivery)
        yield self.wait_submitted(1)
        self.assertIsNone(delivery.settled)  # not before the outcome is durable
        self.assertEqual((yield self.completes()), [])
        self.queue.end("1", {self.files[1]: ("failed", "destination answered 0xA700")})
        yield done
        self.assertEqual(delivery.settled, "ack")
        [(body,)] = yield self.completes()
        body = json.loads(body)
        self.assertEqual(body["status"], "PartialFailure")
        self.assertEqual(body["file_statuses"], {"outputs/a.dcm": "Success", "outputs/b.dcm": "ServiceError"})
        self.assertEqual((yield self.rows("SELECT state, status, jobs FROM export_requests")),
                         [("complete", "PartialFailure", '["1"]')])

        # Redelivered: acked, nothing submitted, nothing answered again.
        again = FakeDelivery(self.body(), "m1")
        yield self.handler(again)
        self.assertEqual((again.settled, self.queue.submitted, len((yield self.completes()))), ("ack", 1, 1))

    @defer.inlineCallbacks
    def test_a_redelivery_while_exporting_waits_for_the_first(self):
        from gateway.testing import FakeDelivery

        first, second = FakeDelivery(self.body(), "m1"), FakeDelivery(self.body(), "m1")
        d1 = self.handler(first)
        yield self.wait_submitted(1)
        d2 = self.handler(second)
        self.queue.end("1")
        yield d1
        yield d2
        self.assertEqual((first.settled, second.settled, self.queue.submitted), ("ack", "ack", 1))
        self.assertEqual(len((yield self.completes())), 1)

    @defer.inlineCallbacks
    def test_after_a_crash_the_jobs_are_found_not_submitted_again(self):
        from gateway.testing import FakeDelivery

        request = monai.parse_export_request(self.body(), "m1")
        # A crash after the jobs went in, before their ids were recorded ...
        yield self.db.run(db_begin, request, 1.0)
        [job] = yield self.queue.submit(["pacs"], self.files, "export-request:t1")
        delivery = FakeDelivery(self.body(), "m1")
        d = self.handler(delivery)
        for _ in range(200):
            if job in self.queue.waiting:
                break
            from twisted.internet import task

            yield task.deferLater(reactor, 0.01, lambda: None)
        self.queue.end(job)
        yield d
        self.assertEqual((delivery.settled, self.queue.submitted), ("ack", 1))
        # ... and after one with the ids recorded.
        request2 = monai.parse_export_request(self.body(task="t2"), "m2")
        yield self.db.run(db_begin, request2, 1.0)
        [job2] = yield self.queue.submit(["pacs"], self.files, "export-request:t2")
        yield self.db.run(db_jobs, "t2", [job2])
        self.queue.end(job2)
        yield self.handler(FakeDelivery(self.body(task="t2"), "m2"))
        self.assertEqual(self.queue.submitted, 2)
        self.assertEqual(len((yield self.completes())), 2)

    @defer.inlineCallbacks
    def test_poison_is_rejected_and_answered_when_the_task_is_known(self):
        from gateway.testing import FakeDelivery

        cases = [(b"nope", None), (self.body(task="t-dest", destinations=["mars"]), "t-dest"),
                 (self.body(task="t-file", files=["outputs/a.dcm", "outputs/zzz.dcm"]), "t-file"),
                 (self.body(task="t-root", files=["../x.dcm"]), "t-root")]
        for body, _task in cases:
            delivery = FakeDelivery(body)
            yield self.handler(delivery)
            self.assertEqual(delivery.settled, "reject")
        answers = {json.loads(b)["export_task_id"]: json.loads(b) for (b,) in (yield self.completes())}
        self.assertEqual(set(answers), {"t-dest", "t-file", "t-root"})
        self.assertEqual(answers["t-file"]["file_statuses"], {"outputs/a.dcm": "Unknown",
                                                               "outputs/zzz.dcm": "DownloadError"})
        self.assertEqual(answers["t-root"]["file_statuses"], {"../x.dcm": "ConfigurationError"})
        self.assertEqual({a["status"] for a in answers.values()}, {"Failure"})
        self.assertEqual(self.queue.submitted, 0)


OutboxTestsOnPostgres = on_postgres(OutboxTests)
ExportRequestFlowTestsOnPostgres = on_postgres(ExportRequestFlowTests)
SharedOutboxTestsOnPostgres = on_postgres(SharedOutboxTests)
