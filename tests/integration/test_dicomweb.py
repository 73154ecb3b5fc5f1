"""DICOMweb STOW-RS against peers no one here wrote: dicomweb-client and Orthanc.

The gateway runs in this process with ``listen.dicomweb`` on a loopback
port; clients run in threads (dicomweb-client, http.client, raw sockets)
or as processes (Orthanc with its DICOMweb plugin).  Stored data sets must
equal the bytes sent; every refusal has its status; a client that stalls or
trickles is cut off and leaves nothing behind.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import ssl
import time
import urllib.request

import pydicom
from twisted.internet import defer, reactor, task
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from gateway import IMPLEMENTATION_CLASS_UID
from gateway.config import config_from_string, load_config
from gateway.export.jobs import ExportService
from gateway.ingest import stow as S
from gateway.ingest.scp import HIGH_WATER
from gateway.ingest.stow_receiver import StowReceiver
from gateway.part10 import dataset_offset, read_meta
from gateway.tap import makeService
from gateway.testing import listening_port, partial_files
from gateway.threads import WorkerPool
from tests.dicomfiles import ct_image, dataset_bytes, make_series, odd_instance, small_instance
from tests.integration.harness import IN_CI, gateway_config, in_thread, make_certificates, start_gateway
from tests.integration.peers import Certs, free_port, require_orthanc_dicomweb, start_orthanc
from tests.integration.test_policy import collect_events
from tests.integration.test_policy_reload import _server_certificate

WEB = "tcp:0:interface=127.0.0.1"
BOUNDARY = "dicomgw-test-boundary"


def require_dicomweb_client():
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        if IN_CI:
            raise AssertionError("dicomweb-client is required in CI (pip install '.[test]')")
        raise SkipTest("dicomweb-client not installed")
    return DICOMwebClient


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def body_of(paths, boundary=BOUNDARY, close=True) -> bytes:
    out = bytearray()
    for i, p in enumerate(paths):
        data = p if isinstance(p, bytes) else read(p)
        out += (b"\r\n" if i else b"") + f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
    if close:
        out += f"\r\n--{boundary}--\r\n".encode()
    return bytes(out)


CTYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def request(port, path, body=b"", headers=None, method="POST", context=None):
    """(status, headers, body) of one request (blocking: run it in a thread)."""
    if context is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        hdrs = {"Content-Type": CTYPE}
        hdrs.update(headers or {})
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def sequence(body: bytes, tag: str) -> list[dict]:
    return json.loads(body).get(tag, {}).get("Value", [])


def uid_of(item: dict) -> str:
    return item["00081155"]["Value"][0]


def samples(directory):
    os.makedirs(directory, exist_ok=True)
    paths = make_series(os.path.join(directory, "ct"), 3, rows=128, cols=128)
    paths.append(odd_instance(os.path.join(directory, "odd.dcm")))
    paths.append(small_instance(os.path.join(directory, "implicit.dcm"), size=20000))
    return paths


class _Base(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def gateway(self, extra="", aes=("DICOMGW",), **sections):
        sections.setdefault("dicomweb", WEB)
        gw = yield start_gateway(self, extra=extra, aes=aes, **sections)
        return gw

    def assertStoredAsSent(self, gw, paths, ae="DICOMGW"):
        stored = {read_meta(p)[1]: p for p in gw.stored_files(ae)}
        for p in paths:
            uid = read_meta(p)[1]
            self.assertIn(uid, stored)
            self.assertEqual(dataset_bytes(stored[uid]), dataset_bytes(p), p)
            meta = pydicom.dcmread(stored[uid], stop_before_pixels=True).file_meta
            self.assertEqual(meta.ImplementationClassUID, IMPLEMENTATION_CLASS_UID)


class DicomwebClientTests(_Base):
    @defer.inlineCallbacks
    def test_stores_bit_exact_with_the_response_sequences(self):
        client_class = require_dicomweb_client()
        gw = yield self.gateway()
        paths = samples(os.path.abspath(self.mktemp()))

        def store():
            client = client_class(f"http://127.0.0.1:{gw.web_port}/dicomweb")
            return client.store_instances([pydicom.dcmread(p) for p in paths])

        response = yield in_thread(store)
        referenced = [item.ReferencedSOPInstanceUID for item in response.ReferencedSOPSequence]
        self.assertEqual(referenced, [read_meta(p)[1] for p in paths])
        self.assertNotIn("FailedSOPSequence", response)
        first = response.ReferencedSOPSequence[0]
        self.assertEqual(first.ReferencedSOPClassUID, "1.2.840.10008.5.1.4.1.1.2")
        self.assertIn(f"/dicomweb/studies/{pydicom.dcmread(paths[0]).StudyInstanceUID}/series/", first.RetrieveURL)
        # dicomweb-client re-encodes each data set with pydicom: our test
        # files come out byte for byte as they were.
        for p in paths:
            encoded = io.BytesIO()
            pydicom.dcmwrite(encoded, pydicom.dcmread(p))
            data = encoded.getvalue()
            self.assertEqual(data[dataset_offset(data):], dataset_bytes(p))
        self.assertStoredAsSent(gw, paths)

    @defer.inlineCallbacks
    def test_study_route_and_a_virtual_ae(self):
        client_class = require_dicomweb_client()
        gw = yield self.gateway(aes=("DICOMGW", "CTAE"))
        directory = os.path.abspath(self.mktemp())
        cts = make_series(os.path.join(directory, "ct"), 2, rows=64, cols=64)
        other = small_instance(os.path.join(directory, "sc.dcm"), size=4000)
        study = pydicom.dcmread(cts[0]).StudyInstanceUID

        def store():
            client = client_class(f"http://127.0.0.1:{gw.web_port}/dicomweb/vae/CTAE")
            return client.store_instances([pydicom.dcmread(p) for p in cts + [other]], study_instance_uid=study)

        response = yield in_thread(store)  # 202: dicomweb-client hands back the response
        self.assertEqual(len(response.ReferencedSOPSequence), 2)
        [failed] = response.FailedSOPSequence
        self.assertEqual(failed.FailureReason, S.STUDY_MISMATCH)
        self.assertEqual(failed.ReferencedSOPInstanceUID, read_meta(other)[1])
        self.assertEqual(response.RetrieveURL, f"http://127.0.0.1/dicomweb/vae/CTAE/studies/{study}")
        self.assertStoredAsSent(gw, cts, ae="CTAE")
        self.assertEqual(len(gw.stored_files("CTAE")), 2)
        self.assertEqual(gw.stored_files("DICOMGW"), [])


class StatusTests(_Base):
    @defer.inlineCallbacks
    def test_every_refusal_has_its_status(self):
        token = os.path.abspath(self.mktemp())
        with open(token, "w") as f:
            f.write("s3cret-token-of-20-chars")
        gw = yield self.gateway(extra=f"[dicomweb]\nae = \"DICOMGW\"\ntoken_file = \"{token}\"\nmax_request_bytes = 20000\n"
                                      '[[ae]]\ntitle = "CTONLY"\nallowed_sop_classes = ["1.2.840.10008.5.1.4.1.1.2"]\n')
        auth = {"Authorization": "Bearer s3cret-token-of-20-chars"}
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ct = ct_image(os.path.join(directory, "ct.dcm"), rows=64, cols=64)
        sc = small_instance(os.path.join(directory, "sc.dcm"), size=4000)
        good = body_of([ct])
        cases = [
            ("no token", "/dicomweb/studies", good, {}, 401),
            ("wrong token", "/dicomweb/studies", good, {"Authorization": "Bearer nope"}, 401),
            ("GET", "/dicomweb/studies", b"", auth, 405),
            ("unknown path", "/dicomweb/series", good, auth, 404),
            ("unknown AE", "/dicomweb/vae/NOPE/studies", good, auth, 404),
            ("media type", "/dicomweb/studies", good, dict(auth, **{"Content-Type": "application/dicom"}), 415),
            ("part type", "/dicomweb/studies", good,
             dict(auth, **{"Content-Type": f'multipart/related; type="application/dicom+xml"; boundary={BOUNDARY}'}),
             415),
            ("too large", "/dicomweb/studies", body_of([ct] * 3), auth, 413),
            ("broken multipart", "/dicomweb/studies", good[:-30], auth, 400),
            ("not part 10", "/dicomweb/studies", body_of([b"\x00" * 200]), auth, 400),
            ("SOP class refused", "/dicomweb/vae/CTONLY/studies", body_of([sc]), auth, 409),
            ("stored", "/dicomweb/studies", good, auth, 200),
        ]
        for name, path, body, headers, status in cases:
            code, hdrs, answer = yield in_thread(request, gw.web_port, path, body, headers,
                                                 "GET" if name == "GET" else "POST")
            self.assertEqual(code, status, (name, answer))
            if status == 401:
                self.assertEqual(hdrs["www-authenticate"], 'Bearer realm="dicomgw"')
            if status == 405:
                self.assertEqual(hdrs["allow"], "POST")
        code, hdrs, answer = yield in_thread(request, gw.web_port, "/dicomweb/vae/CTONLY/studies", body_of([sc]), auth)
        [failed] = sequence(answer, "00081198")
        self.assertEqual(failed["00081197"], {"vr": "US", "Value": [S.SOP_CLASS_NOT_SUPPORTED]})
        self.assertEqual(hdrs["content-type"], "application/dicom+json")
        gw.scp.congestion = "97.0% used, watermark 75%"
        code, hdrs, _ = yield in_thread(request, gw.web_port, "/dicomweb/studies", good, auth)
        self.assertEqual((code, hdrs.get("retry-after")), (503, "60"))
        self.assertEqual(partial_files(gw.scp.storage.tmp_dir), [])
        self.assertEqual(len(gw.stored_files()), 1)

    @defer.inlineCallbacks
    def test_instances_reach_payloads_and_pipelines(self):
        out = os.path.abspath(self.mktemp())
        # an AE title with a pipeline, its payloads closing quickly
        # cp then mv: the test must never read a half-copied manifest
        extra = f'[pipeline.record]\ncommand = ["/bin/sh", "-c", "cp {{manifest}} {out}.part && mv {out}.part {out}"]\n' \
                '[[ae]]\ntitle = "PIPE"\ngrouping = "study"\ntimeout = 0.2\npipelines = ["record"]\n'
        gw = yield self.gateway(extra=extra)
        closed = collect_events(self, "association.closed")
        paths = make_series(os.path.abspath(self.mktemp()), 3, rows=32, cols=32)
        code, _, answer = yield in_thread(request, gw.web_port, "/dicomweb/vae/PIPE/studies", body_of(paths))
        self.assertEqual(code, 200)
        for _ in range(200):
            if os.path.exists(out):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        with open(out) as f:
            manifest = json.load(f)
        self.assertEqual(manifest["ae"], "PIPE")
        self.assertEqual(sorted(i["sop_instance_uid"] for i in manifest["instances"]),
                         sorted(read_meta(p)[1] for p in paths))
        [association] = manifest["associations"]
        self.assertEqual((association["called_ae"], association["result"]), ("PIPE", "released"))
        [event] = [e for e in closed if e["called_ae"] == "PIPE"]
        self.assertEqual((event["service"], event["instances"], event["http_status"]), ("stow-rs", 3, 200))


def _raw_connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    return s


def _closed_within(s, seconds) -> float:
    """Seconds until the peer closed the socket (reading what it sends)."""
    started = time.monotonic()
    s.settimeout(seconds)
    try:
        while s.recv(65536):
            pass
    except (ConnectionResetError, socket.timeout, TimeoutError):
        pass
    return time.monotonic() - started


class StreamingTests(_Base):
    def _head(self, length, path="/dicomweb/studies"):
        return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {CTYPE}\r\n"
                f"Content-Length: {length}\r\n\r\n").encode()

    @defer.inlineCallbacks
    def test_a_client_that_stalls_mid_body_is_cut_off(self):
        gw = yield self.gateway(extra="[dicomweb]\ntimeout = 1\n")
        closed = collect_events(self, "association.closed")
        paths = make_series(os.path.abspath(self.mktemp()), 2, rows=256, cols=256)
        body = body_of(paths)

        def stall():
            s = _raw_connect(gw.web_port)
            s.sendall(self._head(len(body)) + body[:len(body) - 100000])
            return _closed_within(s, 15)

        elapsed = yield in_thread(stall)
        self.assertLess(elapsed, 6)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(partial_files(gw.scp.storage.tmp_dir), [])
        last = closed[-1]
        self.assertEqual((last["result"], last["http_status"]), ("lost", None))
        self.assertIn("cut off", last["outcome"])

    @defer.inlineCallbacks
    def test_a_client_that_trickles_is_cut_off(self):
        gw = yield self.gateway(extra="[dicomweb]\ntimeout = 1\n")
        paths = make_series(os.path.abspath(self.mktemp()), 1, rows=256, cols=256)
        body = body_of(paths)

        def trickle():
            s = _raw_connect(gw.web_port)
            s.sendall(self._head(len(body)))
            started = time.monotonic()
            try:
                for i in range(0, len(body), 2000):
                    s.sendall(body[i:i + 2000])
                    time.sleep(0.1)
                    if time.monotonic() - started > 15:
                        break
            except OSError:
                return time.monotonic() - started
            return time.monotonic() - started

        elapsed = yield in_thread(trickle)
        self.assertLess(elapsed, 6)

    @defer.inlineCallbacks
    def test_headers_sent_slowly_are_cut_off(self):
        gw = yield self.gateway(extra="[dicomweb]\ntimeout = 1\n")

        def slow():
            s = _raw_connect(gw.web_port)
            started = time.monotonic()
            try:
                for c in self._head(1000):
                    s.send(bytes([c]))
                    time.sleep(0.05)
                    if time.monotonic() - started > 15:
                        break
            except OSError:
                pass
            return time.monotonic() - started

        elapsed = yield in_thread(slow)
        self.assertLess(elapsed, 6)

    @defer.inlineCallbacks
    def test_a_big_instance_streams_with_bounded_memory(self):
        """48 MiB in one part: what waits for the disk stays bounded (the
        transport is paused), and the file is stored as sent."""
        gw = yield self.gateway()
        path = ct_image(os.path.join(os.path.abspath(self.mktemp()) + ".dcm"), rows=4096, cols=6144)
        most = []
        original = StowReceiver.pressure

        def pressure(receiver):
            most.append(receiver.pending)
            original(receiver)

        self.patch(StowReceiver, "pressure", pressure)
        code, _, answer = yield in_thread(request, gw.web_port, "/dicomweb/studies", body_of([path]))
        self.assertEqual(code, 200, answer)
        self.assertLess(max(most), HIGH_WATER + (4 << 20))
        self.assertStoredAsSent(gw, [path])

    @defer.inlineCallbacks
    def test_keep_alive_and_chunked_bodies(self):
        gw = yield self.gateway()
        paths = make_series(os.path.abspath(self.mktemp()), 4, rows=32, cols=32)

        def two_requests():
            conn = http.client.HTTPConnection("127.0.0.1", gw.web_port, timeout=30)
            out = []
            for part in (paths[:2], paths[2:]):
                body = body_of(part)
                # the second one chunked (Transfer-Encoding: chunked)
                payload = body if not out else iter([body[i:i + 999] for i in range(0, len(body), 999)])
                conn.request("POST", "/dicomweb/studies", body=payload, headers={"Content-Type": CTYPE},
                             encode_chunked=bool(out))
                r = conn.getresponse()
                out.append((r.status, r.read()))
            conn.close()
            return out

        answers = yield in_thread(two_requests)
        self.assertEqual([a[0] for a in answers], [200, 200])
        self.assertStoredAsSent(gw, paths)


class TLSTests(_Base):
    @defer.inlineCallbacks
    def test_client_certificate_tls_and_an_ssl_endpoint(self):
        certs = Certs(os.path.abspath(self.mktemp()))
        tls = f"""
