"""Conformance and fault handling against a live gateway, over raw sockets.

Each case sends exact bytes a misbehaving or unusual peer sends and checks
the exact answer: the upper layer's (A-ABORT, A-ASSOCIATE-AC results) and
DIMSE's (the response to each command field), that nothing half-received
is stored, and that no wait outlives its timer.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from twisted.internet import defer
from twisted.trial import unittest

from gateway import ul as P
from gateway.dimse import commands as C
from gateway.dimse import sop
from gateway.dimse.message import fragment_message
from gateway.testing import partial_files
from tests.integration.harness import in_thread, start_gateway
from tests.integration.test_hostile import abort_bytes, files_under
from tests.integration.test_policy import wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
IMPLICIT, EXPLICIT = sop.IMPLICIT_VR_LITTLE_ENDIAN, sop.EXPLICIT_VR_LITTLE_ENDIAN


class RawPeer:
    """A requestor that sends whatever it is told, and reads PDUs with a deadline."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = bytearray()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def pdu(self, timeout: float = 5.0):
        """The next PDU as (type, body), or None when the gateway closed."""
        deadline = time.monotonic() + timeout
        while len(self.buf) < 6 or len(self.buf) < 6 + struct.unpack_from(">BxL", self.buf)[1]:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk
        length = struct.unpack_from(">BxL", self.buf)[1]
        pdu_type, body = self.buf[0], bytes(self.buf[6:6 + length])
        del self.buf[:6 + length]
        return pdu_type, body

    def associate(self, contexts) -> P.AssociateAC:
        self.send(P.encode_pdu(P.AssociateRQ(
            "DICOMGW", "RAWPEER",
            tuple(P.PresentationContextRQ(cid, a, tuple(ts)) for cid, a, ts in contexts),
            P.UserInformation(max_length=16384, implementation_class_uid="1.2.3"))))
        pdu_type, body = self.pdu()
        assert pdu_type == 0x02, (pdu_type, body[:16])
        return P.decode_pdu(pdu_type, body)

    def command(self, context_id: int, cmd: C.Command, dataset: bytes | None = None, last=True):
        for pdu in fragment_message(context_id, C.encode_command(cmd), 16384, dataset):
            self.send(pdu)

    def response(self, timeout: float = 5.0) -> C.Command:
        pdu_type, body = self.pdu(timeout)
        assert pdu_type == 0x04, (pdu_type, body[:16])
        return C.decode_command(P.decode_pdu(pdu_type, body).pdvs[0].data)

    def close(self):
        self.sock.close()


class ConformanceTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def gateway(self, **kw):
        gw = yield start_gateway(self, **kw)
        return gw

    def peer(self, gw) -> RawPeer:
        peer = RawPeer(gw.port)
        self.addCleanup(peer.close)
        return peer

    # ---- 1. release in the middle of a message; every wait bounded ----------

    @defer.inlineCallbacks
    def test_release_in_the_middle_of_a_data_set_aborts_and_frees_the_slot(self):
        gw = yield self.gateway()

        def run(half):
            peer = self.peer(gw)
            peer.associate([(1, CT, [IMPLICIT])])
            store = C.c_store_rq(1, CT, "1.2.3.4.5")
            if half == "data set":  # the command, then the first fragment of the data set
                peer.command(1, store)
                peer.send(P.encode_pdata(1, 0x00, b"\x08\x00\x16\x00" + b"x" * 100))
            else:  # the first fragment of the command only
                peer.send(P.encode_pdata(1, 0x01, C.encode_command(store)[:20]))
            started = time.monotonic()
            peer.send(P.encode_pdu(P.ReleaseRQ()))
            answer = peer.pdu()
            return answer, time.monotonic() - started

        for half in ("data set", "command"):
            (pdu_type, body), took = yield in_thread(run, half)
            self.assertEqual(bytes([pdu_type, 0, 0, 0, 0, 4]) + body, abort_bytes(2, 6), half)
            self.assertLess(took, 2, half)
        yield wait_for(lambda: not gw.scp.active, timeout=5)  # the max_associations slot is free
        # The abandoned file is removed in the disk pool, just after the slot is freed.
        tmp = os.path.join(gw.storage_root, "tmp")
        yield wait_for(lambda: not partial_files(tmp), timeout=5)
        self.assertEqual(gw.stored_files(), [])

    @defer.inlineCallbacks
    def test_a_peer_silent_in_the_middle_of_a_data_set_meets_the_dimse_timeout(self):
        gw = yield self.gateway(dimse=1, pdu=30)

        def run():
            peer = self.peer(gw)
            peer.associate([(1, CT, [IMPLICIT])])
            peer.command(1, C.c_store_rq(1, CT, "1.2.3.4.6"))
            peer.send(P.encode_pdata(1, 0x00, b"\x08\x00\x16\x00" + b"x" * 100))
            started = time.monotonic()
            return peer.pdu(timeout=10), time.monotonic() - started

        (pdu_type, body), took = yield in_thread(run)
        self.assertEqual(bytes([pdu_type, 0, 0, 0, 0, 4]) + body, abort_bytes(0, 0))
        self.assertLess(took, 4)
        yield wait_for(lambda: not gw.scp.active, timeout=5)
        # The abandoned file is removed in the disk pool, just after the slot is freed.
        tmp = os.path.join(gw.storage_root, "tmp")
        yield wait_for(lambda: not partial_files(tmp), timeout=5)

    # ---- 2. the whole A-ASSOCIATE-RQ validated before it is accepted --------

    @defer.inlineCallbacks
    def test_duplicate_context_ids_are_refused_before_anything_is_negotiated(self):
        gw = yield self.gateway()
        rq = P.encode_pdu(P.AssociateRQ("DICOMGW", "RAWPEER", (
            P.PresentationContextRQ(1, CT, (EXPLICIT,)),
            P.PresentationContextRQ(1, MR, (IMPLICIT,)),
        ), P.UserInformation(max_length=16384)))
        no_contexts = P.encode_pdu(P.AssociateRQ("DICOMGW", "RAWPEER", (), P.UserInformation(max_length=16384)))

        def run(data):
            peer = self.peer(gw)
            peer.send(data)
            pdu_type, body = peer.pdu()
            return bytes([pdu_type, 0, 0, 0, 0, 4]) + body

        for data in (rq, no_contexts):
            got = yield in_thread(run, data)
            self.assertEqual(got, abort_bytes(2, 6))
        self.assertEqual(files_under(gw.storage_root), [])

    @defer.inlineCallbacks
    def test_abstract_syntaxes_that_are_not_storage_sop_class_uids_are_refused(self):
        gw = yield self.gateway()
        refused = ["NOT-A-UID", "1.2.3..4", "01.2.3", "1.2.3.", IMPLICIT, P.DICOM_APPLICATION_CONTEXT]

        def run():
            peer = self.peer(gw)
            contexts = [(2 * i + 1, a, [IMPLICIT]) for i, a in enumerate(refused + [CT])]
            return peer.associate(contexts)

        ac = yield in_thread(run)
        results = {pc.id: pc.result for pc in ac.presentation_contexts}
        self.assertEqual(results, {2 * i + 1: P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED for i in range(len(refused))}
                         | {2 * len(refused) + 1: P.PC_ACCEPTANCE})

    # ---- 4. the response to a DIMSE request always echoes its command -------

    @defer.inlineCallbacks
    def test_every_request_is_answered_with_its_own_response(self):
        gw = yield self.gateway()
        requests = [C.C_GET_RQ, C.C_FIND_RQ, C.C_MOVE_RQ, C.N_EVENT_REPORT_RQ, C.N_GET_RQ, C.N_SET_RQ,
                    C.N_ACTION_RQ, C.N_CREATE_RQ, C.N_DELETE_RQ, 0x0002]

        def run():
            peer = self.peer(gw)
            peer.associate([(1, sop.VERIFICATION, [IMPLICIT]), (3, CT, [IMPLICIT])])
            answers = []
            mid = 10
            for field in requests:
                for with_dataset in (False, True):
                    mid += 1
                    cmd = C.Command(command_field=field, message_id=mid, affected_sop_class_uid=CT,
                                    command_data_set_type=C.DATASET_PRESENT if with_dataset else C.NO_DATASET)
                    peer.command(3, cmd, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY " if with_dataset else None)
                    rsp = peer.response()
                    answers.append((field, with_dataset, rsp.command_field, rsp.message_id_being_responded_to,
                                    rsp.status, mid))
            # A C-STORE on a context of another SOP class: refused, not stored.
            peer.command(1, C.c_store_rq(99, CT, "1.2.3.4.7"), b"\x08\x00\x16\x00" + b"x" * 10)
            store = peer.response()
            peer.command(1, C.c_echo_rq(100))
            echo = peer.response()
            return answers, store, echo

        answers, store, echo = yield in_thread(run)
        for field, with_dataset, rsp_field, responded_to, status, mid in answers:
            self.assertEqual((rsp_field, responded_to, status), (field | 0x8000, mid, C.UNRECOGNIZED_OPERATION),
                             (hex(field), with_dataset))
        self.assertEqual((store.command_field, store.status), (C.C_STORE_RSP, C.SOP_CLASS_NOT_SUPPORTED))
        self.assertEqual((echo.command_field, echo.status), (C.C_ECHO_RSP, C.SUCCESS))
        self.assertEqual(gw.stored_files(), [])
