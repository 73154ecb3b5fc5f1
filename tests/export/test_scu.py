"""The SCU side with StringTransport and Clock: what we send, how we time out.

The requestor half of the association core is driven here through
DicomProtocol exactly as a real connection does: bytes out are decoded and
checked, answers are fed in as bytes, timers advance by hand.
"""

from __future__ import annotations

import os

from twisted.internet.error import ConnectionDone

from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from gateway.dimse import commands as C
from gateway.dimse.message import CONTROL_COMMAND, CONTROL_LAST, MessageAssembler
from gateway.export import scu as client
from gateway.export.scu import (
    AssociationLost,
    AssociationRejected,
    ContextNotAccepted,
    Peer,
    SCUAssociation,
    SCUTimeout,
)
from gateway.net.protocol import DicomProtocol
from gateway.testing import InlinePool, ThreadlessClock
from gateway.ul import (
    ABORT_SOURCE_PROVIDER,
    PC_ACCEPTANCE,
    PC_TRANSFER_SYNTAXES_NOT_SUPPORTED,
    Abort,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    PresentationContextAC,
    ReleaseRP,
    ReleaseRQ,
    UserInformation,
    encode_pdata,
    encode_pdu,
)
from tests.net.test_protocol import pdus

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
RLE = "1.2.840.10008.1.2.5"
CT = "1.2.840.10008.5.1.4.1.1.2"


class ProducerTransport(StringTransport):
    """StringTransport keeps the registered producer; we drive it by hand."""


def make(contexts=((VERIFICATION, IMPLICIT),), artim=10, dimse=20):
    clock = ThreadlessClock()
    user = SCUAssociation(Peer("127.0.0.1", 104, "PACS", "DICOMGW"), list(contexts), clock, InlinePool(),
                          max_pdu_length=16384, implementation_version_name="TEST", artim_timeout=artim)
    protocol = DicomProtocol(user, clock, requestor=True, max_pdu_length=16384, artim_timeout=artim,
                             dimse_timeout=dimse)
    transport = ProducerTransport()
    protocol.makeConnection(transport)
    return clock, user, protocol, transport


def take(transport):
    data = transport.value()
    transport.clear()
    return pdus(data)


def accept(protocol, user, refuse=(), max_length=16384):
    results = []
    for cid, (abstract, ts) in user.proposed.items():
        if (abstract, ts) in refuse:
            results.append(PresentationContextAC(cid, PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, ts))
        else:
            results.append(PresentationContextAC(cid, PC_ACCEPTANCE, ts))
    ac = AssociateAC("PACS", "DICOMGW", tuple(results), UserInformation(max_length=max_length,
                                                                         implementation_class_uid="1.2.3"))
    protocol.dataReceived(encode_pdu(ac))


class _Messages(list):
    """A MessageAssembler's handler: [command, data set bytes] per message."""

    def command_received(self, command, context_id):
        self.append([command, bytearray()])

    def data_received(self, data, last):
        self[-1][1] += data

    def dimse_error(self, detail):
        raise AssertionError(detail)


def messages(pdu_list):
    """(command, data set bytes) for every DIMSE message in P-DATA PDUs."""
    out = _Messages()
    assembler = MessageAssembler(out)
    for pdu in pdu_list:
        for pdv in pdu.pdvs:
            assembler.pdv(pdv.context_id, pdv.control, pdv.data, True)
    return out


class AssociationTests(unittest.TestCase):
    def test_request_proposes_one_context_per_stored_syntax(self):
        clock, user, protocol, transport = make([(CT, EXPLICIT), (CT, RLE), (CT, EXPLICIT)])
        [rq] = take(transport)
        self.assertIsInstance(rq, AssociateRQ)
        self.assertEqual((rq.called_ae, rq.calling_ae), ("PACS", "DICOMGW"))
        self.assertEqual([(pc.id, pc.abstract_syntax, pc.transfer_syntaxes) for pc in rq.presentation_contexts],
                         [(1, CT, (EXPLICIT,)), (3, CT, (RLE,))])
        self.assertEqual(rq.user_information.max_length, 16384)

        accept(protocol, user, refuse={(CT, RLE)})
        self.assertIs(self.successResultOf(user.established), user)
        self.assertEqual(user.context_for(CT, EXPLICIT), 1)
        e = self.assertRaises(ContextNotAccepted, user.context_for, CT, RLE)
        self.assertIn("in transfer syntax 1.2.840.10008.1.2.5: transfer syntax not supported", str(e))

    def test_rejection_names_result_source_reason(self):
        clock, user, protocol, transport = make()
        protocol.dataReceived(encode_pdu(AssociateRJ(2, 3, 2)))
        e = self.failureResultOf(user.established, AssociationRejected).value
        self.assertEqual((e.result, e.source, e.reason), (2, 3, 2))
        self.assertEqual(str(e), "association rejected: result 2 (transient), source 3 "
                                 "(service-provider (presentation)), reason 2 (local limit exceeded)")
        self.assertTrue(transport.disconnecting)

    def test_no_associate_answer_times_out_with_abort(self):
        clock, user, protocol, transport = make(artim=7)
        take(transport)
        clock.advance(6.9)
        self.assertNoResult(user.established)
        clock.advance(0.2)
        e = self.failureResultOf(user.established, SCUTimeout).value
        self.assertEqual(str(e), "timeout: no A-ASSOCIATE response within 7 s")
        [abort] = take(transport)
        self.assertIsInstance(abort, Abort)


