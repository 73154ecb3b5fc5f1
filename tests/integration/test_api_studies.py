"""The study-level API and pipeline job retry, against a running gateway fed by pynetdicom."""

from __future__ import annotations

import os
import sqlite3
import time

import pydicom
from pydicom.uid import generate_uid
from twisted.internet import defer
from twisted.trial import unittest

from tests import dicomfiles
from gateway.config.sections import default_node
from tests.integration.harness import in_thread, start_gateway
from tests.integration.test_api import Client
from tests.integration.test_payloads import PY, ae_table, pynetdicom_send, query, start, toml_list, wait_for


def _iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class StudyApiTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_studies_a_study_and_its_export(self):
        peer = yield start_gateway(self, aes=("PEER",))
        destination = f'[[destination]]\nname = "peer"\nae_title = "PEER"\nhost = "127.0.0.1"\nport = {peer.port}\n'
        gw = yield start(self, ae_table("DICOMGW") + ae_table("OTHER"), destination, api=True)
        c = Client(gw.http_port)
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        study_a, series_1, series_2 = generate_uid(), generate_uid(), generate_uid()
        a_files = [dicomfiles.ct_image(os.path.join(work, f"a{i}.dcm"), study_uid=study_a, series_uid=series,
                                       number=i + 1, rows=16, cols=16)
                   for i, series in enumerate((series_1, series_1, series_2))]
        b_file = dicomfiles.ct_image(os.path.join(work, "b.dcm"), rows=16, cols=16, patient_id="PAT002")
        study_b = pydicom.dcmread(b_file).StudyInstanceUID
        before = time.time() - 1
        self.assertEqual((yield in_thread(pynetdicom_send, gw.port, a_files)), [0, 0, 0])
        self.assertEqual((yield in_thread(pynetdicom_send, gw.port, [b_file], called="OTHER")), [0])
        # Study B's instance again: its file is replaced, and held once.
        self.assertEqual((yield in_thread(pynetdicom_send, gw.port, [b_file], called="OTHER")), [0])
        yield wait_for(lambda: query(gw, "SELECT COUNT(*) FROM instances WHERE state = 'kept'") == [(5,)],
                       what="five instances indexed")

        code, body, _ = yield c.request("GET", "/studies")
        self.assertEqual(code, 200, body)
        self.assertEqual((body["total"], body["limit"], body["offset"]), (2, 100, 0))
        self.assertEqual([s["StudyInstanceUID"] for s in body["items"]], [study_b, study_a])
        a = body["items"][1]
        self.assertEqual((a["PatientID"], a["PatientName"], a["modalities"], a["series"], a["instances"],
                          a["ae_titles"]), ("PAT001", "Test^Patient", ["CT"], 2, 3, ["DICOMGW"]))
        self.assertLessEqual(before, a["first_received"])
        self.assertLessEqual(a["first_received"], a["last_received"])
        self.assertEqual(body["items"][0]["ae_titles"], ["OTHER"])
        self.assertEqual((body["items"][0]["instances"], body["items"][0]["bytes"]), (1, os.path.getsize(
            os.path.join(gw.storage_root, "instances", "OTHER", pydicom.dcmread(b_file).SOPInstanceUID + ".dcm"))))
        code, b, _ = yield c.request("GET", f"/studies/{study_b}")
        self.assertEqual([len(s["instances"]) for s in b["series"]], [1])

        for path, expected in (("/studies?PatientID=PAT002", [study_b]), ("/studies?ae=DICOMGW", [study_a]),
                               (f"/studies?StudyInstanceUID={study_a}", [study_a]),
                               (f"/studies?received_since={_iso(time.time() + 3600)}", []),
                               (f"/studies?received_before={_iso(time.time() + 3600)}&received_since={_iso(before)}",
                                [study_b, study_a]),
                               ("/studies?limit=1&offset=1", [study_a])):
            code, body, _ = yield c.request("GET", path)
            self.assertEqual((code, [s["StudyInstanceUID"] for s in body["items"]]), (200, expected), path)
        self.assertEqual(body["total"], 2)
        for path, named in (("/studies?received_since=yesterday", "'received_since'"),
                            ("/studies?received_before=2026-12-04", "'received_before'"),
                            ("/studies?StudyInstanceUID=1.2.abc", "'StudyInstanceUID'"),
                            ("/studies?PatientID=" + "x" * 65, "'PatientID'"),
                            ("/studies?modality=CT", "'modality'"),
                            ("/studies/not-a-uid", "'uid'")):
            code, body, _ = yield c.request("GET", path)
            self.assertEqual(code, 400, path)
            self.assertIn(named, body["error"], path)
        code, body, _ = yield c.request("GET", "/studies/1.2.3")
        self.assertEqual(code, 404)

        code, study, _ = yield c.request("GET", f"/studies/{study_a}")
        self.assertEqual(code, 200, study)
        self.assertEqual((study["StudyInstanceUID"], study["instances"]), (study_a, 3))
        self.assertEqual(sorted((s["SeriesInstanceUID"], len(s["instances"])) for s in study["series"]),
                         sorted([(series_1, 2), (series_2, 1)]))
        sent = {pydicom.dcmread(p).SOPInstanceUID for p in a_files}
        instances = [i for s in study["series"] for i in s["instances"]]
        self.assertEqual({i["SOPInstanceUID"] for i in instances}, sent)
        [association] = study["associations"]
        for i in instances:
            self.assertTrue(os.path.isfile(i["path"]), i)
            self.assertEqual(i["size"], os.path.getsize(i["path"]))
            self.assertTrue(i["digest"].startswith("blake3:"), i)
            self.assertEqual((i["called_ae"], i["calling_ae"], i["state"], i["node"], i["association"]),
                             ("DICOMGW", "PYNETDICOM", "kept", default_node(), association["id"]))
        self.assertEqual(study["bytes"], sum(i["size"] for i in instances))
        self.assertEqual(a["bytes"], study["bytes"])
        self.assertEqual((association["calling_ae"], association["state"], association["node"]),
                         ("PYNETDICOM", "released", default_node()))

        # Several nodes: each row says which node received it ([gateway] node).
        conn = sqlite3.connect(os.path.join(gw.storage_root, "dicomgw.sqlite"))
        conn.execute("UPDATE instances SET node = 'gw-b'")
        conn.execute("UPDATE associations SET node = 'gw-b'")
        conn.commit()
        conn.close()
        code, study, _ = yield c.request("GET", f"/studies/{study_a}")
        self.assertEqual({i["node"] for s in study["series"] for i in s["instances"]}, {"gw-b"})
        self.assertEqual(study["associations"][0]["node"], "gw-b")

        code, body, _ = yield c.request("POST", f"/studies/{study_a}/export", {"destinations": ["peer"]})
        self.assertEqual(code, 202, body)
        self.assertEqual((body["StudyInstanceUID"], body["files"]), (study_a, 3))
        [job] = body["jobs"]
        self.assertEqual((job["destination"], job["files"], job["origin"]), ("peer", 3, f"api study:{study_a}"))
        self.assertEqual((yield gw.service.getServiceNamed("export").wait(job["id"])), "done")
        received = {pydicom.dcmread(p).SOPInstanceUID: p for p in peer.stored_files("PEER")}
        self.assertEqual(set(received), sent)
        for p in a_files:
            self.assertEqual(dicomfiles.dataset_bytes(received[pydicom.dcmread(p).SOPInstanceUID]),
                             dicomfiles.dataset_bytes(p))

        for body, code_expected in (({"destinations": ["nowhere"]}, 422), ({"destinations": []}, 400),
                                    ({"destinations": ["peer"], "paths": ["x"]}, 400)):
            code, answer, _ = yield c.request("POST", f"/studies/{study_a}/export", body)
            self.assertEqual(code, code_expected, (body, answer))
        code, answer, _ = yield c.request("POST", "/studies/1.2.3/export", {"destinations": ["peer"]})
        self.assertEqual(code, 404)


class RetryTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_failed_job_runs_again_once_asked(self):
        flag = os.path.abspath(self.mktemp())
        script = f"import os, sys; sys.exit(0 if os.path.exists({flag!r}) else 2)"
        pipelines = f'[pipeline.flaky]\ncommand = {toml_list([PY, "-c", script])}\nretries = 0\n'
        gw = yield start(self, ae_table("DICOMGW", ["flaky"], timeout=0.2), pipelines, api=True)
        c = Client(gw.http_port)
        files = dicomfiles.make_series(self.mktemp(), 1, rows=8, cols=8)
        yield in_thread(pynetdicom_send, gw.port, files)
        yield wait_for(lambda: query(gw, "SELECT state FROM payloads") == [("failed",)], what="payload failed")
        code, body, _ = yield c.request("GET", "/payloads?state=failed")
        [payload] = body["items"]
        pid = payload["id"]
        code, body, _ = yield c.request("POST", f"/payloads/{pid}/jobs/other/retry")
        self.assertEqual(code, 404, body)
        code, body, _ = yield c.request("POST", f"/payloads/{pid}/jobs/flaky/retry", {})
        self.assertEqual(code, 202, body)
        self.assertEqual((body["payload"], body["pipeline"], body["state"], body["attempts"]),
                         (pid, "flaky", "pending", 1))
        # It ran and failed again (the flag is not there yet).
        yield wait_for(lambda: query(gw, "SELECT state, attempts FROM jobs") == [("failed", 2)],
                       what="second attempt failed")
        with open(flag, "w"):
            pass
        code, body, _ = yield c.request("POST", f"/payloads/{pid}/jobs/flaky/retry")
        self.assertEqual(code, 202, body)
        yield wait_for(lambda: query(gw, "SELECT state FROM payloads") == [("done",)], what="payload done")
        self.assertEqual(query(gw, "SELECT state, attempts FROM jobs"), [("done", 3)])
        code, body, _ = yield c.request("POST", f"/payloads/{pid}/jobs/flaky/retry")
        self.assertEqual(code, 409, body)
        self.assertIn("the job is done, not failed", body["error"])
        code, body, _ = yield c.request("POST", "/payloads/../jobs/flaky/retry")
        self.assertIn(code, (400, 404))
