"""A PDU that arrives in the same read as the A-ASSOCIATE-RQ, before we answer.

The core handles every PDU of one read before the adapter runs the effects,
so by the time the user accepts, PS3.8 (Sta3 + P-DATA: AA-8) has aborted
the association.  The answer must then be dropped, not raise.  The fuzz test
found this."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from gateway.dimse import commands as C
from gateway.dimse.message import fragment_message
from gateway.net.protocol import DicomProtocol
from gateway.ul import AssociateAC, AssociateRJ, encode_pdu
from tests.net.test_protocol import Recorder, pdus, rq


class Answering(Recorder):
    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def associate_indication(self, request):
        self.events.append(("associate_indication",))
        if isinstance(self.answer, AssociateAC):
            self.provider.accept(self.answer)
        else:
            self.provider.reject(self.answer)


class EarlyPDUTests(unittest.TestCase):
    def test_pdata_before_our_answer_aborts(self):
        for answer in (AssociateAC("DICOMGW", "SCU", ()), AssociateRJ(1, 1, 7)):
            user = Answering(answer)
            p = DicomProtocol(user, Clock(), requestor=False, max_pdu_length=16384,
                              artim_timeout=30, dimse_timeout=60)
            t = StringTransport()
            p.makeConnection(t)
            echo = b"".join(fragment_message(1, C.encode_command(C.c_echo_rq(1)), 16384))
            p.dataReceived(encode_pdu(rq()) + echo)
            sent = pdus(t.value())
            self.assertEqual(len(sent), 1, sent)
            self.assertEqual(type(sent[0]).__name__, "Abort")
            self.assertEqual((sent[0].source, sent[0].reason), (2, 2))  # provider, unexpected PDU
            self.assertEqual([e[0] for e in user.events], ["associate_indication", "aborted"])
