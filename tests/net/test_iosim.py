"""Our SCU into our SCP in memory: both Protocols over twisted.test.iosim, no sockets.

The SCU side is the export code's association (:class:`SCUAssociation` on a
requestor :class:`DicomProtocol`), the SCP side the listener's factory with
a storage root in a temporary directory; every thread hand-off runs at once
(:class:`InlinePool`, :class:`ThreadlessClock`), so a test is one
``pump.flush()`` after each request.  The same exchange runs over TLS, with
``DicomTLSFactory`` on both ends as the real listener and client use it.
"""

from __future__ import annotations

import os

from twisted.internet.protocol import Factory
from twisted.test import iosim
from twisted.trial import unittest

from gateway.config import Destination, config_from_string
from gateway.dimse import commands as C
from gateway.dimse import sop
from gateway.net.tls import client_options
from gateway.part10 import read_meta
from gateway.export.scu import Peer, SCUAssociation, verification_contexts
from gateway.ingest.service import SCPService
from gateway.net.protocol import DicomProtocol
from gateway.net.tls import DicomTLSFactory, server_options
from gateway.store.writer import Storage
from gateway.testing import InlinePool, ThreadlessClock
from tests.dicomfiles import ct_image, dataset_bytes
from tests.integration.harness import gateway_config, make_certificates


class _One(Factory):
    """A factory that hands out one protocol built beforehand."""

    def __init__(self, protocol):
        self.protocol_instance = protocol

    def buildProtocol(self, addr):
        return self.protocol_instance


class SCUIntoSCPTests(unittest.TestCase):
    def gateway(self, tls_dir=None):
        storage = os.path.abspath(self.mktemp())
        config = config_from_string(gateway_config(storage, tls_dir=tls_dir))
        clock = ThreadlessClock()
        store = Storage(config.gateway.storage, clock, InlinePool(), fsync=False)
        store.prepare()
        self.addCleanup(store.spares.close)
        return config, clock, SCPService(config, store, clock)

    def associate(self, contexts, tls_dir=None):
        config, clock, scp = self.gateway(tls_dir)
        user = SCUAssociation(Peer("127.0.0.1", 104, "DICOMGW", "TESTSCU"), contexts, clock, InlinePool(),
                              max_pdu_length=16384, implementation_version_name="TEST", artim_timeout=10)
        client = DicomProtocol(user, clock, requestor=True, max_pdu_length=16384, artim_timeout=10,
                               dimse_timeout=20)
        server = scp.factory(tls=tls_dir is not None).buildProtocol(None)
        if tls_dir is not None:
            server = DicomTLSFactory(server_options(config.tls), False, _One(server)).buildProtocol(None)
            client_tls = client_options(Destination("gw", "DICOMGW", "localhost", 104, tls=True,
                                                  ca_certificates=os.path.join(tls_dir, "ca.pem"),
                                                  certificate=os.path.join(tls_dir, "client.pem"),
                                                  private_key=os.path.join(tls_dir, "client.key")), config)
            client = DicomTLSFactory(client_tls, True, _One(client)).buildProtocol(None)
        pump = iosim.connect(server, iosim.FakeTransport(server, isServer=True),
                             client, iosim.FakeTransport(client, isServer=False), greet=False, clock=clock)
        pump.flush()
        established = []
        user.established.addCallback(established.append)
        self.assertEqual(established, [user], "the association was not accepted")
        return scp, user, pump

    def exchange(self, tls_dir=None):
        path = self.mktemp()
        ct_image(path, rows=128, cols=128)
        sop_class, sop_instance, ts, offset, size = read_meta(path)
        scp, user, pump = self.associate(verification_contexts() + [(sop_class, ts)], tls_dir)

        echoed = []
        user.echo().addCallback(echoed.append)
        pump.flush()
        self.assertEqual(echoed, [C.SUCCESS])

        responses = []
        user.store(path, offset, size, sop_class, sop_instance, ts).addCallback(responses.append)
        pump.flush()
        (rsp,) = responses
        self.assertEqual((rsp.command_field, rsp.status), (C.C_STORE_RSP, C.SUCCESS))
        stored = scp.storage.path_for("DICOMGW", sop_instance)
        self.assertEqual(dataset_bytes(stored), dataset_bytes(path))  # bit-exact
        self.assertEqual(read_meta(stored)[:3], (sop_class, sop_instance, ts))

        (association,) = scp.active
        released = []
        user.release().addCallback(released.append)
        pump.flush()
        self.assertEqual(released, [None])
        self.assertEqual(association.result, "released")
        self.assertEqual(scp.active, set())
        return association

    def test_echo_store_release(self):
        association = self.exchange()
        self.assertEqual((association.instances, association.failures), (1, 0))

    def test_echo_store_release_over_tls(self):
        association = self.exchange(make_certificates(self))
        self.assertTrue(association.tls)
        self.assertIn("CN=", association.tls_subject)  # the SCU's client certificate

    def test_over_tls_a_pdu_goes_out_without_waiting_for_a_reactor_turn(self):
        # TLSMemoryBIOFactory's own protocol holds small writes for the next
        # reactor turn; the DICOM TLS layer sends each PDU as it is written,
        # so this echo is answered with no clock moving at all.
        scp, user, pump = self.associate(verification_contexts(), make_certificates(self))
        echoed = []
        user.echo().addCallback(echoed.append)
        pump.flush(advanceClock=False)
        self.assertEqual(echoed, [C.SUCCESS])

    def test_a_context_the_scp_refuses_fails_the_store_only(self):
        # The SCP accepts storage SOP classes only: Storage Commitment is
        # refused, and a store on it fails before anything is sent.
        refused = (sop.STORAGE_COMMITMENT_PUSH, sop.IMPLICIT_VR_LITTLE_ENDIAN)
        scp, user, pump = self.associate(verification_contexts() + [refused])
        failures = []
        user.store(__file__, 0, 10, refused[0], "1.2.3.4.5", refused[1]).addErrback(failures.append)
        pump.flush()
        self.assertIn("abstract syntax not supported", str(failures[0].value))
