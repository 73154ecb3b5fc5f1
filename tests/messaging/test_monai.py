"""MONAI Deploy event bodies: built and parsed without a broker."""

from __future__ import annotations

import json
import os
import uuid

from twisted.trial import unittest

from gateway.messaging import monai


class WorkflowRequestTests(unittest.TestCase):
    def build(self, root="/srv/gw"):
        payload = {"id": "1700000000-abcdef012345", "ae": "DICOMGW", "created": 1700000000.25}
        instances = [{"path": f"{root}/payloads/1700000000-abcdef012345/1.2.{i}.dcm"} for i in range(3)]
        associations = [{"id": "1-aaaaaa", "calling_ae": "CT01", "called_ae": "DICOMGW"},
                         {"id": "2-bbbbbb", "calling_ae": "CT02", "called_ae": "DICOMGW"},
                         {"id": "3-cccccc", "calling_ae": "CT01", "called_ae": "DICOMGW"}]
        return monai.workflow_request(payload, instances, associations, root=root, bucket="bucket1",
                                      workflows=("wf-a", "wf-b"), routing_key="md.workflow.request")

    def test_fields_follow_monai_deploy(self):
        m = self.build()
        body = json.loads(m.body)
        self.assertEqual(set(body), {"payload_id", "workflows", "file_count", "correlation_id", "bucket", "trigger",
                                     "data_origins", "timestamp", "payload"})
        self.assertEqual(str(uuid.UUID(body["payload_id"])), body["payload_id"])
        self.assertEqual(body["workflows"], ["wf-a", "wf-b"])
        self.assertEqual(body["file_count"], 3)
        self.assertEqual(body["correlation_id"], "1-aaaaaa")  # the first association
        self.assertEqual(body["bucket"], "bucket1")
        self.assertEqual(body["trigger"], {"dataService": "DIMSE", "source": "CT01", "destination": "DICOMGW"})
        self.assertEqual(body["data_origins"], [
            {"dataService": "DIMSE", "source": "CT01", "destination": "DICOMGW"},
            {"dataService": "DIMSE", "source": "CT02", "destination": "DICOMGW"}])
        self.assertEqual(body["timestamp"], "2023-11-14T22:13:20.250Z")
        self.assertEqual(body["payload"][0], {"path": "payloads/1700000000-abcdef012345/1.2.0.dcm", "metadata": ""})
        self.assertEqual(m.routing_key, "md.workflow.request")
        self.assertEqual(m.type, "WorkflowRequestEvent")

    def test_ids_are_stable_across_retries(self):
        a, b = self.build(), self.build("/other/root")
        self.assertEqual(a.message_id, b.message_id)
        self.assertEqual(json.loads(a.body)["payload_id"], json.loads(b.body)["payload_id"])
        self.assertNotEqual(a.message_id, json.loads(a.body)["payload_id"])

    def test_properties(self):
        props = self.build().properties("dicomgw")
        self.assertEqual(props["content_type"], "application/json")
        self.assertEqual(props["delivery_mode"], 2)
        self.assertEqual(props["app_id"], "dicomgw")
        self.assertEqual(props["correlation_id"], "1-aaaaaa")
        self.assertEqual(props["timestamp"], 1700000000)


def request(**fields):
    body = {"workflow_instance_id": "wi-1", "export_task_id": "task-1", "correlation_id": "c-1",
            "files": ["payloads/p/1.dcm", "payloads/p/2.dcm"], "destinations": ["pacs"]}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


class ExportRequestTests(unittest.TestCase):
    def test_valid(self):
        r = monai.parse_export_request(request(), "m-1")
        self.assertEqual((r.workflow_instance_id, r.export_task_id, r.correlation_id, r.message_id),
                         ("wi-1", "task-1", "c-1", "m-1"))
        self.assertEqual(r.files, ("payloads/p/1.dcm", "payloads/p/2.dcm"))
        self.assertEqual(r.destinations, ("pacs",))
        self.assertEqual(r.key, "task-1")

    def test_poison_without_task_id_knows_no_task(self):
        for body in (b"{not json", b"\xff\xfe", b"[1, 2]", request(export_task_id=None),
                     request(export_task_id=""), b"x" * (monai.MAX_REQUEST_BYTES + 1)):
            with self.assertRaises(monai.PoisonMessage) as e:
                monai.parse_export_request(body)
            self.assertIsNone(e.exception.task, body[:40])

    def test_poison_with_task_id_keeps_it_for_the_answer(self):
        for fields, word in (({"workflow_instance_id": None}, "workflow_instance_id"),
                             ({"correlation_id": 7}, "correlation_id"), ({"files": []}, "files"),
                             ({"files": "a.dcm"}, "files"), ({"destinations": [1]}, "destinations"),
                             ({"files": ["ok", ""]}, "files")):
            with self.assertRaises(monai.PoisonMessage) as e:
                monai.parse_export_request(request(**fields))
            self.assertIn(word, e.exception.reason)
            self.assertEqual(e.exception.task.export_task_id, "task-1")

    def test_resolve_file_stays_inside_the_root(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "payloads"))
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        os.symlink(outside, os.path.join(root, "payloads", "link"))
        self.assertEqual(monai.resolve_file("payloads/x.dcm", root), os.path.join(root, "payloads", "x.dcm"))
        for name in ("../x.dcm", "payloads/../../x.dcm", "/etc/passwd", "payloads/link/x.dcm", ".", ""):
            self.assertIsNone(monai.resolve_file(name, root), name)


class ExportCompleteTests(unittest.TestCase):
    def test_file_statuses(self):
        self.assertEqual(monai.file_status("sent", None), "Success")
        self.assertEqual(monai.file_status("failed", "cannot read: not a DICOM Part 10 file (no DICM prefix)"),
                         "UnsupportedDataType")
        self.assertEqual(monai.file_status("failed", "cannot read: [Errno 2] No such file or directory: 'x'"),
                         "DownloadError")
        self.assertEqual(monai.file_status("failed", "destination did not accept 1.2 in transfer syntax 1.2.3: x"),
                         "UnsupportedDataType")
        self.assertEqual(monai.file_status("failed", "destination 'x' is no longer configured"),
                         "ConfigurationError")
        self.assertEqual(monai.file_status("failed", "destination answered 0xA700"), "ServiceError")

    def test_overall_and_combined(self):
        self.assertEqual(monai.overall_status(["Success", "Success"]), "Success")
        self.assertEqual(monai.overall_status(["Success", "ServiceError"]), "PartialFailure")
        self.assertEqual(monai.overall_status(["DownloadError"]), "Failure")
        self.assertEqual(monai.combine([{"a": "Success", "b": "Success"}, {"a": "ServiceError", "b": "Success"}]),
                         {"a": "ServiceError", "b": "Success"})

    def test_body(self):
        r = monai.parse_export_request(request(), "m-1")
        outcome = monai.ExportOutcome("PartialFailure", "1 of 2", {"payloads/p/1.dcm": "Success",
                                                                   "payloads/p/2.dcm": "ServiceError"})
        m = monai.export_complete(r, outcome, routing_key="md.export.complete", now=5.0)
        self.assertEqual(json.loads(m.body), {
            "workflow_instance_id": "wi-1", "export_task_id": "task-1", "status": "PartialFailure",
            "message": "1 of 2", "correlation_id": "c-1",
            "file_statuses": {"payloads/p/1.dcm": "Success", "payloads/p/2.dcm": "ServiceError"}})
        self.assertEqual(m.correlation_id, "c-1")
        self.assertEqual(m.message_id, monai.export_complete(r, outcome, routing_key="x", now=9).message_id)
