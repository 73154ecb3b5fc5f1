"""The management API against a running gateway, with real DICOM peers."""

from __future__ import annotations

import json
import os

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from zope.interface import implementer

from gateway.config import config_from_string
from gateway.interfaces import IHealthCheck
from gateway.tap import makeService
from gateway.testing import (FakeDestinations, FakeExportQueue, FakePayloadQuery,
                             listening_port)
from tests import dicomfiles
from tests.integration.harness import gateway_config, in_thread, require_pynetdicom, run, start_gateway

TOKEN = "s3cret-token-for-tests-0123456789"


@defer.inlineCallbacks
def start_with_api(testcase, token=False, **kw):
    storage = os.path.abspath(testcase.mktemp())
    text = gateway_config(storage, **kw).replace(
        'dicom = "tcp:0:interface=127.0.0.1"',
        'dicom = "tcp:0:interface=127.0.0.1"\nhttp = "tcp:0:interface=127.0.0.1"')
    if token:
        token_file = os.path.abspath(testcase.mktemp())
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")
        text += f'\n[http]\ntoken_file = "{token_file}"\n'
    config = config_from_string(text)
    service = makeService({"config_object": config, "install_sighup": False}, reactor)
    service.startService()
    testcase.addCleanup(service.stopService)
    dicom = yield listening_port(service, "dicom")
    http = yield listening_port(service, "http")
    return service, dicom.getHost().port, http.getHost().port


class Client:
    def __init__(self, port, token=None):
        self.base = f"http://127.0.0.1:{port}"
        self.token = token
        self.agent = Agent(reactor)

    @defer.inlineCallbacks
    def request(self, method, path, body=None, token=None, raw=None):
        headers = Headers()
        token = token if token is not None else self.token
        if token:
            headers.addRawHeader(b"authorization", f"Bearer {token}".encode())
        producer = None
        if body is not None or raw is not None:
            from twisted.web.client import FileBodyProducer
            import io

            data = raw if raw is not None else json.dumps(body).encode()
            producer = FileBodyProducer(io.BytesIO(data))
            headers.addRawHeader(b"content-type", b"application/json")
        response = yield self.agent.request(method.encode(), (self.base + path).encode(), headers, producer)
        data = yield readBody(response)
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode()
        parsed = json.loads(data) if ctype.startswith("application/json") else data.decode()
        return response.code, parsed, response.headers


@implementer(IHealthCheck)
class _Full:
    def health_problems(self):
        return ["storage is over the watermark (80% used, limit 75%)"]


