"""Export to real receivers: DCMTK storescp (plain and TLS with a CA), Orthanc.

What arrives must equal what was sent, data set bytes included; files the
receiver cannot take in their stored transfer syntax fail with a clear reason.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from gateway.config import config_from_string
from gateway.export.jobs import ExportService, read_meta
from gateway.threads import WorkerPool
from tests.dicomfiles import dataset_bytes, make_series, odd_instance, rle_image, small_instance
from tests.integration.harness import in_thread
from tests.integration.peers import Certs, free_port, start_old_tls_server, start_orthanc, start_storescp
from tests.export.test_jobs import scu_config


DICOMGW = os.path.join(os.path.dirname(sys.executable), "dicomgw")


def received_by_uid(directory):
    out = {}
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            try:
                out[read_meta(path)[1]] = path
            except ValueError:
                pass
    return out


def sample_files(directory):
    os.makedirs(directory)
    paths = make_series(directory, 3, rows=256, cols=256)
    paths.append(odd_instance(os.path.join(directory, "odd.dcm")))
    paths.append(small_instance(os.path.join(directory, "implicit.dcm"), size=40000))
    return paths


class PeerCase(TestCase):
    timeout = 90

    def start_export(self, config):
        pool = WorkerPool(2, "test-export-read")
        pool.start()
        self.addCleanup(pool.stop)
        service = ExportService(config, reactor, pool)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def assertSameDatasets(self, sent, received):
        for path in sent:
            uid = read_meta(path)[1]
            self.assertIn(uid, received)
            self.assertEqual(dataset_bytes(received[uid]), dataset_bytes(path), path)


class StorescpTests(PeerCase):
    @defer.inlineCallbacks
    def test_plain_bytes_equal_and_unsupported_syntax_fails_clearly(self):
        out = os.path.abspath(self.mktemp())
        port = yield start_storescp(self, out)
        paths = sample_files(os.path.abspath(self.mktemp()))
        rle = rle_image(os.path.join(os.path.dirname(paths[0]), "rle.dcm"))
        config = scu_config(os.path.abspath(self.mktemp()), [("scp", port, "STORESCP")])
        export = self.start_export(config)
        echo = yield export.destinations.echo("scp")
        self.assertTrue(echo["ok"], echo)

        [job_id] = yield export.submit(["scp"], paths + [rle], "test")
        self.assertEqual((yield export.wait(job_id)), "partially_failed")
        job = yield export.job(job_id)
        self.assertEqual((job["done"], job["failed"], job["attempts"]), (5, 1, 1))
        last = job["file_statuses"][-1]
        self.assertEqual(last["state"], "failed")
        self.assertIn("in transfer syntax 1.2.840.10008.1.2.5: transfer syntax not supported", last["reason"])
        self.assertSameDatasets(paths, received_by_uid(out))

    @defer.inlineCallbacks
    def test_tls_with_ca_and_client_certificate(self):
        certs = Certs(os.path.abspath(self.mktemp()))
        out = os.path.abspath(self.mktemp())
        port = yield start_storescp(self, out, tls=certs)
        paths = sample_files(os.path.abspath(self.mktemp()))
        # Our client certificate comes from [scu]; "stranger" overrides it
        # with one from a CA the server does not trust; "wrongca" does not
        # trust the server's CA.
        config = config_from_string(f"""
[gateway]
storage = "{os.path.abspath(self.mktemp())}"
[timeouts]
artim = 5
[tls]
ca_certificates = "{certs.ca_cert}"
[scu]
certificate = "{certs.client_cert}"
private_key = "{certs.client_key}"
[[ae]]
title = "GW"
[[destination]]
name = "tls"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {port}
tls = true
[[destination]]
name = "wrongca"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {port}
tls = true
ca_certificates = "{certs.other_ca_cert}"
[[destination]]
name = "stranger"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {port}
tls = true
certificate = "{certs.stranger_cert}"
private_key = "{certs.stranger_key}"
""")
        export = self.start_export(config)

        echo = yield export.destinations.echo("tls")
        self.assertTrue(echo["ok"], echo)
        # A server certificate from a CA we do not trust: the handshake fails.
        wrong = yield export.destinations.echo("wrongca")
        self.assertFalse(wrong["ok"])
        self.assertIn("TLS failure", wrong["reason"])
        self.assertIn("certificate verify failed", wrong["reason"])

        # A client certificate the server does not trust: no session.
        stranger = yield export.destinations.echo("stranger")
        self.assertFalse(stranger["ok"])
        self.assertIn("TLS failure", stranger["reason"])

        [job_id] = yield export.submit(["tls"], paths, "test")
        self.assertEqual((yield export.wait(job_id)), "done")
        self.assertSameDatasets(paths, received_by_uid(out))


class DevCertificateTests(PeerCase):
    """What ``dicomgw dev-certs`` makes is enough for mutual TLS with DCMTK:
    ``dicomgw send`` to ``storescp +tls`` that requires a client
    certificate, with the shipped [tls] and the default [scu] certificate
    (paths relative to where it runs, as in the README)."""

    @defer.inlineCallbacks
    def test_send_to_storescp_requiring_a_client_certificate(self):
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        code = yield getProcessOutputAndValue(DICOMGW, ["dev-certs"], env=dict(os.environ), path=work)
        self.assertEqual(code[2], 0, code)
        tls = os.path.join(work, "etc", "tls")

        class DevCerts:
            server_key, server_cert, ca_cert = (os.path.join(tls, n) for n in ("server.key", "server.pem",
                                                                               "ca.pem"))
        out = os.path.abspath(self.mktemp())
        port = yield start_storescp(self, out, tls=DevCerts)
        with open(os.path.join(work, "dicomgw.toml"), "w") as f:
            f.write(f"""