[tls]
certificate = "{certs.server_cert}"
private_key = "{certs.server_key}"
ca_certificates = "{certs.ca_cert}"
"""
        gw = yield self.gateway(extra=tls + "[dicomweb]\ntls = true\n", dicomweb="tcp:0")
        path = make_series(os.path.abspath(self.mktemp()), 1, rows=32, cols=32)[0]
        context = ssl.create_default_context(cafile=certs.ca_cert)
        context.load_cert_chain(certs.client_cert, certs.client_key)
        code, _, answer = yield in_thread(request, gw.web_port, "/dicomweb/studies", body_of([path]), None, "POST",
                                          context)
        self.assertEqual(code, 200)
        self.assertIn("https://127.0.0.1", json.loads(answer)["00081190"]["Value"][0])
        no_cert = ssl.create_default_context(cafile=certs.ca_cert)
        with self.assertRaises((ssl.SSLError, ConnectionError, OSError)):
            yield in_thread(request, gw.web_port, "/dicomweb/studies", body_of([path]), None, "POST", no_cert)

        # Twisted's own ssl: endpoint works with the same files (no client
        # certificates there, so a token is needed off loopback; this one is loopback).
        endpoint = f"ssl:0:interface=127.0.0.1:privateKey={certs.server_key}:certKey={certs.server_cert}"
        gw2 = yield self.gateway(extra=tls, dicomweb=endpoint)
        code, _, _ = yield in_thread(request, gw2.web_port, "/dicomweb/studies", body_of([path]), None, "POST",
                                     ssl.create_default_context(cafile=certs.ca_cert))
        self.assertEqual(code, 200)
        self.assertStoredAsSent(gw2, [path])


class ReloadTests(TestCase):
    """A reload reaches the DICOMweb server as it reaches the DICOM TLS port:
    new certificates for new connections, a new token and limits for new
    requests; a new listen.dicomweb or dicomweb.tls only with a restart."""

    timeout = 60

    def _write(self, path, storage, certs, token, listen="tcp:0:interface=127.0.0.1", max_parts=10):
        with open(path, "w") as f:
            f.write(gateway_config(storage, f"""
