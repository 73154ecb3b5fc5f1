"""The PDU deadline: a peer that trickles bytes is cut off.

With a Clock (bytes in by hand) and with a real socket against a running
gateway."""

from __future__ import annotations

import socket
import time

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from gateway.net.protocol import DicomProtocol
from gateway.ul import AssociateAC, ReleaseRQ, encode_pdu
from tests.integration.harness import in_thread, start_gateway
from tests.integration.test_policy import collect_events, wait_for
from tests.net.test_protocol import Recorder, rq


def connect(pdu_timeout=10.0, dimse=60.0):
    clock = Clock()
    user = Recorder()
    p = DicomProtocol(user, clock, requestor=False, max_pdu_length=16384,
                      artim_timeout=30, dimse_timeout=dimse, pdu_timeout=pdu_timeout)
    t = StringTransport()
    p.makeConnection(t)
    p.dataReceived(encode_pdu(rq()))
    p.accept(AssociateAC("DICOMGW", "SCU", ()))
    t.clear()
    return p, t, clock, user


class ClockTests(unittest.TestCase):
    def test_trickle_is_cut_off_although_every_byte_resets_dimse(self):
        p, t, clock, user = connect(pdu_timeout=10, dimse=5)
        data = encode_pdu(ReleaseRQ())
        for i in range(9):  # one byte a second: DIMSE (5 s) never expires
            p.dataReceived(data[i:i + 1])
            clock.advance(1)
            self.assertFalse(t.disconnecting, f"cut off after {i + 1} s")
        clock.advance(1)
        self.assertTrue(t.disconnecting)
        self.assertIn("PDU timeout", p.disconnect_reason)
        self.assertEqual(t.value()[:1], b"\x07")  # A-ABORT sent

    def test_complete_pdus_stop_the_deadline(self):
        p, t, clock, user = connect(pdu_timeout=10, dimse=600)
        data = encode_pdu(ReleaseRQ())
        p.dataReceived(data[:3])
        clock.advance(9)
        p.dataReceived(data[3:])  # complete within the deadline
        self.assertEqual(user.events[-1], ("release_indication", False))
        clock.advance(100)
        self.assertFalse(t.disconnecting)

    def test_not_counted_while_we_hold_the_peer_back(self):
        p, t, clock, user = connect(pdu_timeout=10, dimse=600)
        p.dataReceived(b"\x04\x00")
        p.pause()
        clock.advance(100)
        self.assertFalse(t.disconnecting)
        p.resume()  # a fresh deadline from here
        clock.advance(9.9)
        self.assertFalse(t.disconnecting)
        clock.advance(0.2)
        self.assertTrue(t.disconnecting)


class RealSocketTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_peer_trickling_a_byte_at_a_time_is_cut_off(self):
        """pdu = 1 s, dimse = 30 s: a byte every 0.2 s keeps DIMSE happy forever,
        but the A-ASSOCIATE-RQ is not complete after 1 s, so we close."""
        gw = yield start_gateway(self, pdu=1, dimse=30, artim=30)
        closed = collect_events(self, "association.closed")
        data = encode_pdu(rq())

        def trickle():
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
            started = time.monotonic()
            try:
                for i in range(len(data) - 1):  # never the last byte; bounded: ~15 s at most
                    s.sendall(data[i:i + 1])
                    time.sleep(0.2)
                    if time.monotonic() - started > 15:
                        break
                return None
            except OSError:
                return time.monotonic() - started
            finally:
                s.close()

        cut_after = yield in_thread(trickle)
        self.assertIsNotNone(cut_after, "the trickling peer was never cut off")
        self.assertLess(cut_after, 5)
        yield wait_for(lambda: closed)
        self.assertIn("PDU timeout", closed[0]["outcome"])


class TLSPortTests(unittest.TestCase):
    """The same rules on the TLS port."""

    timeout = 60

    @defer.inlineCallbacks
    def test_silent_and_trickling_peers_are_cut_off(self):
        import ssl

        from tests.integration.harness import make_certificates
        from tests.integration.test_policy import client_context

        certs = make_certificates(self)
        gw = yield start_gateway(self, pdu=1, dimse=30, artim=1, tls_dir=certs)
        data = encode_pdu(rq())

        def silent():
            # TCP connected, not even a ClientHello: ARTIM closes it.
            s = socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10)
            started = time.monotonic()
            try:
                try:
                    got = s.recv(1)
                except ConnectionResetError:
                    got = b""  # aborted: closed with a reset
                return got, time.monotonic() - started
            finally:
                s.close()

        def trickle():
            raw = socket.create_connection(("127.0.0.1", gw.tls_port), timeout=5)
            s = client_context(certs).wrap_socket(raw, server_hostname="localhost")
            started = time.monotonic()
            try:
                for i in range(len(data) - 1):  # bounded: ~15 s at most
                    s.sendall(data[i:i + 1])
                    time.sleep(0.2)
                    if time.monotonic() - started > 15:
                        return None
                return None
            except (OSError, ssl.SSLError):
                return time.monotonic() - started
            finally:
                raw.close()

        got, waited = yield in_thread(silent)
        self.assertEqual(got, b"")
        self.assertLess(waited, 5)
        cut_after = yield in_thread(trickle)
        self.assertIsNotNone(cut_after, "the trickling TLS peer was never cut off")
        self.assertLess(cut_after, 5)
