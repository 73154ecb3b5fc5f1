"""Tests for gateway.dimse.message: PDV reassembly and fragmentation."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from gateway.dimse import commands as c
from gateway.dimse.commands import MAX_COMMAND_LENGTH, DIMSEError, encode_command
from gateway.dimse.message import (
    UNLIMITED_FRAGMENT_SIZE,
    MessageAssembler,
    fragment_message,
    fragment_stream,
    pdv_data_limit,
)
from gateway.ul import P_DATA_TF, PDV, PDataTF, decode_pdu

CT = "1.2.840.10008.5.1.4.1.1.2"

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

COMMAND, LAST = 0x01, 0x02


def cmd_pdv(ctx, data, last=True):
    return PDV(ctx, COMMAND | (LAST if last else 0), data)


def data_pdv(ctx, data, last=True):
    return PDV(ctx, LAST if last else 0, data)


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def decode_pdata_pdu(pdu: bytes) -> PDV:
    """Decode one produced PDU, checking it holds exactly one PDV."""
    pdu_type, _reserved, length = struct.unpack_from(">BBI", pdu)
    assert pdu_type == P_DATA_TF, pdu_type
    assert length == len(pdu) - 6
    decoded = decode_pdu(pdu_type, memoryview(pdu)[6:])
    assert isinstance(decoded, PDataTF)
    assert len(decoded.pdvs) == 1
    return decoded.pdvs[0]


@dataclass(frozen=True)
class CommandReceived:
    context_id: int
    command: object


@dataclass(frozen=True)
class DataFragment:
    data: object
    last: bool


class Recorder:
    """The assembler's handler: what it was told, in order."""

    def __init__(self):
        self.events: list = []

    def command_received(self, command, context_id):
        self.events.append(CommandReceived(context_id, command))

    def data_received(self, data, last):
        self.events.append(DataFragment(data, last))

    def dimse_error(self, detail):
        self.events.append(DIMSEError(detail))