class EchoTests(unittest.TestCase):
    def test_echo_round_trip_and_release(self):
        clock, user, protocol, transport = make()
        take(transport)
        accept(protocol, user)
        d = user.echo()
        [(cmd, data)] = messages(take(transport))
        self.assertEqual((cmd.command_field, cmd.message_id, cmd.affected_sop_class_uid),
                         (C.C_ECHO_RQ, 1, VERIFICATION))
        protocol.dataReceived(encode_pdata(1, CONTROL_COMMAND | CONTROL_LAST,
                                           C.encode_command(C.c_echo_rsp(cmd, C.SUCCESS))))
        self.assertEqual(self.successResultOf(d), C.SUCCESS)

        released = user.release()
        [rq] = take(transport)
        self.assertIsInstance(rq, ReleaseRQ)
        self.assertNoResult(released)
        protocol.dataReceived(encode_pdu(ReleaseRP()))
        self.successResultOf(released)
        self.assertTrue(transport.disconnecting)

    def test_dimse_timeout_aborts_and_fails_the_request(self):
        clock, user, protocol, transport = make(dimse=20)
        take(transport)
        accept(protocol, user)
        d = user.echo()
        take(transport)
        clock.advance(19)
        self.assertNoResult(d)
        clock.advance(1.5)
        [abort] = take(transport)
        self.assertIsInstance(abort, Abort)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        e = self.failureResultOf(d, AssociationLost).value
        self.assertEqual(str(e), "DIMSE timeout (20 s without data)")

    def test_response_to_a_request_never_sent_aborts(self):
        clock, user, protocol, transport = make()
        take(transport)
        accept(protocol, user)
        d = user.echo()
        take(transport)
        bogus = C.Command(command_field=C.C_ECHO_RSP, message_id_being_responded_to=99,
                          affected_sop_class_uid=VERIFICATION, status=0)
        protocol.dataReceived(encode_pdata(1, CONTROL_COMMAND | CONTROL_LAST, C.encode_command(bogus)))
        self.failureResultOf(d, AssociationLost)
        [abort] = take(transport)
        self.assertEqual((abort.source, abort.reason), (ABORT_SOURCE_PROVIDER, 6))


class StoreTests(unittest.TestCase):
    def setUp(self):
        self.patch(client, "READ_CHUNK", 65536)

    def dataset_file(self, size):
        path = self.mktemp()
        self.payload = os.urandom(size)
        with open(path, "wb") as f:
            f.write(b"HEADER" + self.payload + b"TRAILER")
        return path

    def test_streams_in_fragments_and_waits_while_paused(self):
        clock, user, protocol, transport = make([(CT, EXPLICIT)])
        take(transport)
        accept(protocol, user, max_length=4096)
        path = self.dataset_file(200_000)
        self.assertIs(transport.producer, user)

        # The transport's buffer is full from the start: after the command
        # and the first chunk nothing more is read until it resumes.
        user.pauseProducing()
        d = user.store(path, 6, len(self.payload), CT, "1.2.3.4", EXPLICIT)
        first = take(transport)
        self.assertEqual(sum(len(p.pdvs[0].data) for p in first if not p.pdvs[0].control & CONTROL_COMMAND),
                         65536 - 65536 % 4090)
        self.assertTrue(user.owes_response())
        clock.advance(100)  # a paused sender is not a silent peer
        self.assertEqual(take(transport), [])
        self.assertNoResult(d)
        user.resumeProducing()
        rest = take(transport)
        self.assertFalse(user.owes_response())

        all_pdus = first + rest
        for p in all_pdus:
            self.assertLessEqual(len(encode_pdu(p)) - 6, 4096)
        data_pdvs = [p.pdvs[0] for p in all_pdus if not p.pdvs[0].control & CONTROL_COMMAND]
        self.assertEqual([bool(v.control & CONTROL_LAST) for v in data_pdvs],
                         [False] * (len(data_pdvs) - 1) + [True])
        [(cmd, data)] = messages(all_pdus)
        self.assertEqual((cmd.command_field, cmd.affected_sop_instance_uid), (C.C_STORE_RQ, "1.2.3.4"))
        self.assertEqual(bytes(data), self.payload)

        protocol.dataReceived(encode_pdata(1, CONTROL_COMMAND | CONTROL_LAST,
                                           C.encode_command(C.c_store_rsp(cmd, 0xA700))))
        self.assertEqual(self.successResultOf(d).status, 0xA700)


class FailureWordingTests(unittest.TestCase):
    def test_connect_failures(self):
        from twisted.internet import error

        cases = [
            (error.ConnectionRefusedError(), client.ConnectFailed, "connection refused"),
            (error.TimeoutError(), client.SCUTimeout, "connect timed out"),
            (error.DNSLookupError("nosuch.invalid"), client.ConnectFailed, "host not found"),
        ]
        for exc, kind, text in cases:
            e = client.describe_connect_failure(Failure(exc))
            self.assertIsInstance(e, kind)
            self.assertIn(text, str(e))


class PeerRequestTests(unittest.TestCase):
    def test_a_request_from_the_acceptor_is_refused_on_its_context(self):
        clock, user, protocol, transport = make([(VERIFICATION, IMPLICIT), (CT, EXPLICIT)])
        take(transport)
        accept(protocol, user)
        protocol.dataReceived(encode_pdata(3, CONTROL_COMMAND | CONTROL_LAST, C.encode_command(C.c_echo_rq(7))))
        [pdu] = take(transport)
        self.assertEqual(pdu.pdvs[0].context_id, 3)
        [(rsp, _)] = messages([pdu])
        self.assertEqual((rsp.command_field, rsp.message_id_being_responded_to, rsp.status),
                         (C.C_ECHO_RSP, 7, C.UNRECOGNIZED_OPERATION))
        self.assertTrue(user.provider.can_request_release)  # the association goes on
