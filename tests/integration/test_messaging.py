"""MONAI Deploy messaging against a real RabbitMQ (and DCMTK storescp).

Each test has its own exchange, agent queue and reading queues (see
:mod:`tests.integration.rabbit`); outages go through a relay the test cuts.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid

import pydicom
from twisted.internet import defer
from twisted.trial import unittest

from gateway.config import config_from_string
from gateway.messaging import monai
from gateway.tap import makeService
from gateway.testing import listening_port
from tests import dicomfiles
from tests.integration import test_twistd as tw
from tests.integration.harness import RunningGateway, free_port, gateway_config, in_thread, run
from tests.integration.peers import start_storescp
from tests.integration.rabbit import URL as rabbit_url
from tests.integration.rabbit import Relay, ThrowawayBroker, sleep
from tests.integration.test_export_peers import received_by_uid
from tests.integration.test_payloads import Events, query, toml_list, wait_for


def ae_table(title="DICOMGW", grouping="study", timeout=0.5, workflows=("wf-1",), pipelines=()):
    return (f'[[ae]]\ntitle = "{title}"\ngrouping = "{grouping}"\ntimeout = {timeout}\n'
            f"workflows = {toml_list(workflows)}\npipelines = {toml_list(pipelines)}\n")


@defer.inlineCallbacks
def start(testcase, messaging, aes=None, extra="", api=False):
    root = os.path.abspath(testcase.mktemp())
    text = gateway_config(root, aes=())
    if api:
        text = text.replace('dicom = "tcp:0:interface=127.0.0.1"',
                            'dicom = "tcp:0:interface=127.0.0.1"\nhttp = "tcp:0:interface=127.0.0.1"')
    text += "\n[reclaimer]\ninterval = 3600\n" + extra + "\n" + messaging + "\n" + (aes or ae_table())
    config = config_from_string(text)
    service = makeService({"config_object": config, "install_sighup": False}, reactor())
    service.startService()
    testcase.addCleanup(service.stopService)
    gw = RunningGateway(service, (yield listening_port(service)))
    if api:
        gw.http_port = (yield listening_port(service, "http")).getHost().port
    yield service.getServiceNamed("payloads").recovered
    gw.messaging = service.getServiceNamed("messaging")
    return gw


def reactor():
    from twisted.internet import reactor as r

    return r


def uids(paths):
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}


def outbox(gw):
    return query(gw, "SELECT state, COUNT(*) FROM outbox GROUP BY state")


@defer.inlineCallbacks
def http_get(port, path):
    from twisted.web.client import Agent, readBody

    response = yield Agent(reactor()).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
    body = yield readBody(response)
    return response.code, body.decode()


class WorkflowRequestTests(unittest.TestCase):
    timeout = 120

    def series(self, count, **kw):
        return dicomfiles.make_series(self.mktemp(), count, rows=16, cols=16, **kw)

    @defer.inlineCallbacks
    def test_fields_and_properties_of_a_workflow_request(self):
        broker = ThrowawayBroker(self)
        gw = yield start(self, broker.settings(bucket="shared-bucket"), ae_table(workflows=("wf-a", "wf-b")),
                         api=True)
        yield wait_for(lambda: gw.messaging.broker.connected, what="broker connected")
        files = self.series(3)
        out, err, code = yield run("storescu", "-aet", "CT01", "-aec", "DICOMGW", "127.0.0.1", str(gw.port), *files)
        self.assertEqual(code, 0, err)
        [(props, body)] = yield broker.collect("md.workflow.request", 1, settle=0.5)

        [(pid, created, path, state)] = query(gw, "SELECT id, created, path, state FROM payloads")
        [(assoc_id,)] = query(gw, "SELECT id FROM associations")
        self.assertEqual(props.content_type, "application/json")
        self.assertEqual(props.delivery_mode, 2)
        self.assertEqual(props.message_id, monai.derived_uuid("workflow-request", pid))
        self.assertEqual(props.correlation_id, assoc_id)
        self.assertEqual(props.app_id, "dicomgw")
        self.assertEqual(props.type, "WorkflowRequestEvent")
        self.assertEqual(str(uuid.UUID(body["payload_id"])), body["payload_id"])
        self.assertEqual(body["workflows"], ["wf-a", "wf-b"])
        self.assertEqual(body["file_count"], 3)
        self.assertEqual(body["correlation_id"], assoc_id)
        self.assertEqual(body["bucket"], "shared-bucket")
        origin = {"dataService": "DIMSE", "source": "CT01", "destination": "DICOMGW"}
        self.assertEqual(body["trigger"], origin)
        self.assertEqual(body["data_origins"], [origin])
        self.assertEqual(body["timestamp"], monai.iso_utc(created))
        self.assertTrue(body["timestamp"].endswith("Z"))
        # Paths are relative to the storage root and name the payload's files.
        self.assertEqual(len(body["payload"]), 3)
        read = set()
        for item in body["payload"]:
            self.assertFalse(os.path.isabs(item["path"]))
            self.assertEqual(set(item), {"path", "metadata"})
            full = os.path.join(gw.storage_root, item["path"])
            self.assertEqual(os.path.dirname(full), path)
            read.add(pydicom.dcmread(full, stop_before_pixels=True).SOPInstanceUID)
        self.assertEqual(read, uids(files))
        # Confirmed: marked sent; a payload without pipelines is done once its request is out.
        yield wait_for(lambda: outbox(gw) == [("sent", 1)], what="request marked sent")
        self.assertEqual(state if state == "done" else query(gw, "SELECT state FROM payloads")[0][0], "done")
        code, status = yield http_get(gw.http_port, "/status")
        section = json.loads(status)["messaging"]
        self.assertEqual((section["state"], section["waiting"], section["sent"]), ("connected", 0, 1))
        self.assertNotIn("guest:guest", status)  # no password in /status
        code, health = yield http_get(gw.http_port, "/health")
        self.assertEqual((code, json.loads(health)["status"]), (200, "ok"))
        code, metrics = yield http_get(gw.http_port, "/metrics")
        self.assertIn('dicomgw_messaging_confirmed_total{routing_key="md.workflow.request"} 1', metrics)
        self.assertIn("dicomgw_messaging_waiting 0", metrics)

    @defer.inlineCallbacks
    def test_one_study_over_two_associations_is_one_request(self):
        broker = ThrowawayBroker(self)
        gw = yield start(self, broker.settings(), ae_table(timeout=2))
        yield wait_for(lambda: gw.messaging.broker.connected, what="broker connected")
        files = self.series(4)
        out, err, code = yield run("storescu", "-aet", "CT01", "-aec", "DICOMGW", "127.0.0.1", str(gw.port), *files[:2])
        self.assertEqual(code, 0, err)
        out, err, code = yield run("storescu", "-aet", "CT02", "-aec", "DICOMGW", "127.0.0.1", str(gw.port), *files[2:])
        self.assertEqual(code, 0, err)
        got = yield broker.collect("md.workflow.request", 1, settle=1.0)
        self.assertEqual(len(got), 1)
        props, body = got[0]
        first = query(gw, "SELECT id FROM associations ORDER BY started")[0][0]
        self.assertEqual(body["file_count"], 4)
        self.assertEqual(body["correlation_id"], first)
        self.assertEqual(body["trigger"]["source"], "CT01")
        self.assertEqual([o["source"] for o in body["data_origins"]], ["CT01", "CT02"])

    @defer.inlineCallbacks
    def test_series_grouping_makes_one_request_per_series(self):
        broker = ThrowawayBroker(self)
        gw = yield start(self, broker.settings(), ae_table(grouping="series"))
        yield wait_for(lambda: gw.messaging.broker.connected, what="broker connected")
        a, b = self.series(2), self.series(3)
        out, err, code = yield run("storescu", "-aec", "DICOMGW", "127.0.0.1", str(gw.port), *a, *b)
        self.assertEqual(code, 0, err)
        got = yield broker.collect("md.workflow.request", 2, settle=1.0)
        self.assertEqual(sorted(body["file_count"] for _p, body in got), [2, 3])
        self.assertEqual(len({p.message_id for p, _b in got}), 2)
        # The same association: one correlation id for both.
        self.assertEqual(len({body["correlation_id"] for _p, body in got}), 1)

    @defer.inlineCallbacks
    def test_broker_cut_while_the_payload_closes(self):
        events = Events(self)
        broker = ThrowawayBroker(self)
        relay = Relay()
        relay.start()
        self.addCleanup(relay.cut)
        gw = yield start(self, broker.settings(url=relay.url), api=True)
        gw.messaging.broker.max_delay = 1.0
        yield wait_for(lambda: gw.messaging.broker.connected, what="broker connected")
        yield relay.cut()
        yield wait_for(lambda: not gw.messaging.broker.connected, what="broker seen as gone")
        # DICOM keeps flowing while the broker is away.
        files = self.series(3)
        out, err, code = yield run("storescu", "-aec", "DICOMGW", "127.0.0.1", str(gw.port), *files)
        self.assertEqual(code, 0, err)
        yield wait_for(lambda: outbox(gw) == [("waiting", 1)], what="request waiting")
        code, health = yield http_get(gw.http_port, "/health")
        health = json.loads(health)
        self.assertEqual((code, health["status"]), (200, "degraded"))
        self.assertIn("message broker", health["reasons"][0])
        code, metrics = yield http_get(gw.http_port, "/metrics")
        self.assertIn("dicomgw_messaging_waiting 1", metrics)
        self.assertIn("dicomgw_messaging_connected 0", metrics)
        yield sleep(2.5)  # several failed attempts...
        states = [e["state"] for e in events.named("messaging.broker")]
        self.assertEqual(states, ["connected", "disconnected"])  # ... logged once
        self.assertIn("connection lost", events.named("messaging.broker")[1]["reason"])
        self.assertEqual((yield broker.collect("md.workflow.request", 1, timeout=0.2)), [])

        relay.restore()
        [(props, body)] = yield broker.collect("md.workflow.request", 1, timeout=30, settle=0.5)
        self.assertEqual(body["file_count"], 3)
        yield wait_for(lambda: outbox(gw) == [("sent", 1)], what="request marked sent")
        self.assertEqual([e["state"] for e in events.named("messaging.broker")],
                         ["connected", "disconnected", "connected"])
        code, health = yield http_get(gw.http_port, "/health")
        self.assertEqual(json.loads(health)["status"], "ok")

    @defer.inlineCallbacks
    def test_requests_wait_in_order(self):
        broker = ThrowawayBroker(self)
        relay = Relay()
        relay.start()
        self.addCleanup(relay.cut)
        yield relay.cut()
        gw = yield start(self, broker.settings(url=relay.url), ae_table(grouping="series", timeout=0.2))
        gw.messaging.broker.max_delay = 0.5
        studies = [self.series(1) for _ in range(5)]
        for files in studies:  # one association each: closes in this order
            out, err, code = yield run("storescu", "-aec", "DICOMGW", "127.0.0.1", str(gw.port), *files)
            self.assertEqual(code, 0, err)
            yield wait_for(lambda n=studies.index(files) + 1: query(gw, "SELECT COUNT(*) FROM outbox")[0][0] == n,
                           what="request recorded")
        recorded = [r[0] for r in query(gw, "SELECT message_id FROM outbox ORDER BY seq")]
        relay.restore()
        got = yield broker.collect("md.workflow.request", 5, settle=0.5)
        self.assertEqual([p.message_id for p, _b in got], recorded)


class KillTests(tw.DaemonCase):
    def spawn(self, url, broker):
        return self.launch(self.daemon_config() + "\n" + broker.settings(url=url) + ae_table(timeout=0.3))

    @defer.inlineCallbacks
    def test_kill_9_with_an_unsent_request_then_restart(self):
        broker = ThrowawayBroker(self)
        nowhere = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
        proc = yield self.spawn(nowhere, broker)
        files = dicomfiles.make_series(self.mktemp(), 2, rows=16, cols=16)
        out, err, code = yield run("storescu", "-aec", "DICOMGW", "127.0.0.1", str(self.port), *files)
        self.assertEqual(code, 0, err)
        yield wait_for(lambda: self.query("SELECT state FROM outbox") == [("waiting",)], what="request waiting")
        [(message_id,)] = self.query("SELECT message_id FROM outbox")
        self.kill(proc)

        yield self.spawn(rabbit_url, broker)
        got = yield broker.collect("md.workflow.request", 1, timeout=30, settle=1.0)
        self.assertEqual([p.message_id for p, _b in got], [message_id])
        self.assertEqual(got[0][1]["file_count"], 2)
        yield wait_for(lambda: self.query("SELECT state FROM outbox") == [("sent",)], what="marked sent")


class ExportRequestTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setup_export(self, retries=0):
        self.events = Events(self)
        self.broker = ThrowawayBroker(self)
        self.received = os.path.abspath(self.mktemp())
        port = yield start_storescp(self, self.received)
        # "down": a destination nobody listens on.
        dest = (f'[scu]\nretries = {retries}\nretry_delay = 0.1\n'
                f'[[destination]]\nname = "pacs"\nae_title = "STORESCP"\nhost = "127.0.0.1"\nport = {port}\n'
                f'[[destination]]\nname = "down"\nae_title = "X"\nhost = "127.0.0.1"\nport = {free_port()}\n')
        self.gw = yield start(self, self.broker.settings(), extra=dest)
        yield wait_for(lambda: self.gw.messaging.broker.connected, what="broker connected")
        # Files in the storage root, as a pipeline or an earlier payload left them.
        self.results = os.path.join(self.gw.storage_root, "outputs", "p1")
        self.files = dicomfiles.make_series(self.results, 2, rows=16, cols=16)
        with open(os.path.join(self.results, "notes.txt"), "w") as f:
            f.write("not DICOM")
        yield wait_for(lambda: self.broker_ready(), what="export queue consumed")

    def broker_ready(self):
        return self.gw.messaging.broker.connections >= 1

    def request(self, files, task="task-1", destinations=("pacs",), **extra):
        body = {"workflow_instance_id": "wi-1", "export_task_id": task, "correlation_id": "corr-1",
                "files": [os.path.relpath(f, self.gw.storage_root) if os.path.isabs(f) else f for f in files],
                "destinations": list(destinations)}
        body.update(extra)
        return body

    @defer.inlineCallbacks
    def test_export_request_to_storescp_and_export_complete(self):
        yield self.setup_export()
        body = self.request(self.files)
        yield self.broker.publish_export_request(body, "msg-1")
        [(props, complete)] = yield self.broker.collect("md.export.complete", 1, settle=0.5)
        self.assertEqual(complete["status"], "Success")
        self.assertEqual(complete["file_statuses"], {f: "Success" for f in body["files"]})
        self.assertEqual((complete["workflow_instance_id"], complete["export_task_id"], complete["correlation_id"]),
                         ("wi-1", "task-1", "corr-1"))
        self.assertIn("2 of 2", complete["message"])
        self.assertEqual(props.correlation_id, "corr-1")
        self.assertEqual(props.type, "ExportCompleteEvent")
        received = received_by_uid(self.received)
        self.assertEqual(set(received), uids(self.files))
        for path in self.files:
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            self.assertEqual(dicomfiles.dataset_bytes(received[uid]), dicomfiles.dataset_bytes(path))
        # Acked: nothing left on the queue.
        self.assertEqual((yield self.broker.depth()), (0, 1))

        # The same request again (a redelivery, a resend): answered, not exported again.
        yield self.broker.publish_export_request(body, "msg-1")
        yield wait_for(lambda: [e for e in self.events.named("export_request") if e["outcome"] == "duplicate"],
                       what="duplicate seen")
        self.assertEqual((yield self.broker.collect("md.export.complete", 1, timeout=0.5)), [])
        exports = sqlite3.connect(os.path.join(self.gw.storage_root, "exports.sqlite"))
        self.addCleanup(exports.close)
        self.assertEqual(exports.execute("SELECT COUNT(*) FROM jobs").fetchone()[0], 1)
        self.assertEqual((yield self.broker.depth()), (0, 1))

    @defer.inlineCallbacks
    def test_partial_failure_names_each_files_status(self):
        yield self.setup_export()
        notes = os.path.join(self.results, "notes.txt")
        body = self.request([*self.files, notes])
        yield self.broker.publish_export_request(body)
        [(_props, complete)] = yield self.broker.collect("md.export.complete", 1, settle=0.5)
        self.assertEqual(complete["status"], "PartialFailure")
        rel = [os.path.relpath(f, self.gw.storage_root) for f in self.files]
        self.assertEqual(complete["file_statuses"], {rel[0]: "Success", rel[1]: "Success",
                                                      os.path.relpath(notes, self.gw.storage_root):
                                                          "UnsupportedDataType"})
        self.assertIn("2 of 3", complete["message"])
        self.assertEqual(len(received_by_uid(self.received)), 2)

    @defer.inlineCallbacks
    def test_destination_down_is_a_failure_with_service_errors(self):
        yield self.setup_export()
        # Every file fails at a destination that is not there.
        body = self.request(self.files, destinations=("down",))
        yield self.broker.publish_export_request(body)
        [(_p, complete)] = yield self.broker.collect("md.export.complete", 1, settle=0.5)
        self.assertEqual(complete["status"], "Failure")
        self.assertEqual(set(complete["file_statuses"].values()), {"ServiceError"})

    @defer.inlineCallbacks
    def test_poison_messages_are_settled_once_and_answered_where_possible(self):
        yield self.setup_export()
        outside = os.path.abspath(self.mktemp())
        cases = [
            (b"{not json", None),
            (json.dumps({"files": ["x"], "destinations": ["pacs"]}).encode(), None),  # no task id
            (self.request(self.files, task="t-missing-field", correlation_id=None), "t-missing-field"),
            (self.request(self.files, task="t-unknown-dest", destinations=("nowhere",)), "t-unknown-dest"),
            (self.request(["../../" + outside + "/x.dcm", *self.files], task="t-outside"), "t-outside"),
            (self.request(["outputs/p1/gone.dcm", *self.files], task="t-missing-file"), "t-missing-file"),
        ]
        for body, _task in cases:
            if isinstance(body, dict):
                body = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
            yield self.broker.publish_export_request(body)
        answered = yield self.broker.collect("md.export.complete", 4, settle=1.0)
        by_task = {b["export_task_id"]: b for _p, b in answered}
        self.assertEqual(set(by_task), {t for _b, t in cases if t})
        self.assertEqual({b["status"] for b in by_task.values()}, {"Failure"})
        self.assertIn("correlation_id", by_task["t-missing-field"]["message"])
        self.assertIn("nowhere", by_task["t-unknown-dest"]["message"])
        self.assertEqual(set(by_task["t-unknown-dest"]["file_statuses"].values()), {"ConfigurationError"})
        outside_name = self.request(["../../" + outside + "/x.dcm"])["files"][0]
        self.assertEqual(by_task["t-outside"]["file_statuses"][outside_name], "ConfigurationError")
        self.assertEqual(by_task["t-missing-file"]["file_statuses"]["outputs/p1/gone.dcm"], "DownloadError")
        self.assertIn("gone.dcm", by_task["t-missing-file"]["message"])
        # Settled, not looping: the queue is empty, nothing was exported, the consumer is still there.
        self.assertEqual((yield self.broker.depth()), (0, 1))
        rejected = [e for e in self.events.named("export_request") if e["outcome"] == "rejected"]
        self.assertEqual(len(rejected), len(cases))
        self.assertTrue(all(e["reason"] for e in rejected))
        self.assertEqual(received_by_uid(self.received), {})
        # And the gateway still exports a good request after all that.
        yield self.broker.publish_export_request(self.request(self.files, task="t-good"))
        [(_p, good)] = yield self.broker.collect("md.export.complete", 1, settle=0.2)
        self.assertEqual(good["status"], "Success")


class BrokerRefusalTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_an_exchange_the_broker_refuses_is_reported_and_retried(self):
        """The exchange exists as a fanout: the broker closes the channel on
        our declaration; the gateway says why, keeps trying, receives DICOM."""
        import pika

        events = Events(self)
        broker = ThrowawayBroker(self)
        name = broker.exchange + "-fanout"

        def declare(kind):
            conn = pika.BlockingConnection(pika.URLParameters(rabbit_url))
            try:
                if kind:
                    conn.channel().exchange_declare(name, kind, durable=True)
                else:
                    conn.channel().exchange_delete(name)
            finally:
                conn.close()

        yield in_thread(declare, "fanout")
        self.addCleanup(in_thread, declare, None)
        gw = yield start(self, broker.settings().replace(f'exchange = "{broker.exchange}"', f'exchange = "{name}"'),
                         api=True)
        gw.messaging.broker.max_delay = 0.5
        yield wait_for(lambda: events.named("messaging.broker"), what="a broker state logged")
        [event] = events.named("messaging.broker")
        self.assertEqual(event["state"], "disconnected")
        self.assertIn("PRECONDITION_FAILED", event["reason"])
        yield sleep(1.5)
        self.assertEqual(len(events.named("messaging.broker")), 1)  # retried, not logged again
        code, health = yield http_get(gw.http_port, "/health")
        health = json.loads(health)
        self.assertEqual((code, health["status"]), (200, "degraded"))
        self.assertIn("PRECONDITION_FAILED", health["reasons"][0])


class CredentialsTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_wrong_password_is_reported_as_such(self):
        events = Events(self)
        broker = ThrowawayBroker(self)
        yield start(self, broker.settings(url=rabbit_url.replace("guest:guest", "guest:wrong")))
        yield wait_for(lambda: events.named("messaging.broker"), what="a broker state logged")
        [event] = events.named("messaging.broker")
        self.assertEqual(event["state"], "disconnected")
        self.assertIn("password", event["reason"])
        self.assertNotIn("wrong", event["url"])


class TLSTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_amqps_with_our_ca_and_refused_without_it(self):
        from tests.integration.harness import make_certificates
        from tests.integration.rabbit import TLSRelay

        certs = make_certificates(self)
        broker = ThrowawayBroker(self)
        relay = TLSRelay(certs)
        relay.start()
        self.addCleanup(relay.cut)
        gw = yield start(self, broker.settings(url=relay.url, ca_certificates=f"{certs}/ca.pem"))
        yield wait_for(lambda: gw.messaging.broker.connected, what="connected over TLS")
        files = dicomfiles.make_series(self.mktemp(), 1, rows=16, cols=16)
        out, err, code = yield run("storescu", "-aec", "DICOMGW", "127.0.0.1", str(gw.port), *files)
        self.assertEqual(code, 0, err)
        [(_props, body)] = yield broker.collect("md.workflow.request", 1)
        self.assertEqual(body["file_count"], 1)

        # The system's CAs do not know the development CA: no connection.
        events = Events(self)
        other = yield start(self, broker.settings(url=relay.url))
        yield wait_for(lambda: events.named("messaging.broker"), what="a broker state logged")
        [event] = events.named("messaging.broker")
        self.assertEqual(event["state"], "disconnected")
        self.assertFalse(other.messaging.broker.connected)
        self.assertIn("certificate verify failed", event["reason"])