[gateway]
storage = "var/dicomgw"
[scu]
retries = 0
[[ae]]
title = "DICOMGW"
[[destination]]
name = "dcmtk-tls"
ae_title = "STORESCP"
host = "localhost"
port = {port}
tls = true
""")
        paths = sample_files(os.path.abspath(self.mktemp()))[:2]
        out_text, err_text, code = yield getProcessOutputAndValue(
            DICOMGW, ["--config", "dicomgw.toml", "send", "-d", "dcmtk-tls", *paths], env=dict(os.environ),
            path=work)
        self.assertEqual(code, 0, (out_text, err_text))
        self.assertSameDatasets(paths, received_by_uid(out))


class TLSFailureTests(PeerCase):
    """Each way a TLS destination can fail reaches echo, the job's files and the CLI in words."""

    @defer.inlineCallbacks
    def test_every_tls_failure_says_why(self):
        certs = Certs(os.path.abspath(self.mktemp()))
        ports = {}
        for name, server in (("wronghost", ("wronghost_key", "wronghost_cert")),
                             ("expired", ("expired_key", "expired_cert")),
                             ("good", ("server_key", "server_cert"))):
            ports[name] = yield start_storescp(self, os.path.abspath(self.mktemp()), tls=certs, server=server)
        ports["old"] = yield start_old_tls_server(self, certs)
        destinations = "".join(f"""
[[destination]]
name = "{name}"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {port}
tls = true
ca_certificates = "{ca}"
{client}
""" for name, port, ca, client in (
            ("wronghost", ports["wronghost"], certs.ca_cert, ""),
            ("expired", ports["expired"], certs.ca_cert, ""),
            ("unknownca", ports["good"], certs.other_ca_cert, ""),
            ("noclientcert", ports["good"], certs.ca_cert, ""),
            ("tls11", ports["old"], certs.ca_cert, ""),
            ("good", ports["good"], certs.ca_cert,
             f'certificate = "{certs.client_cert}"\nprivate_key = "{certs.client_key}"')))
        config = config_from_string(f"""
[gateway]
storage = "{os.path.abspath(self.mktemp())}"
[timeouts]
artim = 5
[scu]
retries = 0
certificate = ""
private_key = ""
[[ae]]
title = "GW"
""" + destinations)
        export = self.start_export(config)
        expected = {
            "wronghost": "the peer's certificate is not for 127.0.0.1 (host name or IP address mismatch)",
            "expired": "certificate verify failed: the peer's certificate CN=127.0.0.1, issued by CN=dicomgw "
                       "test CA, has expired",
            "unknownca": "certificate verify failed: the peer's certificate CN=127.0.0.1, issued by CN=dicomgw "
                         "test CA",
            "noclientcert": "alert certificate required",
            "tls11": "alert protocol version",
        }
        for name, why in expected.items():
            echo = yield export.destinations.echo(name)
            self.assertFalse(echo["ok"], name)
            self.assertIn("TLS failure", echo["reason"], name)
            self.assertIn(why, echo["reason"], name)
        self.assertTrue((yield export.destinations.echo("good"))["ok"])
        # The same reason reaches an export job's files.
        paths = sample_files(os.path.abspath(self.mktemp()))[:1]
        [job_id] = yield export.submit(["wronghost"], paths, "test")
        self.assertEqual((yield export.wait(job_id)), "failed")
        job = yield export.job(job_id)
        self.assertIn(expected["wronghost"], job["file_statuses"][0]["reason"])


