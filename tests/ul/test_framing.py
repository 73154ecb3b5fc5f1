"""PDU framing in the association core: any split of the byte stream gives the same PDUs."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from gateway.ul import AbortIndication, Association, PDataIndication, Send
from gateway.ul import (
    AssociateAC,
    AssociateRQ,
    PresentationContextRQ,
    UserInformation,
    encode_pdata,
    encode_pdu,
)

RQ = AssociateRQ("DICOMGW", "SCU", (PresentationContextRQ(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",)),),
                 UserInformation(max_length=16384, implementation_class_uid="1.2.3"))


def established(max_pdu=16384):
    a = Association(requestor=False, max_pdu_length=max_pdu)
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
    got = []
    for chunk in chunks:
        for effect in a.receive_data(chunk):
            if isinstance(effect, PDataIndication):
                got.extend(bytes(pdv.data) for pdv in effect.pdu.pdvs)
            elif isinstance(effect, (AbortIndication, Send)):
                raise AssertionError(f"unexpected {effect!r}")
    return got


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

    def test_whole_pdus_are_not_copied(self):
        payloads, data = stream(3)
        a = established()
        [effect] = [e for e in a.receive_data(data) if isinstance(e, PDataIndication)][:1]
        self.assertIs(effect.pdu.pdvs[0].data.obj, data)  # a view of the received bytes

    def test_a_reused_buffer_does_not_change_what_was_received(self):
        payloads, data = stream(1)
        buf = bytearray(data)
        a = established()
        [effect] = [e for e in a.receive_data(buf) if isinstance(e, PDataIndication)]
        buf[:] = b"\xff" * len(buf)
        self.assertEqual(bytes(effect.pdu.pdvs[0].data), payloads[0])

    def test_the_declared_length_is_judged_before_the_body_arrives(self):
        a = established(max_pdu=16384)
        header = struct.pack(">BxL", 0x04, 10 << 20)
        effects = a.receive_data(header[:3])
        self.assertEqual(effects, [])
        self.assertTrue(a.partial_pdu)
        effects = a.receive_data(header[3:])  # the header is complete: refused now
        self.assertTrue(any(isinstance(e, AbortIndication) for e in effects))
        self.assertFalse(a.partial_pdu)