[tls]
certificate = "{certs}/server.pem"
private_key = "{certs}/server.key"
ca_certificates = "{certs}/ca.pem"
[dicomweb]
tls = true
token_file = "{token}"
max_parts = {max_parts}
""", dicomweb=listen))

    def _token(self, text):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    @defer.inlineCallbacks
    def test_certificates_token_and_limits_follow_a_reload(self):
        certs, new_certs = make_certificates(self), make_certificates(self)
        storage, path = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        self._write(path, storage, certs, self._token("the-first-token-0123"))
        service = makeService({"config": path, "config_object": load_config(path), "install_sighup": False},
                              reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = (yield listening_port(service, "dicomweb")).getHost().port
        files = make_series(os.path.abspath(self.mktemp()), 3, rows=32, cols=32)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self._write(path, storage, new_certs, self._token("the-second-token-456"),
                    listen="tcp:0:interface=127.0.0.1:backlog=10", max_parts=2)
        yield service.getServiceNamed("reload").reload()
        [reloaded] = [e for e in logged if e.get("event") == "config.reloaded"]
        self.assertEqual(reloaded["restart_needed"], ["listen.dicomweb"])
        self.assertIn("tls.certificate", reloaded["changes"])
        served = yield in_thread(_server_certificate, port, new_certs)
        with open(os.path.join(new_certs, "server.pem"), "rb") as f:
            self.assertEqual(served, ssl.PEM_cert_to_DER_cert(f.read().decode("ascii")))
        context = ssl.create_default_context(cafile=os.path.join(new_certs, "ca.pem"))
        context.load_cert_chain(os.path.join(new_certs, "client.pem"), os.path.join(new_certs, "client.key"))
        context.check_hostname = False
        old = {"Authorization": "Bearer the-first-token-0123"}
        new = {"Authorization": "Bearer the-second-token-456"}
        code, _, _ = yield in_thread(request, port, "/dicomweb/studies", body_of(files[:1]), old, "POST", context)
        self.assertEqual(code, 401)
        code, _, _ = yield in_thread(request, port, "/dicomweb/studies", body_of(files), new, "POST", context)
        self.assertEqual(code, 413)  # more than the new max_parts
        code, _, _ = yield in_thread(request, port, "/dicomweb/studies", body_of(files[:2]), new, "POST", context)
        self.assertEqual(code, 200)


def orthanc_rest(port, method, path, body=None, content_type="application/json"):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": content_type} if data is not None else {})
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class OrthancTests(_Base):
    @defer.inlineCallbacks
    def test_orthanc_sends_to_us_over_stow_rs(self):
        plugin = require_orthanc_dicomweb()
        token = os.path.abspath(self.mktemp())
        with open(token, "w") as f:
            f.write("orthanc-sends-with-this-token")
        gw = yield self.gateway(extra=f'[dicomweb]\ntoken_file = "{token}"\n')
        closed = collect_events(self, "association.closed")
        url = f"http://127.0.0.1:{gw.web_port}/dicomweb/"
        _dicom, http_port = yield start_orthanc(self, os.path.abspath(self.mktemp()), extra={
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {
                "gw": {"Url": url, "HttpHeaders": {"Authorization": "Bearer orthanc-sends-with-this-token"}}}},
        })
        paths = make_series(os.path.abspath(self.mktemp()), 3, rows=128, cols=128)
        studies = set()
        for p in paths:
            answer = yield in_thread(orthanc_rest, http_port, "POST", "/instances", read(p), "application/dicom")
            studies.add(answer["ParentStudy"])
        [study] = studies
        yield in_thread(orthanc_rest, http_port, "POST", "/dicom-web/servers/gw/stow",
                        {"Resources": [study], "Synchronous": True})
        self.assertStoredAsSent(gw, paths)
        last = closed[-1]
        self.assertEqual((last["service"], last["result"], last["instances"]), ("stow-rs", "released", 3))

    @defer.inlineCallbacks
    def test_we_export_to_orthanc_over_stow_rs(self):
        plugin = require_orthanc_dicomweb()
        _dicom, http_port = yield start_orthanc(self, os.path.abspath(self.mktemp()), extra={
            "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
        paths = samples(os.path.abspath(self.mktemp()))
        export = start_export(self, f'[[destination]]\nname = "orthanc"\n'
                                    f'dicomweb = "http://127.0.0.1:{http_port}/dicom-web"\n')
        [job_id] = yield export.submit(["orthanc"], paths, "test")
        self.assertEqual((yield export.wait(job_id)), "done")
        job = yield export.job(job_id)
        self.assertEqual({f["state"] for f in job["file_statuses"]}, {"sent"})
        ids = yield in_thread(orthanc_rest, http_port, "GET", "/instances")
        self.assertEqual(len(ids), len(paths))
        received = {}
        for orthanc_id in ids:
            data = yield in_thread(orthanc_rest, http_port, "GET", f"/instances/{orthanc_id}/file")
            received[pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID] = data
        for p in paths:
            data = received[read_meta(p)[1]]
            self.assertEqual(data[dataset_offset(data):], dataset_bytes(p))


def start_export(testcase, destinations, scu='certificate = ""\nprivate_key = ""', storage=None):
    config = config_from_string(f"""