class OrthancTests(PeerCase):
    @defer.inlineCallbacks
    def test_orthanc_receives_what_was_sent(self):
        directory = os.path.abspath(self.mktemp())
        dicom, http = yield start_orthanc(self, directory)
        paths = sample_files(os.path.abspath(self.mktemp()))
        config = scu_config(os.path.abspath(self.mktemp()), [("orthanc", dicom, "ORTHANC"),
                                                             ("wrongae", dicom, "NOTORTHANC")])
        export = self.start_export(config)
        echo = yield export.destinations.echo("orthanc")
        self.assertTrue(echo["ok"], echo)
        rejected = yield export.destinations.echo("wrongae")
        self.assertFalse(rejected["ok"])
        self.assertIn("association rejected", rejected["reason"])

        [job_id] = yield export.submit(["orthanc"], paths, "test")
        self.assertEqual((yield export.wait(job_id)), "done")

        def fetch_all():
            base = f"http://127.0.0.1:{http}"
            ids = json.load(urllib.request.urlopen(base + "/instances", timeout=10))
            out = {}
            for i in ids:
                data = urllib.request.urlopen(f"{base}/instances/{i}/file", timeout=10).read()
                path = os.path.join(directory, f"{i}.dcm")
                with open(path, "wb") as f:
                    f.write(data)
                out[read_meta(path)[1]] = path
            return out

        received = yield in_thread(fetch_all)
        self.assertEqual(len(received), len(paths))
        self.assertSameDatasets(paths, received)


class CommandLineTests(PeerCase):
    @defer.inlineCallbacks
    def test_dicomgw_echo_and_send(self):
        out = os.path.abspath(self.mktemp())
        port = yield start_storescp(self, out)
        src = os.path.abspath(self.mktemp())
        paths = make_series(src, 3, rows=64, cols=64)
        storage = os.path.abspath(self.mktemp())
        config_path = os.path.abspath(self.mktemp())
        with open(config_path, "w") as f:
            f.write(f'[gateway]\nstorage = "{storage}"\n[scu]\nretries = 0\n[[ae]]\ntitle = "GW"\n'
                    f'[[destination]]\nname = "scp"\nae_title = "STORESCP"\nhost = "127.0.0.1"\nport = {port}\n')

        def dicomgw(*args):
            d = getProcessOutputAndValue(sys.executable, ["-m", "gateway.cli", "--config", config_path, *args],
                                         env=dict(os.environ))
            return d.addCallback(lambda r: (r[0].decode(), r[1].decode(), r[2]))

        stdout, stderr, code = yield dicomgw("echo", "scp")
        self.assertEqual(code, 0, stderr)
        self.assertRegex(stdout, r"^echo scp \(STORESCP@127\.0\.0\.1:\d+\): success, round trip [\d.]+ ms\n$")

        stdout, stderr, code = yield dicomgw("send", "--destination", "scp", src)
        self.assertEqual(code, 0, stderr)
        self.assertRegex(stdout, r"^job \d+ to scp: done, 3 of 3 file\(s\) sent, 0 failed\n$")
        self.assertSameDatasets(paths, received_by_uid(out))
        self.assertTrue(os.path.exists(os.path.join(storage, "exports.sqlite")))

        stdout, stderr, code = yield dicomgw("echo", "nosuch")
        self.assertEqual(code, 2)
        self.assertIn("unknown destination 'nosuch'", stderr)


class StatusTests(PeerCase):
    @defer.inlineCallbacks
    def test_failure_status_recorded_and_retried_warning_counts_as_sent(self):
        """A pynetdicom SCP answers A700 to the first try of each instance,
        B000 (warning) to the second: statuses are recorded, the job is done."""
        from tests.integration.harness import require_pynetdicom

        pynetdicom = require_pynetdicom()
        from pynetdicom import evt
        from pynetdicom.sop_class import CTImageStorage

        seen: dict[str, int] = {}
        received: dict[str, bytes] = {}

        def handle_store(event):
            uid = event.request.AffectedSOPInstanceUID
            seen[uid] = seen.get(uid, 0) + 1
            if seen[uid] == 1:
                return 0xA700
            received[uid] = bytes(event.request.DataSet.getvalue())
            return 0xB000

        ae = pynetdicom.AE(ae_title="PYSCP")
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
        port = free_port()
        server = yield in_thread(ae.start_server, ("127.0.0.1", port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, handle_store)])
        self.addCleanup(in_thread, server.shutdown)

        src = os.path.abspath(self.mktemp())
        paths = make_series(src, 3, rows=32, cols=32)
        config = scu_config(os.path.abspath(self.mktemp()), [("py", port, "PYSCP")], retries=1, retry_delay=0.05)
        export = self.start_export(config)
        [job_id] = yield export.submit(["py"], paths, "test")
        self.assertEqual((yield export.wait(job_id)), "done")
        job = yield export.job(job_id)
        self.assertEqual({(f["state"], f["status"], f["attempts"]) for f in job["file_statuses"]},
                         {("sent", 0xB000, 2)})
        self.assertEqual(job["attempts"], 2)
        for path in paths:
            self.assertEqual(received[read_meta(path)[1]], dataset_bytes(path))
