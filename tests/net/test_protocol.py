"""DicomProtocol with StringTransport and Clock: bytes in, bytes out, timers by hand."""

from __future__ import annotations

import struct
from unittest import mock

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from gateway.config import config_from_string
from gateway.dimse import commands as C
from gateway.net.protocol import DicomProtocol
from gateway.net.tls import DicomTLSProtocol
from gateway.ingest.service import SCPService
from gateway.ul import (
    A_ABORT,
    Abort,
    AssociateAC,
    AssociateRQ,
    PDataTF,
    PresentationContextAC,
    PresentationContextRQ,
    ReleaseRP,
    State,
    ReleaseRQ,
    UserInformation,
    decode_pdu,
    encode_pdata,
    encode_pdu,
)

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"


def rq(called="DICOMGW", calling="SCU"):
    return AssociateRQ(
        called, calling,
        (PresentationContextRQ(1, VERIFICATION, (IMPLICIT,)),),
        UserInformation(max_length=16384, implementation_class_uid="1.2.3"),
    )


def pdus(data: bytes):
    """Split written bytes into decoded PDUs."""
    out = []
    while data:
        t, length = struct.unpack(">BxL", data[:6])
        out.append(decode_pdu(t, data[6:6 + length]))
        data = data[6 + length:]
    return out


class Recorder:
    """A service user that records what the protocol tells it."""

    provider = None

    def __init__(self):
        self.events = []

    def connection_made(self, provider):
        self.provider = provider

    def owes_response(self):
        return False

    def association_request(self):
        return rq()

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *a: self.events.append((name,) + a)


def connect(user, requestor=False, artim=30.0, dimse=60.0):
    clock = Clock()
    p = DicomProtocol(user, clock, requestor=requestor, max_pdu_length=16384,
                      artim_timeout=artim, dimse_timeout=dimse)
    t = StringTransport()
    p.makeConnection(t)
    return p, t, clock


