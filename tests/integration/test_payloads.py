"""Payloads and pipelines end to end: real peers send, pipelines run, files are checked."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time

import blake3
import pydicom
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web import resource, server

from gateway.config import config_from_string
from gateway.tap import makeService
from gateway.testing import listening_port
from tests import dicomfiles
from tests.integration.harness import (RunningGateway, free_port, gateway_config, in_thread, require_pynetdicom, run,
                                       start_gateway)

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "etc", "pipelines", "summarize.py")
PY = sys.executable


def _job_state(gw, job_id):
    conn = sqlite3.connect(os.path.join(gw.storage_root, "exports.sqlite"))
    try:
        return conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
    finally:
        conn.close()


def toml_list(items):
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


@defer.inlineCallbacks
def start(testcase, aes, pipelines="", storage_keys="", reclaim_interval=3600, api=False):
    """A gateway whose [[ae]] tables and [pipeline.*] tables the test writes."""
    root = os.path.abspath(testcase.mktemp())
    text = gateway_config(root, aes=())
    if api:
        text = text.replace('dicom = "tcp:0:interface=127.0.0.1"',
                            'dicom = "tcp:0:interface=127.0.0.1"\nhttp = "tcp:0:interface=127.0.0.1"')
    text = text.replace("[storage]\n", "[storage]\n" + storage_keys + "\n", 1)
    text += f"\n[reclaimer]\ninterval = {reclaim_interval}\n" + pipelines + "\n" + aes
    config = config_from_string(text)
    service = makeService({"config_object": config, "install_sighup": False}, reactor)
    service.startService()
    testcase.addCleanup(service.stopService)
    port = yield listening_port(service)
    gw = RunningGateway(service, port)
    if api:
        gw.http_port = (yield listening_port(service, "http")).getHost().port
    yield service.getServiceNamed("payloads").recovered
    return gw


def ae_table(title, pipelines=(), grouping="study", timeout=0.3):
    return (f'[[ae]]\ntitle = "{title}"\ngrouping = "{grouping}"\ntimeout = {timeout}\n'
            f"pipelines = {toml_list(pipelines)}\n")


def query(gw, sql, *args):
    conn = sqlite3.connect(os.path.join(gw.storage_root, "dicomgw.sqlite"))
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


@defer.inlineCallbacks
def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"timed out waiting for {what}: {predicate.__doc__ or ''}")


def pynetdicom_send(port, files, called="DICOMGW", abort_after=None):
    """Send files on one association; release, or abort after ``abort_after`` stores."""
    pynetdicom = require_pynetdicom()
    ae = pynetdicom.AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for path in files:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    statuses = []
    for i, path in enumerate(files):
        if abort_after is not None and i == abort_after:
            assoc.abort()
            return statuses
        statuses.append(assoc.send_c_store(path).Status)
    assoc.release()
    return statuses


class Events:
    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def named(self, name):
        return [e for e in self.events if e.get("event") == name]


class PayloadTests(unittest.TestCase):
    timeout = 90

    def series(self, count, **kw):
        return dicomfiles.make_series(self.mktemp(), count, rows=32, cols=32, **kw)

    @defer.inlineCallbacks
    def test_study_over_two_associations_is_one_payload_and_runs_the_pipeline(self):
        pipelines = f'[pipeline.summary]\ncommand = {toml_list([PY, EXAMPLE, "{manifest}", "{output}", "--copy"])}\n'
        # The timeout leaves room for the second association on a busy machine.
        gw = yield start(self, ae_table("DICOMGW", ["summary"], timeout=2), pipelines)
        files = self.series(4)
        s1 = yield in_thread(pynetdicom_send, gw.port, files[:2])
        s2 = yield in_thread(pynetdicom_send, gw.port, files[2:])
        self.assertEqual(s1 + s2, [0, 0, 0, 0])
        yield wait_for(lambda: query(gw, "SELECT state FROM jobs") == [("done",)], what="job done")

        [(pid, path, state)] = query(gw, "SELECT id, path, state FROM payloads")
        self.assertEqual(state, "done")
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
        self.assertEqual(manifest["payload"], pid)
        self.assertEqual(manifest["ae"], "DICOMGW")
        self.assertEqual(manifest["pipelines"], ["summary"])
        self.assertEqual(len(manifest["associations"]), 2)
        self.assertEqual({a["result"] for a in manifest["associations"]}, {"released"})
        sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in files}
        self.assertEqual({i["sop_instance_uid"] for i in manifest["instances"]}, set(sent))
        for inst in manifest["instances"]:
            stored = os.path.join(path, inst["path"])
            self.assertEqual(os.path.getsize(stored), inst["size"])
            self.assertEqual(dicomfiles.dataset_bytes(stored), dicomfiles.dataset_bytes(sent[inst["sop_instance_uid"]]))
            with open(stored, "rb") as f:
                self.assertEqual(inst["digest"], "blake3:" + blake3.blake3(f.read()).hexdigest())
            self.assertNotIn("sha256", inst)  # only when that is the algorithm
        # The inbox links are gone: the payload directory holds the files.
        self.assertEqual(gw.stored_files(), [])
        out = os.path.join(gw.storage_root, "outputs", pid, "summary")
        with open(os.path.join(out, "summary.json")) as f:
            self.assertEqual(json.load(f)["instances"], 4)
        # --copy made 4 result files; with no export destinations they stay
        # in the output directory (export: test_results_exported_...).
        self.assertEqual(query(gw, "SELECT attempts, outputs, export_jobs FROM jobs"), [(1, 4, "[]")])

    @defer.inlineCallbacks
    def test_abort_mid_series_contributes_nothing_and_leaves_no_files(self):
        pipelines = f'[pipeline.p]\ncommand = {toml_list([PY, "-c", "pass"])}\n'
        gw = yield start(self, ae_table("DICOMGW", ["p"], timeout=0.2), pipelines)
        files = self.series(5)
        statuses = yield in_thread(pynetdicom_send, gw.port, files, abort_after=3)
        self.assertEqual(statuses, [0, 0, 0])
        yield wait_for(lambda: query(gw, "SELECT state FROM associations") == [("aborted",)],
                       what="association recorded as aborted")
        yield wait_for(lambda: not gw.stored_files(), what="aborted files removed")
        yield task.deferLater(reactor, 0.5, lambda: None)  # longer than the payload timeout
        self.assertEqual(query(gw, "SELECT COUNT(*) FROM payloads"), [(0,)])
        self.assertEqual(query(gw, "SELECT state, COUNT(*) FROM instances GROUP BY state"), [("removed", 3)])
        self.assertFalse(os.path.exists(os.path.join(gw.storage_root, "payloads")))

    @defer.inlineCallbacks
    def test_aborted_instances_are_kept_for_aborted_retention(self):
        gw = yield start(self, ae_table("DICOMGW", ["p"]),
                         f'[pipeline.p]\ncommand = {toml_list([PY, "-c", "pass"])}\n',
                         storage_keys="aborted_retention = 2")
        files = self.series(3)
        yield in_thread(pynetdicom_send, gw.port, files, abort_after=2)
        yield wait_for(lambda: query(gw, "SELECT DISTINCT state FROM instances") == [("aborted",)],
                       what="instances marked aborted")
        self.assertEqual(len(gw.stored_files()), 2)
        yield gw.service.getServiceNamed("reclaimer").run()
        self.assertEqual(len(gw.stored_files()), 2)  # retention not over yet
        yield task.deferLater(reactor, 2.1, lambda: None)
        yield gw.service.getServiceNamed("reclaimer").run()
        self.assertEqual(gw.stored_files(), [])
        self.assertEqual(query(gw, "SELECT DISTINCT state FROM instances"), [("removed",)])
        self.assertEqual(query(gw, "SELECT COUNT(*) FROM payloads"), [(0,)])

    @defer.inlineCallbacks
    def test_failing_command_is_retried_then_left_failed(self):
        events = Events(self)
        script = "import os, sys; print('broken', os.environ['DICOMGW_ATTEMPT']); sys.exit(3)"
        pipelines = (f'[pipeline.bad]\ncommand = {toml_list([PY, "-c", script])}\n'
                     "retries = 2\nbackoff = 0.05\n")
        gw = yield start(self, ae_table("DICOMGW", ["bad"], timeout=0.2), pipelines)
        yield in_thread(pynetdicom_send, gw.port, self.series(1))
        yield wait_for(lambda: query(gw, "SELECT state FROM jobs") == [("failed",)], what="job failed")
        [(attempts, reason)] = query(gw, "SELECT attempts, reason FROM jobs")
        self.assertEqual(attempts, 3)
        self.assertEqual(reason, "exit status 3: broken 3")
        self.assertEqual(query(gw, "SELECT state FROM payloads"), [("failed",)])
        runs = [(e["attempt"], e["outcome"]) for e in events.named("pipeline.run")]
        self.assertEqual(runs, [(1, "retry"), (2, "retry"), (3, "failed")])
        # A failed payload is kept for an operator: the reclaimer leaves it.
        [(path,)] = query(gw, "SELECT path FROM payloads")
        yield gw.service.getServiceNamed("reclaimer").run()
        self.assertTrue(os.path.exists(os.path.join(path, "manifest.json")))

    @defer.inlineCallbacks
    def test_command_timeout_is_a_failure(self):
        pipelines = (f'[pipeline.slow]\ncommand = {toml_list([PY, "-c", "import time; time.sleep(30)"])}\n'
                     "retries = 0\ntimeout = 0.5\n")
        gw = yield start(self, ae_table("DICOMGW", ["slow"], timeout=0.2), pipelines)
        yield in_thread(pynetdicom_send, gw.port, self.series(1))
        yield wait_for(lambda: query(gw, "SELECT state FROM jobs") == [("failed",)], what="job failed")
        self.assertEqual(query(gw, "SELECT reason FROM jobs"), [("timed out after 0.5 s",)])

    @defer.inlineCallbacks
    def test_webhook_receives_the_manifest_and_several_pipelines_each_get_the_payload(self):
        received = []

        class Hook(resource.Resource):
            isLeaf = True

            def render_POST(self, request):
                received.append((request.getHeader("content-type"), request.content.read(),
                                 request.getHeader("x-dicomgw-pipeline")))
                request.setResponseCode(500 if len(received) == 1 else 200)
                return b"ok"

        port = reactor.listenTCP(0, server.Site(Hook()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/hook"
        pipelines = (f'[pipeline.hook]\nwebhook = "{url}"\nbackoff = 0.05\ntimeout = 5\n'
                     f'[pipeline.local]\ncommand = {toml_list([PY, EXAMPLE, "{manifest}", "{output}"])}\n')
        gw = yield start(self, ae_table("DICOMGW", ["hook", "local"], timeout=0.2), pipelines)
        files = self.series(2)
        yield in_thread(pynetdicom_send, gw.port, files)
        yield wait_for(lambda: sorted(query(gw, "SELECT pipeline, state, attempts FROM jobs")) ==
                       [("hook", "done", 2), ("local", "done", 1)], what="both jobs done")
        self.assertEqual(len(received), 2)  # the first answer was 500: retried once
        ctype, body, pipeline = received[1]
        self.assertEqual((ctype, pipeline), ("application/json", "hook"))
        manifest = json.loads(body)
        [(pid, path)] = query(gw, "SELECT id, path FROM payloads")
        self.assertEqual(manifest["payload"], pid)
        with open(os.path.join(path, "manifest.json"), "rb") as f:
            self.assertEqual(json.loads(f.read()), manifest)
        self.assertEqual(len(manifest["instances"]), 2)

    @defer.inlineCallbacks
    def test_reclaimer_frees_only_when_allowed(self):
        gate = os.path.abspath(self.mktemp())
        # The pipeline runs until the test creates the gate file (bounded: 20 s).
        script = ("import os, sys, time\n"
                  "for _ in range(400):\n"
                  f"    if os.path.exists({gate!r}): sys.exit(0)\n"
                  "    time.sleep(0.05)\n"
                  "sys.exit(1)\n")
        pipelines = f'[pipeline.wait]\ncommand = {toml_list([PY, "-c", script])}\nretries = 0\n'
        gw = yield start(self, ae_table("DICOMGW", ["wait"], timeout=0.2), pipelines,
                         storage_keys="retention = 1.5")
        yield in_thread(pynetdicom_send, gw.port, self.series(3))
        yield wait_for(lambda: query(gw, "SELECT state FROM jobs") == [("running",)], what="job running")
        [(path,)] = query(gw, "SELECT path FROM payloads")
        yield gw.service.getServiceNamed("reclaimer").run()
        self.assertEqual(len([n for n in os.listdir(path) if n.endswith(".dcm")]), 3)  # still needed
        open(gate, "w").close()
        yield wait_for(lambda: query(gw, "SELECT state FROM payloads") == [("done",)], what="payload done")
        yield gw.service.getServiceNamed("reclaimer").run()
        self.assertTrue(os.path.isdir(path))  # retention not over yet
        yield task.deferLater(reactor, 1.6, lambda: None)
        events = Events(self)
        freed = yield gw.service.getServiceNamed("reclaimer").run()
        self.assertFalse(os.path.exists(path))
        self.assertGreater(freed, 3 * 32 * 32 * 2)
        self.assertEqual(query(gw, "SELECT state FROM payloads"), [("removed",)])
        [freed_event] = events.named("reclaimer.freed")
        self.assertEqual(freed_event["payloads"], 1)

    @defer.inlineCallbacks
    def test_results_exported_and_outputs_kept_until_every_export_ends(self):
        """Pipeline results go to a live destination, byte for byte; the
        reclaimer keeps them while another destination's job is still retrying."""
        receiver = yield start_gateway(self, aes=("ARCHIVE",))
        down = free_port()  # nothing listens: connections are refused
        pipelines = (f'[pipeline.echo]\ncommand = {toml_list([PY, EXAMPLE, "{manifest}", "{output}", "--copy"])}\n'
                     'export = ["archive", "down"]\n'
                     "[scu]\nretries = 1\nretry_delay = 3\nconnect_timeout = 2\n"
                     f'[[destination]]\nname = "archive"\nae_title = "ARCHIVE"\nhost = "127.0.0.1"\n'
                     f"port = {receiver.port}\n"
                     f'[[destination]]\nname = "down"\nae_title = "NOBODY"\nhost = "127.0.0.1"\nport = {down}\n')
        gw = yield start(self, ae_table("DICOMGW", ["echo"], timeout=0.2), pipelines)
        files = self.series(2)
        yield in_thread(pynetdicom_send, gw.port, files)
        yield wait_for(lambda: query(gw, "SELECT state FROM payloads") == [("done",)], what="payload done")
        [(pid, path)] = query(gw, "SELECT id, path FROM payloads")
        outputs = os.path.join(gw.storage_root, "outputs", pid)

        yield wait_for(lambda: len(receiver.stored_files("ARCHIVE")) == 2, what="results at the archive")
        sent = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
        for stored in receiver.stored_files("ARCHIVE"):
            uid = pydicom.dcmread(stored, stop_before_pixels=True).SOPInstanceUID
            self.assertEqual(dicomfiles.dataset_bytes(stored), dicomfiles.dataset_bytes(sent[uid]))

        jobs = yield gw.service.getServiceNamed("export").jobs()
        self.assertEqual({j["destination"] for j in jobs}, {"archive", "down"})
        by_name = {j["destination"]: j for j in jobs}
        yield wait_for(lambda: _job_state(gw, by_name["archive"]["id"]) == "done", what="archive job done")
        yield wait_for(lambda: _job_state(gw, by_name["down"]["id"]) == "retrying", what="down job retrying")
        yield gw.service.getServiceNamed("reclaimer").run()
        # The job to "down" has not ended: neither inputs nor outputs go.
        self.assertTrue(os.path.isdir(outputs))
        self.assertTrue(os.path.isdir(path))
        yield wait_for(lambda: _job_state(gw, by_name["down"]["id"]) == "failed", what="down job failed")
        yield gw.service.getServiceNamed("reclaimer").run()
        self.assertFalse(os.path.exists(outputs))
        self.assertFalse(os.path.exists(path))

    @defer.inlineCallbacks
    def test_ae_without_pipelines_keeps_instances(self):
        gw = yield start(self, ae_table("DICOMGW"))
        yield in_thread(pynetdicom_send, gw.port, self.series(2))
        yield wait_for(lambda: query(gw, "SELECT state FROM instances") == [("kept",), ("kept",)],
                       what="instances kept")
        self.assertEqual(len(gw.stored_files()), 2)
        self.assertEqual(query(gw, "SELECT COUNT(*) FROM payloads"), [(0,)])

    @defer.inlineCallbacks
    def test_storescu_study_indexed_with_attributes(self):
        gw = yield start(self, ae_table("DICOMGW"))
        # 128 KiB of pixels: more than the writer hashes before the response,
        # so the rest of each hash reaches the index after it (StoredInstance.digest).
        files = dicomfiles.make_series(self.mktemp(), 2, rows=256, cols=256)
        out, err, code = yield run("storescu", "-aet", "STORESCU", "-aec", "DICOMGW", "127.0.0.1",
                                   str(gw.port), *files)
        self.assertEqual(code, 0, err)
        yield wait_for(lambda: len(query(gw, "SELECT 1 FROM instances WHERE state = 'kept'")) == 2,
                       what="indexed")
        rows = query(gw, "SELECT sop_instance_uid, patient_id, patient_name, study_uid, modality, calling_ae, "
                         "called_ae, peer, size, digest, path, association FROM instances ORDER BY id")
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        self.assertEqual(rows[0][1:5], ("PAT001", "Test^Patient", ds.StudyInstanceUID, "CT"))
        self.assertEqual(rows[0][5:7], ("STORESCU", "DICOMGW"))
        self.assertTrue(rows[0][7].startswith("127.0.0.1:"))
        for row in rows:
            with open(row[10], "rb") as f:
                data = f.read()
            self.assertEqual((row[8], row[9]), (len(data), "blake3:" + blake3.blake3(data).hexdigest()))
        self.assertEqual(rows[0][11], rows[1][11])


class ObserverTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_observer_named_in_config_is_told_of_instances_and_endings(self):
        gw = yield start(self, ae_table("DICOMGW") + '\n[notify]\nobservers = ["gateway.testing.RecordingObserver"]\n')
        observer = gw.scp.observers[-1]
        files = dicomfiles.make_series(self.mktemp(), 3, rows=16, cols=16)
        yield in_thread(pynetdicom_send, gw.port, files[:2])
        yield in_thread(pynetdicom_send, gw.port, files[2:], abort_after=0)
        yield wait_for(lambda: observer.ended, what="the abort to be reported")
        self.assertEqual(len(observer.stored), 2)
        instance, association = observer.stored[0]
        self.assertTrue(os.path.exists(instance.path))
        self.assertEqual((association.calling_ae, association.called_ae), ("PYNETDICOM", "DICOMGW"))
        self.assertEqual(observer.released, [association])
        [(ended, result)] = observer.ended
        self.assertNotEqual(ended.id, association.id)
        self.assertEqual(result, "aborted")

    @defer.inlineCallbacks
    def test_failing_observer_makes_the_store_fail(self):
        gw = yield start(self, ae_table("DICOMGW"))

        class Broken:
            def instance_stored(self, instance, association):
                raise RuntimeError("index unavailable")

            def association_released(self, association):
                pass

            def association_ended(self, association, result):
                pass

        gw.scp.observers.append(Broken())
        statuses = yield in_thread(pynetdicom_send, gw.port, dicomfiles.make_series(self.mktemp(), 1, rows=8, cols=8))
        self.assertEqual(statuses, [0x0110])
        self.flushLoggedErrors(RuntimeError)


class PayloadApiTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_management_api_lists_payloads_with_their_jobs(self):
        from tests.integration.test_api import Client

        script = "import sys; sys.exit(2)"
        pipelines = (f'[pipeline.ok]\ncommand = {toml_list([PY, "-c", "pass"])}\n'
                     f'[pipeline.bad]\ncommand = {toml_list([PY, "-c", script])}\nretries = 0\n')
        gw = yield start(self, ae_table("DICOMGW", ["ok", "bad"], timeout=0.2), pipelines, api=True)
        files = dicomfiles.make_series(self.mktemp(), 2, rows=8, cols=8)
        yield in_thread(pynetdicom_send, gw.port, files)
        yield wait_for(lambda: query(gw, "SELECT state FROM payloads") == [("failed",)], what="payload ended")
        code, body, _ = yield Client(gw.http_port).request("GET", "/payloads?state=failed")
        self.assertEqual(code, 200)
        [item] = body["items"]
        self.assertEqual((item["ae"], item["instances"], item["state"]), ("DICOMGW", 2, "failed"))
        self.assertEqual(item["key"], pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        self.assertEqual({k: v["state"] for k, v in item["pipelines"].items()}, {"ok": "done", "bad": "failed"})
        self.assertEqual(item["pipelines"]["bad"]["reason"], "exit status 2")
        # The same runs, counted from the services' own events.
        from prometheus_client.parser import text_string_to_metric_families

        code, text, _ = yield Client(gw.http_port).request("GET", "/metrics")
        self.assertEqual(code, 200)
        samples = {(m.name, tuple(sorted(m.labels.items()))): m.value
                   for family in text_string_to_metric_families(text) for m in family.samples}
        self.assertEqual(samples[("dicomgw_payloads_total", (("ae", "DICOMGW"),))], 1)
        self.assertEqual(samples[("dicomgw_pipeline_runs_total", (("outcome", "done"), ("pipeline", "ok")))], 1)
        self.assertEqual(samples[("dicomgw_pipeline_runs_total", (("outcome", "failed"), ("pipeline", "bad")))], 1)