[gateway]
storage = "{storage or os.path.abspath(testcase.mktemp())}"
[timeouts]
dimse = 20
[scu]
retries = 1
retry_delay = 0.2
connect_timeout = 5
{scu}
[[ae]]
title = "GW"
{destinations}
""")
    pool = WorkerPool(2, "test-export-read")
    pool.start()
    testcase.addCleanup(pool.stop)
    service = ExportService(config, reactor, pool)
    service.startService()
    testcase.addCleanup(service.stopService)
    return service


class ExportTests(_Base):
    """Our STOW-RS client against our own receiver: batches, per-file
    statuses, permanent and retried failures, the token, ``dicomgw send``."""

    @defer.inlineCallbacks
    def test_batches_and_per_file_statuses(self):
        from gateway.export import dicomweb as W

        self.patch(W, "BATCH_FILES", 2)
        token = os.path.abspath(self.mktemp())
        with open(token, "w") as f:
            f.write("export-token-0123456789")
        gw = yield self.gateway(extra=f'[dicomweb]\nae = "DICOMGW"\ntoken_file = "{token}"\n'
                                      '[[ae]]\ntitle = "CTONLY"\nallowed_sop_classes = ["1.2.840.10008.5.1.4.1.1.2"]\n')
        paths = samples(os.path.abspath(self.mktemp()))
        base = f"http://127.0.0.1:{gw.web_port}/dicomweb"
        export = start_export(self, f"""