class APITests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_health_ok_then_listener_down_and_provider_reason(self):
        service, _, http = yield start_with_api(self)
        c = Client(http)
        code, body, _ = yield c.request("GET", "/health")
        self.assertEqual((code, body), (200, {"status": "ok"}))
        # A health check provider (the watermark, issue 3) reports a reason.
        from twisted.application.service import Service

        class Watermark(Service, _Full):
            pass

        Watermark().setServiceParent(service)
        code, body, _ = yield c.request("GET", "/health")
        self.assertEqual(code, 503)
        self.assertEqual(body["reasons"], ["storage is over the watermark (80% used, limit 75%)"])
        # The DICOM listener going away makes the gateway unhealthy too.
        yield service.getServiceNamed("dicom").stopService()
        code, body, _ = yield c.request("GET", "/health")
        self.assertEqual(code, 503)
        self.assertIn("listener dicom is down: not running", body["reasons"])

    @defer.inlineCallbacks
    def test_status_lists_an_active_association(self):
        pynetdicom = require_pynetdicom()
        service, dicom, http = yield start_with_api(self)
        ae = pynetdicom.AE(ae_title="HOLDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        assoc = yield in_thread(ae.associate, "127.0.0.1", dicom, ae_title="DICOMGW")
        self.assertTrue(assoc.is_established)
        try:
            code, body, _ = yield Client(http).request("GET", "/status")
        finally:
            yield in_thread(assoc.release)
        self.assertEqual(code, 200)
        self.assertEqual(body["associations"]["active"], 1)
        entry = body["associations"]["list"][0]
        self.assertEqual((entry["calling_ae"], entry["called_ae"]), ("HOLDER", "DICOMGW"))
        self.assertTrue(entry["peer"].startswith("127.0.0.1:"))
        self.assertEqual(body["listeners"]["dicom"], {"state": "up", "address": f"127.0.0.1:{dicom}"})
        self.assertGreater(body["storage"]["free_bytes"], 0)
        self.assertIn("disk_pending_bytes", body["queues"])
        self.assertEqual(body["queues"]["disk_jobs"], 0)  # the disk pool's backlog: none when idle

    @defer.inlineCallbacks
    def test_metrics_parsed_by_prometheus_client(self):
        from prometheus_client.parser import text_string_to_metric_families

        service, dicom, http = yield start_with_api(self)
        src = self.mktemp()
        os.makedirs(src)
        files = [dicomfiles.small_instance(os.path.join(src, f"{i}.dcm"), number=i) for i in range(3)]
        out, err, code = yield run("storescu", "-aec", "DICOMGW", "127.0.0.1", str(dicom), *files)
        self.assertEqual(code, 0, err)
        out, err, code = yield run("echoscu", "-aec", "NOSUCHAE", "127.0.0.1", str(dicom))
        self.assertNotEqual(code, 0)
        code, text, headers = yield Client(http).request("GET", "/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b"text/plain; version=0.0.4", headers.getRawHeaders(b"content-type")[0])
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        # What the gateway stored (storescu may re-encode a few header bytes).
        stored_dir = os.path.join(service.getServiceNamed("scp").storage.instances_dir, "DICOMGW")
        stored = [os.path.join(stored_dir, n) for n in os.listdir(stored_dir)]
        self.assertEqual(len(stored), 3)
        dataset_bytes = sum(len(dicomfiles.dataset_bytes(f)) for f in stored)
        self.assertEqual(samples[("dicomgw_instances_received_total", (("called_ae", "DICOMGW"),))], 3)
        self.assertEqual(samples[("dicomgw_received_bytes_total", (("called_ae", "DICOMGW"),))],
                         dataset_bytes)
        self.assertEqual(samples[("dicomgw_store_latency_seconds_count", ())], 3)
        self.assertEqual(samples[("dicomgw_store_latency_seconds_bucket", (("le", "+Inf"),))], 3)
        self.assertEqual(samples[("dicomgw_associations_total", (("result", "released"),))], 1)
        self.assertEqual(samples[("dicomgw_associations_rejected_total",
                                  (("reason", "called-ae-title-not-recognized"),
                                   ("result", "permanent"), ("source", "service-user")))], 1)
        self.assertGreater(samples[("dicomgw_storage_free_bytes", ())], 0)
        self.assertEqual(samples[("dicomgw_active_associations", ())], 0)

    @defer.inlineCallbacks
    def test_associations_paged_newest_first(self):
        service, dicom, http = yield start_with_api(self)
        for title in ("FIRST", "SECOND", "THIRD"):
            out, err, code = yield run("echoscu", "-aet", title, "-aec", "DICOMGW", "127.0.0.1", str(dicom))
            self.assertEqual(code, 0, err)
        c = Client(http)
        code, body, _ = yield c.request("GET", "/associations?limit=2")
        self.assertEqual(code, 200)
        self.assertEqual(body["total"], 3)
        self.assertEqual([a["calling_ae"] for a in body["items"]], ["THIRD", "SECOND"])
        self.assertEqual(body["items"][0]["result"], "released")
        code, body, _ = yield c.request("GET", "/associations?limit=2&offset=2")
        self.assertEqual([a["calling_ae"] for a in body["items"]], ["FIRST"])
        code, body, _ = yield c.request("GET", "/associations?limit=0")
        self.assertEqual(code, 400)
        self.assertIn("limit", body["error"])

    @defer.inlineCallbacks
    def test_providers_absent_answer_503(self):
        service, _, http = yield start_with_api(self)
        # The gateway now always has an export queue and destinations: take
        # them away to see how the API answers without a provider.
        service.getServiceNamed("api").exports = service.getServiceNamed("api").destinations = None
        service.getServiceNamed("api").payloads = None  # the payload service provides one since issue 4
        c = Client(http)
        for method, path in (("GET", "/exports"), ("POST", "/exports"), ("GET", "/payloads"),
                             ("POST", "/destinations/pacs/echo"), ("GET", "/exports/1")):
            code, body, _ = yield c.request(method, path, body={} if method == "POST" else None)
            self.assertEqual(code, 503, path)
            self.assertIn("not available", body["error"])

    @defer.inlineCallbacks
    def test_real_export_queue_and_destinations(self):
        """The service tree wires the export service into the API."""
        gw = yield start_gateway(self)
        extra = (f'[[destination]]\nname = "gw"\nae_title = "DICOMGW"\nhost = "127.0.0.1"\n'
                 f'port = {gw.port}\n')
        service, _, http = yield start_with_api(self, extra=extra)
        c = Client(http)
        code, body, _ = yield c.request("GET", "/destinations")
        self.assertEqual((code, body), (200, {"items": [{"name": "gw", "kind": "dimse", "ae_title": "DICOMGW",
                                                          "host": "127.0.0.1", "port": gw.port, "tls": False,
                                                          "url": None}],
                                              "total": 1, "limit": 100, "offset": 0}))
        code, body, _ = yield c.request("POST", "/destinations/gw/echo", {})
        self.assertEqual(code, 200, body)
        self.assertTrue(body["ok"], body)
        stored = os.path.join(service.getServiceNamed("scp").storage.instances_dir, "DICOMGW", "1.2.3.dcm")
        os.makedirs(os.path.dirname(stored))
        dicomfiles.small_instance(stored)
        code, body, _ = yield c.request("POST", "/exports", {"destinations": ["gw"], "paths": [stored]})
        self.assertEqual(code, 202, body)
        [job_id] = body["jobs"]
        self.assertEqual((yield service.getServiceNamed("export").wait(job_id)), "done")
        code, body, _ = yield c.request("GET", f"/exports/{job_id}")
        self.assertEqual((code, body["state"], body["done"], body["origin"]), (200, "done", 1, "api"))
        self.assertEqual(body["file_statuses"][0]["status"], 0)
        code, text, _ = yield c.request("GET", "/metrics")
        self.assertIn('dicomgw_export_jobs_total{destination="gw",outcome="done"} 1', text)
        self.assertIn('dicomgw_export_files_total{destination="gw",outcome="sent"} 1', text)

    @defer.inlineCallbacks
    def test_exports(self):
        service, _, http = yield start_with_api(self)
        service.getServiceNamed("api").exports = FakeExportQueue(destinations=("pacs", "archive"))
        c = Client(http)
        stored = os.path.join(service.getServiceNamed("scp").storage.instances_dir, "DICOMGW", "1.2.3.dcm")
        os.makedirs(os.path.dirname(stored))
        dicomfiles.small_instance(stored)
        code, body, _ = yield c.request("POST", "/exports", {"destinations": ["pacs", "archive"],
                                                             "paths": [stored]})
        self.assertEqual((code, body), (202, {"jobs": ["1", "2"]}))
        code, body, _ = yield c.request("GET", "/exports?limit=1")
        self.assertEqual(code, 200)
        self.assertEqual([(j["id"], j["destination"]) for j in body["items"]], [("2", "archive")])
        self.assertEqual((body["total"], body["limit"], body["offset"]), (2, 1, 0))
        code, body, _ = yield c.request("GET", "/exports/1")
        self.assertEqual((code, body["file_statuses"][0]["path"]), (200, os.path.realpath(stored)))
        code, body, _ = yield c.request("GET", "/exports/99")
        self.assertEqual(code, 404)
        code, body, _ = yield c.request("POST", "/exports", {"destinations": ["nowhere"], "paths": [stored]})
        self.assertEqual(code, 422)
        self.assertIn("nowhere", body["error"])
        code, body, _ = yield c.request("POST", "/exports", {"destinations": ["pacs"], "paths": ["/etc/passwd"]})
        self.assertEqual(code, 400)
        self.assertIn("outside the storage root", body["error"])
        code, body, _ = yield c.request("POST", "/exports", {"destinations": "pacs", "paths": [stored]})
        self.assertEqual(code, 400)
        code, body, _ = yield c.request("POST", "/exports", raw=b"{not json")
        self.assertEqual(code, 400)
        self.assertIn("not valid JSON", body["error"])

    @defer.inlineCallbacks
    def test_destination_echo(self):
        service, _, http = yield start_with_api(self)
        fake = service.getServiceNamed("api").destinations = FakeDestinations({"pacs": True, "down": False})
        c = Client(http)
        code, body, _ = yield c.request("POST", "/destinations/pacs/echo")
        self.assertEqual((code, body["ok"], body["destination"]), (200, True, "pacs"))
        code, body, _ = yield c.request("POST", "/destinations/down/echo")
        self.assertEqual((code, body["ok"], body["reason"]), (502, False, "connection refused"))
        code, body, _ = yield c.request("POST", "/destinations/nope/echo")
        self.assertEqual(code, 404)
        code, body, headers = yield c.request("GET", "/destinations/pacs/echo")
        self.assertEqual(code, 405)
        self.assertEqual(headers.getRawHeaders(b"allow"), [b"POST"])
        self.assertEqual(fake.echoed, ["pacs", "down"])
        code, body, _ = yield c.request("GET", "/destinations?limit=1&offset=1")
        self.assertEqual((code, [d["name"] for d in body["items"]], body["total"]), (200, ["pacs"], 2))

    @defer.inlineCallbacks
    def test_payloads_and_unknown_paths(self):
        service, _, http = yield start_with_api(self)
        service.getServiceNamed("api").payloads = FakePayloadQuery([{"id": "p1", "state": "open"}, {"id": "p2", "state": "closed"}])
        c = Client(http)
        code, body, _ = yield c.request("GET", "/payloads?state=closed")
        self.assertEqual((code, [p["id"] for p in body["items"]]), (200, ["p2"]))
        self.assertEqual((body["total"], body["limit"], body["offset"]), (1, 100, 0))
        code, body, _ = yield c.request("GET", "/nothing/here")
        self.assertEqual(code, 404)
        self.assertIn("/nothing/here", body["error"])

    @defer.inlineCallbacks
    def test_bearer_token_required_when_configured(self):
        service, _, http = yield start_with_api(self, token=True)
        c = Client(http)
        code, body, headers = yield c.request("GET", "/status")
        self.assertEqual(code, 401)
        self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="dicomgw"'])
        code, body, _ = yield c.request("GET", "/metrics", token="wrong-token-wrong-token")
        self.assertEqual(code, 401)
        code, body, _ = yield c.request("GET", "/health", token=TOKEN)
        self.assertEqual(code, 200)
        code, text, _ = yield c.request("GET", "/metrics", token=TOKEN)
        self.assertEqual(code, 200)
        self.assertIn("dicomgw_build_info", text)


class QueryParameterTests(unittest.TestCase):
    """Unknown, repeated or invalid query parameters are a 400 naming the parameter."""

    timeout = 60

    @defer.inlineCallbacks
    def test_unknown_and_invalid_parameters_are_named(self):
        _service, _dicom, http = yield start_with_api(self)
        client = Client(http)
        cases = {
            "/associations?limt=5": "'limt'",
            "/exports?stat=queued": "'stat'",
            "/payloads?foo=bar": "'foo'",
            "/health?verbose=1": "'verbose'",
            "/exports?state=no-such-state": "'state': 'no-such-state' must be one of queued",
            "/payloads?state=bogus": "'state': 'bogus' must be one of open",
            "/associations?limit=0": "'limit': '0' must be from 1 to 1000",
            "/associations?limit=ten": "'limit': 'ten' must be an integer",
            "/exports?limit=1&limit=2": "'limit' is given 2 times",
        }
        for path, expected in cases.items():
            code, body, _headers = yield client.request("GET", path)
            self.assertEqual(code, 400, path)
            self.assertIn(expected, body["error"], path)
        for path in ("/associations?limit=5&offset=1", "/exports?state=queued", "/payloads?state=open&limit=3"):
            code, body, _headers = yield client.request("GET", path)
            self.assertEqual(code, 200, (path, body))