class UpperLayerTests(unittest.TestCase):
    def test_artim_closes_a_silent_connection(self):
        p, t, clock = connect(Recorder(), artim=30)
        clock.advance(29.9)
        self.assertFalse(t.disconnecting)
        clock.advance(0.2)
        self.assertTrue(t.disconnecting)
        self.assertEqual(p.disconnect_reason, "ARTIM timer expired")

    def test_associate_release(self):
        user = Recorder()
        p, t, clock = connect(user)
        p.dataReceived(encode_pdu(rq()))
        self.assertEqual(user.events[0][0], "associate_indication")
        self.assertEqual(clock.getDelayedCalls(), [])  # ARTIM stopped (AE-6)
        ac = AssociateAC("DICOMGW", "SCU", ())
        p.accept(ac)
        self.assertEqual(t.value(), encode_pdu(ac))
        t.clear()
        p.dataReceived(encode_pdu(ReleaseRQ()))
        self.assertEqual(user.events[-1], ("release_indication", False))
        p.release_response()
        self.assertEqual(t.value(), encode_pdu(ReleaseRP()))
        self.assertEqual(p.core.state, State.Sta13)
        # The peer should close now; if it does not, ARTIM does.
        clock.advance(30)
        self.assertTrue(t.disconnecting)

    def test_peer_abort(self):
        user = Recorder()
        p, t, clock = connect(user)
        p.dataReceived(encode_pdu(rq()))
        p.accept(AssociateAC("DICOMGW", "SCU", ()))
        p.dataReceived(encode_pdu(Abort(0, 0)))
        self.assertEqual(user.events[-1][0], "aborted")
        self.assertFalse(user.events[-1][1].provider)
        self.assertTrue(t.disconnecting)
        self.assertEqual(p.core.state, State.Sta1)

    def test_release_collision_requestor(self):
        user = Recorder()
        p, t, clock = connect(user, requestor=True)
        self.assertEqual(pdus(t.value()), [rq()])  # AE-1, AE-2 on connect
        self.assertEqual(p.core.state, State.Sta5)
        t.clear()
        p.dataReceived(encode_pdu(AssociateAC("DICOMGW", "SCU", (PresentationContextAC(1, 0, IMPLICIT),))))
        self.assertEqual(user.events[-1][0], "associate_accepted")
        self.assertEqual(p.core.state, State.Sta6)
        p.release_request()
        self.assertEqual(pdus(t.value()), [ReleaseRQ()])
        t.clear()
        p.dataReceived(encode_pdu(ReleaseRQ()))  # the peer released too
        self.assertEqual(user.events[-1], ("release_indication", True))
        self.assertEqual(p.core.state, State.Sta9)
        p.release_response()
        self.assertEqual(pdus(t.value()), [ReleaseRP()])
        self.assertEqual(p.core.state, State.Sta11)
        p.dataReceived(encode_pdu(ReleaseRP()))
        self.assertEqual(user.events[-1], ("release_confirmation",))
        self.assertTrue(t.disconnecting)

    def test_release_collision_acceptor(self):
        user = Recorder()
        p, t, clock = connect(user)
        p.core.state = State.Sta6
        p.release_request()
        p.dataReceived(encode_pdu(ReleaseRQ()))
        self.assertEqual(p.core.state, State.Sta10)
        t.clear()
        p.dataReceived(encode_pdu(ReleaseRP()))  # AR-10
        self.assertEqual(p.core.state, State.Sta12)
        p.release_response()  # AR-4
        self.assertEqual(pdus(t.value()), [ReleaseRP()])
        self.assertEqual(p.core.state, State.Sta13)

    def test_oversized_pdu_aborted_before_buffering(self):
        user = Recorder()
        p, t, clock = connect(user)
        p.dataReceived(encode_pdu(rq()))
        p.accept(AssociateAC("DICOMGW", "SCU", ()))
        t.clear()
        # A P-DATA-TF header announcing 1 GiB, and a few bytes of it.
        p.dataReceived(struct.pack(">BxL", 0x04, 1 << 30) + b"\x00" * 100)
        self.assertEqual(t.value(), bytes([A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 6]))
        self.assertEqual(p.core._partial, [])  # nothing of it was kept
        event = user.events[-1]
        self.assertEqual(event[0], "aborted")
        self.assertTrue(event[1].local)
        # More garbage is ignored, not parsed; ARTIM ends the connection.
        p.dataReceived(b"\xff" * 1000)
        self.assertEqual(t.value(), bytes([A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 6]))
        clock.advance(30)
        self.assertTrue(t.disconnecting)

    def test_pdata_before_association_is_aborted(self):
        user = Recorder()
        p, t, clock = connect(user)
        p.dataReceived(encode_pdata(1, 3, b"\x00\x00"))
        # AA-1 in Sta2: A-ABORT (service-provider, unexpected PDU)
        self.assertEqual(pdus(t.value()), [Abort(2, 2)])
        self.assertEqual(p.core.state, State.Sta13)

    def test_dimse_timeout_aborts(self):
        user = Recorder()
        p, t, clock = connect(user, dimse=10)
        p.dataReceived(encode_pdu(rq()))
        p.accept(AssociateAC("DICOMGW", "SCU", ()))
        t.clear()
        clock.advance(9)
        p.dataReceived(b"")  # any data resets the timer
        clock.advance(9)
        self.assertFalse(t.disconnecting)
        clock.advance(2)
        self.assertEqual(pdus(t.value()), [Abort(0, 0)])
        self.assertTrue(t.disconnecting)

    def test_dimse_timeout_not_counted_while_paused(self):
        p, t, clock = connect(Recorder(), dimse=10)
        p.dataReceived(encode_pdu(rq()))
        p.accept(AssociateAC("DICOMGW", "SCU", ()))
        p.pause()
        self.assertEqual(t.producerState, "paused")
        clock.advance(100)
        self.assertFalse(t.disconnecting)
        p.resume()
        self.assertEqual(t.producerState, "producing")
        clock.advance(11)
        self.assertTrue(t.disconnecting)