def assembler(contexts=None):
    """A MessageAssembler and a ``feed(pdv, pieces=1)`` that returns what
    the PDV caused, the PDV's data cut into ``pieces`` as the upper layer may
    stream them, and raises DIMSEError for an error the handler was told of."""
    recorder = Recorder()
    asm = MessageAssembler(recorder, contexts)

    def feed(pdv, pieces=1):
        start = len(recorder.events)
        data = pdv.data
        size = max(1, -(-len(data) // pieces))
        cuts = list(range(0, len(data), size)) or [0]
        for i, at in enumerate(cuts):
            asm.pdv(pdv.context_id, pdv.control, data[at:at + size] if pieces > 1 else data, i == len(cuts) - 1)
        new = recorder.events[start:]
        errors = [e for e in new if isinstance(e, DIMSEError)]
        if errors:
            raise errors[0]
        return new

    return asm, feed


STORE_RQ = encode_command(c.c_store_rq(7, CT, "1.2.3.4"))
ECHO_RQ = encode_command(c.c_echo_rq(1))


class AssemblerTests(unittest.TestCase):
    def setUp(self):
        self.asm, self.feed = assembler()

    def test_single_fragment_command_without_dataset(self):
        self.assertTrue(self.asm.idle)
        events = self.feed(cmd_pdv(1, ECHO_RQ))
        self.assertEqual(events, [CommandReceived(1, c.c_echo_rq(1))])
        self.assertTrue(self.asm.idle)
        self.assertFalse(self.asm.expecting_dataset)

    def test_multi_fragment_command(self):
        pieces = split(ECHO_RQ, 1)
        for piece in pieces[:-1]:
            self.assertEqual(self.feed(cmd_pdv(3, memoryview(piece), last=False)), [])
            self.assertFalse(self.asm.idle)
        events = self.feed(cmd_pdv(3, pieces[-1]))
        self.assertEqual(events, [CommandReceived(3, c.c_echo_rq(1))])

    def test_dataset_is_streamed_without_copy(self):
        [received] = self.feed(cmd_pdv(5, STORE_RQ))
        self.assertTrue(received.command.has_dataset)
        self.assertTrue(self.asm.expecting_dataset)
        buffers = [memoryview(b"abc"), memoryview(b"defg"), b"h"]
        for i, buf in enumerate(buffers):
            last = i == len(buffers) - 1
            [event] = self.feed(data_pdv(5, buf, last=last))
            self.assertIsInstance(event, DataFragment)
            self.assertIs(event.data, buf)
            self.assertEqual(event.last, last)
        self.assertTrue(self.asm.idle)

    def test_a_pdv_streamed_in_pieces_is_checked_once_and_passed_on_piece_by_piece(self):
        self.feed(cmd_pdv(5, STORE_RQ), pieces=7)
        events = self.feed(data_pdv(5, b"abcdefghij", last=True), pieces=4)
        self.assertEqual([bytes(e.data) for e in events], [b"abc", b"def", b"ghi", b"j"])
        self.assertEqual([e.last for e in events], [False, False, False, True])
        self.assertTrue(self.asm.idle)

    def test_consecutive_messages_on_different_contexts(self):
        self.feed(cmd_pdv(1, STORE_RQ))
        self.feed(data_pdv(1, b"x"))
        self.assertEqual(self.feed(cmd_pdv(3, ECHO_RQ))[0].context_id, 3)
        self.feed(cmd_pdv(7, STORE_RQ))
        self.assertEqual(self.feed(data_pdv(7, b"")), [DataFragment(b"", True)])

    def test_dataset_before_command(self):
        self.assertRaises(DIMSEError, self.feed, data_pdv(1, b"x"))

    def test_dataset_before_last_command_fragment(self):
        self.feed(cmd_pdv(1, STORE_RQ[:10], last=False))
        self.assertRaises(DIMSEError, self.feed, data_pdv(1, b"x"))

    def test_dataset_on_other_context(self):
        self.feed(cmd_pdv(1, STORE_RQ))
        self.assertRaises(DIMSEError, self.feed, data_pdv(3, b"x"))

    def test_dataset_context_change_mid_dataset(self):
        self.feed(cmd_pdv(1, STORE_RQ))
        self.feed(data_pdv(1, b"x", last=False))
        self.assertRaises(DIMSEError, self.feed, data_pdv(3, b"x"))

    def test_new_command_while_dataset_expected(self):
        self.feed(cmd_pdv(1, STORE_RQ))
        self.assertRaises(DIMSEError, self.feed, cmd_pdv(1, ECHO_RQ))

    def test_new_command_mid_dataset(self):
        self.feed(cmd_pdv(1, STORE_RQ))
        self.feed(data_pdv(1, b"x", last=False))
        self.assertRaises(DIMSEError, self.feed, cmd_pdv(1, ECHO_RQ))

    def test_dataset_when_command_said_none(self):
        self.feed(cmd_pdv(1, ECHO_RQ))
        self.assertRaises(DIMSEError, self.feed, data_pdv(1, b"x"))

    def test_dataset_after_complete_dataset(self):
        self.feed(cmd_pdv(1, STORE_RQ))
        self.feed(data_pdv(1, b"x"))
        self.assertRaises(DIMSEError, self.feed, data_pdv(1, b"y"))

    def test_command_fragments_switching_context(self):
        self.feed(cmd_pdv(1, ECHO_RQ[:20], last=False))
        self.assertRaises(DIMSEError, self.feed, cmd_pdv(3, ECHO_RQ[20:]))

    def test_undecodable_command(self):
        self.assertRaises(DIMSEError, self.feed, cmd_pdv(1, b"\x01\x02\x03"))

    def test_cap_checked_before_appending(self):
        chunk = b"\x00" * 4096
        for _ in range(MAX_COMMAND_LENGTH // len(chunk)):
            self.feed(cmd_pdv(1, chunk, last=False))
        self.assertEqual(len(self.asm._command), MAX_COMMAND_LENGTH)
        self.assertRaises(DIMSEError, self.feed, cmd_pdv(1, b"\x00", last=False))
        self.assertEqual(len(self.asm._command), MAX_COMMAND_LENGTH)

    def test_single_oversized_fragment(self):
        big = b"\x00" * (MAX_COMMAND_LENGTH + 1)
        self.assertRaises(DIMSEError, self.feed, cmd_pdv(1, big))
        self.assertEqual(len(self.asm._command), 0)

    def test_ignores_everything_after_failure(self):
        self.assertRaises(DIMSEError, self.feed, data_pdv(1, b"x"))
        self.assertEqual(self.feed(cmd_pdv(1, ECHO_RQ)), [])  # the error was told once


class NegotiatedContextTests(unittest.TestCase):
    def test_pdv_on_a_context_not_negotiated_breaks_the_association(self):
        contexts = {}
        asm, feed = assembler(contexts)
        contexts[1] = ("1.2.840.10008.1.1", "1.2.840.10008.1.2")  # filled in after creation
        echo = encode_command(c.c_echo_rq(1))
        [event] = feed(cmd_pdv(1, echo))
        self.assertEqual(event.command.command_field, c.C_ECHO_RQ)
        with self.assertRaises(DIMSEError) as cm:
            feed(cmd_pdv(3, echo))
        self.assertIn("context 3", str(cm.exception))
        self.assertEqual(feed(cmd_pdv(1, echo)), [])  # and nothing after


class FragmentMessageTests(unittest.TestCase):
    def reassemble(self, pdus, max_pdu_length):
        """Decode PDUs, check limits and control bits, and reassemble."""
        asm, feed = assembler()
        limit = pdv_data_limit(max_pdu_length)
        pdvs = [decode_pdata_pdu(pdu) for pdu in pdus]
        if max_pdu_length:
            for pdu in pdus:
                self.assertLessEqual(len(pdu) - 6, max_pdu_length)
        command_pdvs = [p for p in pdvs if p.is_command]
        data_pdvs = [p for p in pdvs if not p.is_command]
        # Commands first, then data; last bit only on the final one of each.
        self.assertEqual(pdvs, command_pdvs + data_pdvs)
        for group in (command_pdvs, data_pdvs):
            if group:
                self.assertEqual([p.is_last for p in group], [False] * (len(group) - 1) + [True])
                for p in group[:-1]:
                    self.assertEqual(len(p.data), limit)  # full fragments
                self.assertLessEqual(len(group[-1].data), limit)
        command, dataset = None, bytearray()
        for p in pdvs:
            for event in feed(p):
                if isinstance(event, CommandReceived):
                    command = event.command
                else:
                    dataset += event.data
        self.assertTrue(asm.idle)
        return command, (bytes(dataset) if data_pdvs else None)

    def test_command_only_various_limits(self):
        for max_len in (0, 7, 8, 16, 17, 100, len(ECHO_RQ) + 6, 16384):
            pdus = list(fragment_message(1, ECHO_RQ, max_len))
            command, dataset = self.reassemble(pdus, max_len)
            self.assertEqual(command, c.c_echo_rq(1))
            self.assertIsNone(dataset)
        self.assertEqual(len(list(fragment_message(1, ECHO_RQ, len(ECHO_RQ) + 6))), 1)
        self.assertEqual(len(list(fragment_message(1, ECHO_RQ, 7))), len(ECHO_RQ))

    def test_command_and_dataset(self):
        data = bytes(range(256)) * 40
        for max_len in (0, 7, 50, 1000, 4096, len(data) + 6, len(data) + 100):
            for dataset in (data, memoryview(data), bytearray(data)):
                pdus = list(fragment_message(9, STORE_RQ, max_len, dataset))
                command, got = self.reassemble(pdus, max_len)
                self.assertEqual(command.affected_sop_instance_uid, "1.2.3.4")
                self.assertEqual(got, data)

    def test_empty_dataset_gets_one_last_fragment(self):
        pdus = list(fragment_message(1, STORE_RQ, 16384, b""))
        command, got = self.reassemble(pdus, 16384)
        self.assertEqual(got, b"")
        self.assertEqual(decode_pdata_pdu(pdus[-1]).control, LAST)

    def test_context_id_everywhere(self):
        for pdu in fragment_message(255, STORE_RQ, 20, b"x" * 100):
            self.assertEqual(decode_pdata_pdu(pdu).context_id, 255)

    def test_unlimited_uses_one_mib_fragments(self):
        data = b"\x5a" * (2 * UNLIMITED_FRAGMENT_SIZE + 10)
        pdus = list(fragment_message(1, STORE_RQ, 0, data))
        self.assertEqual(len(pdus), 1 + 3)
        _, got = self.reassemble(pdus, 0)
        self.assertEqual(got, data)

    def test_limit_too_small(self):
        for bad in (1, 6):
            self.assertRaises(ValueError, lambda: list(fragment_message(1, ECHO_RQ, bad)))
        self.assertEqual(pdv_data_limit(7), 1)
        self.assertEqual(pdv_data_limit(16384), 16378)

    @FUZZ
    @given(st.binary(max_size=3000), st.integers(7, 600) | st.just(0))
    def test_property_round_trip(self, data, max_len):
        pdus = list(fragment_message(1, STORE_RQ, max_len, data))
        _, got = self.reassemble(pdus, max_len)
        self.assertEqual(got, data)


class FragmentStreamTests(unittest.TestCase):
    def collect(self, chunks, max_pdu_length):
        pdvs = [decode_pdata_pdu(p) for p in fragment_stream(3, chunks, max_pdu_length)]
        limit = pdv_data_limit(max_pdu_length)
        self.assertTrue(pdvs)
        for p in pdvs:
            self.assertFalse(p.is_command)
            self.assertEqual(p.context_id, 3)
        self.assertEqual([p.is_last for p in pdvs], [False] * (len(pdvs) - 1) + [True])
        for p in pdvs[:-1]:
            self.assertEqual(len(p.data), limit)
        self.assertLessEqual(len(pdvs[-1].data), limit)
        return pdvs, b"".join(bytes(p.data) for p in pdvs)

    def test_chunks_larger_and_smaller_than_limit(self):
        data = bytes(range(256)) * 20
        for chunk_size in (1, 3, 10, 64, 100, 1000, 5120, 9999):
            for max_len in (7, 16, 70, 106, 1030):
                _, got = self.collect(split(data, chunk_size), max_len)
                self.assertEqual(got, data)

    def test_exact_multiple_has_no_empty_trailer(self):
        pdvs, got = self.collect([b"a" * 100, b"b" * 100], 106)
        self.assertEqual(len(pdvs), 2)
        self.assertEqual(len(pdvs[-1].data), 100)

    def test_empty_chunks_skipped(self):
        pdvs, got = self.collect([b"", b"abc", b"", b"", b"de", b""], 10)
        self.assertEqual(got, b"abcde")
        self.assertEqual(len(pdvs), 2)

    def test_empty_stream(self):
        pdvs, got = self.collect([], 100)
        self.assertEqual(len(pdvs), 1)
        self.assertEqual(got, b"")
        pdvs, got = self.collect([b"", b""], 100)
        self.assertEqual(len(pdvs), 1)

    def test_chunk_buffer_may_be_reused(self):
        data = bytes(range(256)) * 9

        def reader(size):
            # readinto-style: the same buffer, overwritten for every chunk.
            buf = bytearray(size)
            view = memoryview(buf)
            for start in range(0, len(data), size):
                piece = data[start : start + size]
                buf[: len(piece)] = piece
                yield view[: len(piece)]
                buf[:] = b"\xee" * size  # scribble after use

        for size in (5, 50, 300, 1000):
            for max_len in (16, 106, 500):
                pdus = []
                for pdu in fragment_stream(3, reader(size), max_len):
                    pdus.append(bytes(pdu))
                got = b"".join(bytes(decode_pdata_pdu(p).data) for p in pdus)
                self.assertEqual(got, data)

    def test_chunk_buffer_may_be_resized(self):
        # A caller that reads into a bytearray it resizes must not hit
        # "BufferError: Existing exports" because we still hold a view.
        def reader():
            buf = bytearray()
            for piece in (b"abc", b"defghij", b"k"):
                buf.clear()
                buf.extend(piece)
                yield buf

        _, got = self.collect(reader(), 10)
        self.assertEqual(got, b"abcdefghijk")

    def test_non_byte_memoryview_chunks(self):
        import array

        chunk = array.array("H", [1, 2, 3])
        _, got = self.collect([memoryview(chunk), chunk], 10)
        self.assertEqual(got, chunk.tobytes() * 2)

    def test_unlimited(self):
        data = b"z" * (UNLIMITED_FRAGMENT_SIZE + 1)
        pdvs, got = self.collect(split(data, 65536), 0)
        self.assertEqual(got, data)
        self.assertEqual([len(p.data) for p in pdvs], [UNLIMITED_FRAGMENT_SIZE, 1])

    def test_is_lazy(self):
        pulled = []

        def chunks():
            for i in range(100):
                pulled.append(i)
                yield b"x" * 50

        stream = fragment_stream(3, chunks(), 106)
        next(stream)
        # One-chunk lookahead at most: nothing is read far ahead.
        self.assertLessEqual(len(pulled), 3)

    def test_agrees_with_assembler(self):
        asm, feed = assembler()
        feed(cmd_pdv(3, STORE_RQ))
        out = bytearray()
        for pdu in fragment_stream(3, [b"abc", b"defgh", b"ij"], 9):
            for event in feed(decode_pdata_pdu(pdu)):
                out += event.data
        self.assertEqual(out, b"abcdefghij")
        self.assertTrue(asm.idle)

    @FUZZ
    @given(
        st.lists(st.binary(max_size=300), max_size=20),
        st.integers(7, 400),
    )
    def test_property_any_chunking(self, chunks, max_len):
        _, got = self.collect(chunks, max_len)
        self.assertEqual(got, b"".join(chunks))
