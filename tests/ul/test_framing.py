"""PDU framing in the association core: any split of the byte stream gives the
same PDUs, and the PDV data of P-DATA-TF stream to the sink as views."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from gateway.ul import AbortIndication, AssociateConfirmation, Association, Send
from gateway.ul import (
    AssociateAC,
    AssociateRQ,
    PresentationContextAC,
    PresentationContextRQ,
    UserInformation,
    encode_pdata,
    encode_pdu,
)

RQ = AssociateRQ("DICOMGW", "SCU", (PresentationContextRQ(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",)),),
                 UserInformation(max_length=16384, implementation_class_uid="1.2.3"))


class Sink:
    """Collects what the core streams: one (context, control, bytes) per PDV."""

    def __init__(self):
        self.pdvs: list = []
        self.pieces: list = []
        self._open = None

    def __call__(self, context_id, control, data, end):
        self.pieces.append(data)
        if self._open is None:
            self._open = (context_id, control, bytearray())
        self._open[2].extend(data)
        if end:
            self.pdvs.append((self._open[0], self._open[1], bytes(self._open[2])))
            self._open = None


def established(max_pdu=16384, sink=None):
    a = Association(requestor=False, max_pdu_length=max_pdu, sink=sink if sink is not None else Sink())
    a.connection_made()
    a.receive_data(encode_pdu(RQ))
    a.accept(AssociateAC("DICOMGW", "SCU", ()))
    assert a.established
    return a


def stream(count=6, seed=1):
    rng = random.Random(seed)
    payloads = [rng.randbytes(rng.randint(1, 9000)) for _ in range(count)]
    return payloads, b"".join(encode_pdata(1, 0, p) for p in payloads)


def received(a, chunks):
    for chunk in chunks:
        for effect in a.receive_data(chunk):
            if isinstance(effect, (AbortIndication, Send)):
                raise AssertionError(f"unexpected {effect!r}")
    return [data for _c, _ctl, data in a.sink.pdvs]


def pdv(context_id, control, data):
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def pdata(*items):
    body = b"".join(items)
    return struct.pack(">BxL", 0x04, len(body)) + body


class FramingTests(unittest.TestCase):
    def test_every_split_point_of_two_pdus(self):
        payloads, data = stream(2)
        for cut in range(len(data) + 1):
            self.assertEqual(received(established(), [data[:cut], data[cut:]]), payloads, cut)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=20000), max_size=12), st.integers(0, 1000))
    def test_any_chunking(self, cuts, seed):
        payloads, data = stream(seed=seed)
        points = sorted({min(c, len(data)) for c in cuts})
        chunks = [data[i:j] for i, j in zip([0] + points, points + [len(data)])]
        a = established()
        self.assertEqual(received(a, chunks), payloads)
        self.assertFalse(a.partial_pdu)

    def test_pieces_are_views_of_the_received_bytes(self):
        payloads, data = stream(3)
        a = established()
        a.receive_data(data[:5000])
        a.receive_data(data[5000:])
        self.assertEqual([d for _c, _ctl, d in a.sink.pdvs], payloads)
        # No PDU was joined: every piece is a view of one of the two reads.
        self.assertTrue(all(isinstance(p, memoryview) for p in a.sink.pieces))
        self.assertEqual(sum(len(p) for p in a.sink.pieces), sum(map(len, payloads)))

    def test_a_reused_buffer_is_never_seen_through_a_piece(self):
        payloads, data = stream(1)
        buf = bytearray(data)
        a = established()
        a.receive_data(buf)
        buf[:] = b"\xff" * len(buf)
        self.assertEqual(bytes(a.sink.pieces[0]), payloads[0])

    def test_several_pdvs_in_one_pdu_split_anywhere(self):
        items = [pdv(1, 0, b"a" * 7), pdv(3, 1, b""), pdv(1, 2, b"bc")]
        data = pdata(*items) + pdata(pdv(5, 3, b"z" * 300))
        for cut in range(len(data) + 1):
            a = established()
            received(a, [data[:cut], data[cut:]])
            self.assertEqual(a.sink.pdvs, [(1, 0, b"a" * 7), (3, 1, b""), (1, 2, b"bc"), (5, 3, b"z" * 300)], cut)
            self.assertFalse(a.partial_pdu)

    def test_broken_pdv_items_abort_before_any_of_their_data_goes_on(self):
        cases = {
            "less than 2": pdata(struct.pack(">IBB", 1, 1, 0) + b"x"),
            "exceeds": pdata(struct.pack(">IBB", 50, 1, 0) + b"x" * 10),
            "is not odd": pdata(pdv(2, 0, b"xyz")),
            "truncated PDV item header": pdata(pdv(1, 0, b"ok"), b"\x00\x00\x00"),
            "without any PDV item": struct.pack(">BxL", 0x04, 0),
        }
        for problem, data in cases.items():
            for cut in range(len(data) + 1):
                a = established()
                effects = a.receive_data(data[:cut]) + a.receive_data(data[cut:])
                [abort] = [e for e in effects if isinstance(e, AbortIndication)]
                self.assertIn(problem, abort.detail, (problem, cut))
                self.assertEqual(abort.reason, 6)
                self.assertNotIn(b"xyz", b"".join(bytes(p) for p in a.sink.pieces))
                self.assertFalse(a.partial_pdu)

    def test_an_abort_from_inside_the_sink_drops_the_rest_of_the_pdu(self):
        seen = []

        def sink(context_id, control, data, end):
            seen.append(bytes(data))
            a.abort()

        a = established(sink=sink)
        a.receive_data(pdata(pdv(1, 0, b"first"), pdv(1, 2, b"second")) + pdata(pdv(1, 2, b"third")))
        self.assertEqual(seen, [b"first"])

    def test_the_data_wait_until_what_came_before_them_is_carried_out(self):
        # A requestor: the A-ASSOCIATE-AC and a P-DATA-TF arrive in one read.
        sink = Sink()
        a = Association(requestor=True, max_pdu_length=16384, sink=sink)
        a.request(RQ)
        a.connection_made()
        ac = AssociateAC("DICOMGW", "SCU", (PresentationContextAC(1, 0, "1.2.840.10008.1.2"),),
                         UserInformation(max_length=16384, implementation_class_uid="1.2.3"))
        effects = a.receive_data(encode_pdu(ac) + pdata(pdv(1, 3, b"data")))
        self.assertTrue(any(isinstance(e, AssociateConfirmation) for e in effects))
        self.assertEqual(sink.pdvs, [])  # not before the user knows it is associated
        self.assertTrue(a.held)
        self.assertEqual(a.resume(), [])
        self.assertEqual(sink.pdvs, [(1, 3, b"data")])
        self.assertFalse(a.held)

    def test_the_declared_length_is_judged_before_the_body_arrives(self):
        a = established(max_pdu=16384)
        header = struct.pack(">BxL", 0x04, 10 << 20)
        effects = a.receive_data(header[:3])
        self.assertEqual(effects, [])
        self.assertTrue(a.partial_pdu)
        effects = a.receive_data(header[3:])  # the header is complete: refused now
        self.assertTrue(any(isinstance(e, AbortIndication) for e in effects))
        self.assertFalse(a.partial_pdu)