class EchoBytesTests(unittest.TestCase):
    def test_c_echo_exchange(self):
        config = config_from_string('[[ae]]\ntitle = "DICOMGW"\n')
        service = SCPService(config, storage=None, reactor=Clock())
        p = service.factory().buildProtocol(None)
        t = StringTransport()
        p.makeConnection(t)
        p.dataReceived(encode_pdu(rq()))
        (ac,) = pdus(t.value())
        self.assertIsInstance(ac, AssociateAC)
        self.assertEqual([(c.id, c.result, c.transfer_syntax) for c in ac.presentation_contexts],
                         [(1, 0, IMPLICIT)])
        self.assertEqual(ac.user_information.max_length, 131072)
        t.clear()
        command = C.encode_command(C.c_echo_rq(7))
        p.dataReceived(encode_pdata(1, 0x03, command))
        (reply,) = pdus(t.value())
        self.assertIsInstance(reply, PDataTF)
        (pdv,) = reply.pdvs
        self.assertEqual((pdv.context_id, pdv.control), (1, 0x03))
        rsp = C.decode_command(bytes(pdv.data))
        self.assertEqual((rsp.command_field, rsp.message_id_being_responded_to, rsp.status),
                         (C.C_ECHO_RSP, 7, 0))

    def test_unknown_called_ae_reject_bytes(self):
        config = config_from_string('[[ae]]\ntitle = "DICOMGW"\n')
        service = SCPService(config, storage=None, reactor=Clock())
        p = service.factory().buildProtocol(None)
        t = StringTransport()
        p.makeConnection(t)
        p.dataReceived(encode_pdu(rq(called="OTHER")))
        # A-ASSOCIATE-RJ: result 1 (permanent), source 1 (service-user), reason 7
        self.assertEqual(t.value(), bytes.fromhex("03000000000400010107"))

    def test_unsupported_dimse_gets_failure_response(self):
        config = config_from_string('[[ae]]\ntitle = "DICOMGW"\n')
        service = SCPService(config, storage=None, reactor=Clock())
        p = service.factory().buildProtocol(None)
        t = StringTransport()
        p.makeConnection(t)
        p.dataReceived(encode_pdu(rq()))
        t.clear()
        find = C.Command(command_field=C.C_FIND_RQ, message_id=3,
                         affected_sop_class_uid=VERIFICATION, command_data_set_type=0x0101)
        p.dataReceived(encode_pdata(1, 0x03, C.encode_command(find)))
        (reply,) = pdus(t.value())
        rsp = C.decode_command(bytes(reply.pdvs[0].data))
        self.assertEqual((rsp.command_field, rsp.status), (C.C_FIND_RQ | 0x8000, C.UNRECOGNIZED_OPERATION))

    def test_a_response_sent_to_the_scp_ends_the_association(self):
        # A response answers nothing the gateway asked: were it queued like a
        # request with no answer, every later response would wait behind it
        # and the DIMSE timer would count the silence as ours, for ever.
        config = config_from_string('[[ae]]\ntitle = "DICOMGW"\n')
        clock = Clock()
        service = SCPService(config, storage=None, reactor=clock)
        p = service.factory().buildProtocol(None)
        t = StringTransport()
        p.makeConnection(t)
        p.dataReceived(encode_pdu(rq()))
        t.clear()
        echo_rsp = C.c_echo_rsp(C.c_echo_rq(5))
        p.dataReceived(encode_pdata(1, 0x03, C.encode_command(echo_rsp)))
        # A-ABORT, service-provider, invalid PDU parameter value (PS3.8 9.3.8)
        self.assertEqual(t.value(), bytes([A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 6]))
        self.assertIn("unexpected C-ECHO-RSP", p.disconnect_reason)


class _RecordsTransport(DicomTLSProtocol):
    """Stands for the TLS layer: what the protocol writes is kept, nothing is encrypted."""

    def __init__(self):
        self.transport = StringTransport()
        self.written = []

    def write(self, data):
        self.written.append(data)

    def getPeer(self):
        return self.transport.getPeer()


class TLSRecordTests(unittest.TestCase):
    """Over TLS the records of one read reach the core together, once the TLS layer says the read is done."""

    def connect(self):
        clock, user = Clock(), Recorder()
        p = DicomProtocol(user, clock, requestor=False, max_pdu_length=16384, artim_timeout=30, dimse_timeout=60)
        p.makeConnection(_RecordsTransport())
        return p, clock, user

    def test_records_of_one_read_are_delivered_together_when_the_read_is_done(self):
        p, clock, user = self.connect()
        data = encode_pdu(rq())
        for i in range(0, len(data), 16):
            p.dataReceived(data[i:i + 16])
        self.assertEqual(user.events, [])
        p.tls_read_done()
        self.assertEqual([e[0] for e in user.events], ["associate_indication"])
        p.tls_read_done()  # a read that decrypted no record (a handshake message, say)
        self.assertEqual(len(user.events), 1)

    def test_the_tls_layer_says_when_a_read_is_done_even_when_it_fails(self):
        class Top:
            reads = 0

            def tls_read_done(self):
                self.reads += 1

        tls = DicomTLSProtocol.__new__(DicomTLSProtocol)
        tls.wrappedProtocol = Top()
        with mock.patch.object(TLSMemoryBIOProtocol, "dataReceived", side_effect=[None, RuntimeError("bug")]):
            tls.dataReceived(b"one read")
            self.assertRaises(RuntimeError, tls.dataReceived, b"another")
        self.assertEqual(tls.wrappedProtocol.reads, 2)

    def test_a_close_does_not_overtake_the_records_before_it(self):
        p, clock, user = self.connect()
        p.dataReceived(encode_pdu(rq()))
        p.tls_read_done()
        p.accept(AssociateAC("DICOMGW", "SCU", ()))
        p.dataReceived(encode_pdu(Abort(0, 0)))
        p.connectionLost(Failure(ConnectionDone()))
        aborts = [e[1] for e in user.events if e[0] == "aborted"]
        self.assertEqual([(a.provider, a.source) for a in aborts], [(False, 0)])  # the peer's A-ABORT