[[destination]]
name = "gw"
dicomweb = "{base}"
token_file = "{token}"
[[destination]]
name = "ctonly"
dicomweb = "{base}/vae/CTONLY"
token_file = "{token}"
[[destination]]
name = "notoken"
dicomweb = "{base}"
""")
        requests = []
        self.patch(StowReceiver, "close", _counting(StowReceiver.close, requests))
        [job_id] = yield export.submit(["gw"], paths, "test")
        self.assertEqual((yield export.wait(job_id)), "done")
        self.assertEqual(len(requests), 3)  # 5 files, 2 per request
        self.assertStoredAsSent(gw, paths)

        [job_id] = yield export.submit(["ctonly"], paths, "test")
        self.assertEqual((yield export.wait(job_id)), "partially_failed")
        job = yield export.job(job_id)
        states = [(f["state"], f["status"]) for f in job["file_statuses"]]
        self.assertEqual(states, [("sent", None)] * 3 + [("failed", S.SOP_CLASS_NOT_SUPPORTED)] * 2)
        self.assertEqual(job["attempts"], 1)  # SOP class not supported is not retried

        [job_id] = yield export.submit(["notoken"], paths[:1], "test")
        self.assertEqual((yield export.wait(job_id)), "failed")
        job = yield export.job(job_id)
        self.assertEqual(job["attempts"], 2)  # retried once
        self.assertIn("HTTP 401", job["file_statuses"][0]["reason"])

    @defer.inlineCallbacks
    def test_a_destination_that_is_down_is_retried(self):
        port = free_port()
        export = start_export(self, f'[[destination]]\nname = "down"\ndicomweb = "http://127.0.0.1:{port}/dw"\n')
        paths = make_series(os.path.abspath(self.mktemp()), 2, rows=32, cols=32)
        [job_id] = yield export.submit(["down"], paths, "test")
        self.assertEqual((yield export.wait(job_id)), "failed")
        job = yield export.job(job_id)
        self.assertEqual(job["attempts"], 2)
        self.assertEqual(job["file_statuses"][0]["reason"], "connection refused")
        echo = yield export.destinations.echo("down")
        self.assertFalse(echo["ok"])
        self.assertIn("DICOMweb", echo["reason"])

    @defer.inlineCallbacks
    def test_https_destination_is_verified_and_gets_our_client_certificate(self):
        certs = Certs(os.path.abspath(self.mktemp()))
        gw = yield self.gateway(extra=f"""
