"""Association policy and the TLS certificates follow a reload."""

from __future__ import annotations

import os
import socket
import ssl

from twisted.internet import defer, reactor
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from gateway.config import load_config
from gateway.tap import makeService
from gateway.testing import listening_port
from tests.integration.harness import gateway_config, in_thread, make_certificates, run
from tests.integration.recorder import RecordingRelay, rj_bytes
from tests.integration.test_policy import VERIFICATION, pynetdicom_ae


class PolicyReloadTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_max_associations_and_tls_follow_a_reload(self):
        certs = make_certificates(self)
        new_certs = make_certificates(self)
        storage = os.path.abspath(self.mktemp())
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(gateway_config(storage, tls_dir=certs, max_associations=25))
        service = makeService({"config": path, "config_object": load_config(path), "install_sighup": False},
                              reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = (yield listening_port(service)).getHost().port
        tls_port = (yield listening_port(service, "dicom_tls")).getHost().port
        relay = yield RecordingRelay.start(self, port)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        def hold():
            ae = pynetdicom_ae()
            ae.add_requested_context(VERIFICATION)
            assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW")
            assert assoc.is_established
            return assoc

        held = yield in_thread(hold)
        try:
            with open(path, "w") as f:
                f.write(gateway_config(storage, tls_dir=new_certs, max_associations=1, profile="bcp195-ex"))
            yield service.getServiceNamed("reload").reload()
            self.assertEqual(service.getServiceNamed("scp").config.gateway.max_associations, 1)
            out, err, code = yield run("echoscu", "-aec", "DICOMGW", "127.0.0.1", str(relay.port))
            self.assertNotEqual(code, 0)
            self.assertEqual(relay.connections[-1].first_pdu(), (0x03, rj_bytes(2, 3, 2)))
        finally:
            yield in_thread(held.release)
        reloaded = [e for e in logged if e.get("event") == "config.reloaded"]
        self.assertEqual(reloaded[-1]["restart_needed"], [])
        self.assertIn("tls.certificate", reloaded[-1]["changes"])
        # New TLS connections get the new certificate and the new profile.
        served = yield in_thread(_server_certificate, tls_port, new_certs)
        with open(os.path.join(new_certs, "server.pem"), "rb") as f:
            self.assertEqual(served, ssl.PEM_cert_to_DER_cert(f.read().decode("ascii").split("-----END CERTIFICATE-----")[0]
                                                               + "-----END CERTIFICATE-----\n"))
        with self.assertRaises(ssl.SSLError):
            yield in_thread(_server_certificate, tls_port, new_certs, "ECDHE-RSA-AES128-GCM-SHA256")


def _server_certificate(port, certs, tls12_cipher=None):
    """Handshake as a client of the ``certs`` CA; return the server's certificate (DER)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(os.path.join(certs, "ca.pem"))
    context.load_cert_chain(os.path.join(certs, "client.pem"), os.path.join(certs, "client.key"))
    if tls12_cipher:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(tls12_cipher)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


class TLSReloadFailureTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_unreadable_certificate_keeps_the_old_config_and_certificate(self):
        certs = make_certificates(self)
        storage = os.path.abspath(self.mktemp())
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(gateway_config(storage, tls_dir=certs))
        service = makeService({"config": path, "config_object": load_config(path), "install_sighup": False},
                              reactor)
        service.startService()
        self.addCleanup(service.stopService)
        tls_port = (yield listening_port(service, "dicom_tls")).getHost().port
        old = service.getServiceNamed("reload").config
        before = yield in_thread(_server_certificate, tls_port, certs)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        missing = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(gateway_config(storage, tls_dir=missing, max_associations=3))
        yield service.getServiceNamed("reload").reload()
        self.assertIs(service.getServiceNamed("reload").config, old)
        failed = [e for e in logged if e.get("event") == "config.reload_failed"]
        self.assertEqual(len(failed), 1)
        self.assertTrue(any("server.pem" in p for p in failed[0]["problems"]), failed[0]["problems"])
        after = yield in_thread(_server_certificate, tls_port, certs)
        self.assertEqual(after, before)
