"""Association policy follows a reload; the TLS settings need a restart."""

from __future__ import annotations

import os

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
    def test_max_associations_follows_a_reload_tls_needs_a_restart(self):
        certs = make_certificates(self)
        storage = os.path.abspath(self.mktemp())
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(gateway_config(storage, tls_dir=certs, max_associations=25))
        service = makeService({"config": path, "config_object": load_config(path), "install_sighup": False},
                              reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = (yield listening_port(service)).getHost().port
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
                f.write(gateway_config(storage, tls_dir=certs, max_associations=1, profile="bcp195-ex"))
            yield service.reload.reload()
            self.assertEqual(service.scp.config.max_associations, 1)
            out, err, code = yield run("echoscu", "-aec", "DICOMGW", "127.0.0.1", str(relay.port))
            self.assertNotEqual(code, 0)
            self.assertEqual(relay.connections[-1].first_pdu(), (0x03, rj_bytes(2, 3, 2)))
        finally:
            yield in_thread(held.release)
        reloaded = [e for e in logged if e.get("event") == "config.reloaded"]
        self.assertEqual(reloaded[-1]["restart_needed"], ["[tls]"])