[tls]
certificate = "{certs.server_cert}"
private_key = "{certs.server_key}"
ca_certificates = "{certs.ca_cert}"
[dicomweb]
tls = true
""")
        paths = make_series(os.path.abspath(self.mktemp()), 2, rows=32, cols=32)
        base = f"https://127.0.0.1:{gw.web_port}/dicomweb"
        export = start_export(self, f"""
[tls]
ca_certificates = "{certs.ca_cert}"
[[destination]]
name = "good"
dicomweb = "{base}"
[[destination]]
name = "wrongca"
dicomweb = "{base}"
ca_certificates = "{certs.other_ca_cert}"
""", scu=f'certificate = "{certs.client_cert}"\nprivate_key = "{certs.client_key}"')
        [job_id] = yield export.submit(["good"], paths, "test")
        self.assertEqual((yield export.wait(job_id)), "done")
        self.assertStoredAsSent(gw, paths)
        [job_id] = yield export.submit(["wrongca"], paths, "test")
        self.assertEqual((yield export.wait(job_id)), "failed")
        job = yield export.job(job_id)
        self.assertIn("certificate verify failed", job["file_statuses"][0]["reason"])

    @defer.inlineCallbacks
    def test_dicomgw_send(self):
        gw = yield self.gateway()
        paths = make_series(os.path.abspath(self.mktemp()), 3, rows=32, cols=32)
        cfg = os.path.abspath(self.mktemp())
        with open(cfg, "w") as f:
            f.write(f'[gateway]\nstorage = "{os.path.abspath(self.mktemp())}"\n[[ae]]\ntitle = "GW"\n'
                    f'[[destination]]\nname = "web"\ndicomweb = "http://127.0.0.1:{gw.web_port}/dicomweb"\n')
        from tests.integration.harness import PYTHON

        from twisted.internet.utils import getProcessOutputAndValue

        out, err, code = yield getProcessOutputAndValue(
            PYTHON, ["-m", "gateway.cli", "--config", cfg, "send", "--destination", "web", *paths],
            env=dict(os.environ))
        self.assertEqual(code, 0, (out, err))
        self.assertIn(b"job 1 to web: done, 3 of 3 file(s) sent, 0 failed", out)
        self.assertStoredAsSent(gw, paths)


def _counting(close, calls):
    def wrapped(self):
        calls.append(self)
        return close(self)
    return wrapped
