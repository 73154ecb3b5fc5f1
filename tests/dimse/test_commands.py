"""Tests for gateway.dimse.commands: command set codec and builders.

Reference encodings come from pynetdicom / pydicom (test-only dependencies):
the gateway must produce byte-identical command sets and read theirs.
"""

from __future__ import annotations

import io
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import dimse_messages, dimse_primitives
from pynetdicom.dsutils import encode as pn_encode
from twisted.trial import unittest

from gateway.dimse import commands as c
from gateway.dimse.commands import (
    MAX_COMMAND_LENGTH,
    Command,
    DIMSEError,
    decode_command,
    encode_command,
)
from gateway.dimse.sop import VERIFICATION

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def pynetdicom_bytes(message_class, primitive) -> bytes:
    """Encode a DIMSE primitive the way pynetdicom puts it on the wire."""
    message = message_class()
    message.primitive_to_message(primitive)
    return pn_encode(message.command_set, True, True)


def pydicom_bytes(**elements) -> bytes:
    """Encode group 0000 keywords with pydicom, Implicit VR LE, with group length."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)

    def write(dataset: Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = True
        write_dataset(fp, dataset)
        return fp.getvalue()

    body = write(ds)
    ds.CommandGroupLength = len(body)
    return write(ds)


def element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def us(tag: int, value: int) -> bytes:
    return element(tag, struct.pack("<H", value))


def with_group_length(body: bytes) -> bytes:
    return element(0x00000000, struct.pack("<I", len(body))) + body


class PynetdicomCompatibilityTests(unittest.TestCase):
    """Byte-exact agreement with a widely deployed implementation."""

    def test_c_echo_rq_bytes(self):
        p = dimse_primitives.C_ECHO()
        p.MessageID = 7
        p.AffectedSOPClassUID = VERIFICATION
        expected = pynetdicom_bytes(dimse_messages.C_ECHO_RQ, p)
        self.assertEqual(encode_command(c.c_echo_rq(7)), expected)

    def test_c_echo_rsp_bytes(self):
        p = dimse_primitives.C_ECHO()
        p.MessageIDBeingRespondedTo = 7
        p.AffectedSOPClassUID = VERIFICATION
        p.Status = 0x0000
        expected = pynetdicom_bytes(dimse_messages.C_ECHO_RSP, p)
        request = decode_command(encode_command(c.c_echo_rq(7)))
        self.assertEqual(encode_command(c.c_echo_rsp(request, c.SUCCESS)), expected)

    def test_c_store_rq_bytes(self):
        p = dimse_primitives.C_STORE()
        p.MessageID = 3
        p.AffectedSOPClassUID = CT
        p.AffectedSOPInstanceUID = "1.2.3.4.5"  # odd length: NUL padded
        p.Priority = 0
        p.DataSet = io.BytesIO(b"\x00" * 4)
        expected = pynetdicom_bytes(dimse_messages.C_STORE_RQ, p)
        self.assertEqual(encode_command(c.c_store_rq(3, CT, "1.2.3.4.5")), expected)

    def test_c_store_rq_with_move_originator_bytes(self):
        p = dimse_primitives.C_STORE()
        p.MessageID = 65535
        p.AffectedSOPClassUID = CT
        p.AffectedSOPInstanceUID = "1.2.3.4.56"
        p.Priority = 2
        p.MoveOriginatorApplicationEntityTitle = "MOVESCU"  # odd: space padded
        p.MoveOriginatorMessageID = 12
        p.DataSet = io.BytesIO(b"\x00" * 4)
        expected = pynetdicom_bytes(dimse_messages.C_STORE_RQ, p)
        cmd = c.c_store_rq(
            65535, CT, "1.2.3.4.56", priority=2,
            move_originator_ae="MOVESCU", move_originator_message_id=12,
        )
        self.assertEqual(encode_command(cmd), expected)

    def test_c_store_rsp_bytes(self):
        p = dimse_primitives.C_STORE()
        p.MessageIDBeingRespondedTo = 3
        p.AffectedSOPClassUID = CT
        p.AffectedSOPInstanceUID = "1.2.3.4.5"
        p.Status = c.OUT_OF_RESOURCES
        expected = pynetdicom_bytes(dimse_messages.C_STORE_RSP, p)
        request = c.c_store_rq(3, CT, "1.2.3.4.5")
        self.assertEqual(encode_command(c.c_store_rsp(request, c.OUT_OF_RESOURCES)), expected)

    def test_c_store_rsp_with_error_comment_bytes(self):
        expected = pydicom_bytes(
            AffectedSOPClassUID=CT,
            CommandField=0x8001,
            MessageIDBeingRespondedTo=3,
            CommandDataSetType=0x0101,
            Status=0xC000,
            ErrorComment="bad data",
            AffectedSOPInstanceUID="1.2.3.4.5",
        )
        request = c.c_store_rq(3, CT, "1.2.3.4.5")
        rsp = c.c_store_rsp(request, c.CANNOT_UNDERSTAND, error_comment="bad data")
        self.assertEqual(encode_command(rsp), expected)

    def test_decode_pynetdicom_c_store_rq(self):
        p = dimse_primitives.C_STORE()
        p.MessageID = 9
        p.AffectedSOPClassUID = CT
        p.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.2.1125.1"
        p.Priority = 1
        p.MoveOriginatorApplicationEntityTitle = "ORIGIN"
        p.MoveOriginatorMessageID = 4
        p.DataSet = io.BytesIO(b"\x00" * 4)
        cmd = decode_command(pynetdicom_bytes(dimse_messages.C_STORE_RQ, p))
        self.assertEqual(cmd.command_field, c.C_STORE_RQ)
        self.assertEqual(cmd.message_id, 9)
        self.assertEqual(cmd.affected_sop_class_uid, CT)
        self.assertEqual(cmd.affected_sop_instance_uid, "1.2.826.0.1.3680043.2.1125.1")
        self.assertEqual(cmd.priority, c.PRIORITY_HIGH)
        self.assertEqual(cmd.move_originator_ae, "ORIGIN")
        self.assertEqual(cmd.move_originator_message_id, 4)
        self.assertTrue(cmd.has_dataset)
        self.assertEqual(cmd.extra, ())
        self.assertEqual(cmd.name, "C-STORE-RQ")

    def test_decode_pynetdicom_c_echo_rq(self):
        p = dimse_primitives.C_ECHO()
        p.MessageID = 1
        p.AffectedSOPClassUID = VERIFICATION
        cmd = decode_command(pynetdicom_bytes(dimse_messages.C_ECHO_RQ, p))
        self.assertEqual(cmd, c.c_echo_rq(1))
        self.assertFalse(cmd.has_dataset)

    def test_decode_pynetdicom_c_store_rsp_with_offending_element(self):
        p = dimse_primitives.C_STORE()
        p.MessageIDBeingRespondedTo = 3
        p.AffectedSOPClassUID = CT
        p.AffectedSOPInstanceUID = "1.2.3"
        p.Status = c.DATASET_DOES_NOT_MATCH_SOP_CLASS
        p.OffendingElement = [0x00100010, 0x7FE00010]
        p.ErrorComment = "Missing pixel data"
        cmd = decode_command(pynetdicom_bytes(dimse_messages.C_STORE_RSP, p))
        self.assertEqual(cmd.command_field, c.C_STORE_RSP)
        self.assertEqual(cmd.status, 0xA900)
        self.assertEqual(cmd.offending_element, (0x00100010, 0x7FE00010))
        self.assertEqual(cmd.error_comment, "Missing pixel data")
        self.assertTrue(cmd.is_response)

    def test_decode_c_move_rq_keeps_unknown_elements(self):
        p = dimse_primitives.C_MOVE()
        p.MessageID = 5
        p.AffectedSOPClassUID = STUDY_ROOT_MOVE
        p.Priority = 0
        p.MoveDestination = "DEST"
        p.Identifier = io.BytesIO(b"\x00" * 4)
        wire = pynetdicom_bytes(dimse_messages.C_MOVE_RQ, p)
        cmd = decode_command(wire)
        self.assertEqual(cmd.command_field, c.C_MOVE_RQ)
        self.assertEqual(cmd.extra, ((0x00000600, b"DEST"),))
        # Unknown elements survive a re-encode unchanged.
        self.assertEqual(encode_command(cmd), wire)

    def test_decode_c_move_rsp_counts_in_extra(self):
        wire = pydicom_bytes(
            AffectedSOPClassUID=STUDY_ROOT_MOVE,
            CommandField=0x8021,
            MessageIDBeingRespondedTo=5,
            CommandDataSetType=0x0101,
            Status=0xFF00,
            NumberOfRemainingSuboperations=3,
            NumberOfCompletedSuboperations=2,
        )
        cmd = decode_command(wire)
        self.assertEqual(
            cmd.extra, ((0x00001020, b"\x03\x00"), (0x00001021, b"\x02\x00"))
        )
        self.assertEqual(encode_command(cmd), wire)

    def test_decode_n_action_rq(self):
        wire = pydicom_bytes(
            CommandField=0x0130,
            MessageID=2,
            RequestedSOPClassUID=STORAGE_COMMITMENT,
            RequestedSOPInstanceUID="1.2.840.10008.1.20.1.1",
            CommandDataSetType=0x0001,
            ActionTypeID=1,
        )
        cmd = decode_command(wire)
        self.assertEqual(cmd.requested_sop_class_uid, STORAGE_COMMITMENT)
        self.assertEqual(cmd.requested_sop_instance_uid, "1.2.840.10008.1.20.1.1")
        self.assertEqual(cmd.sop_class_uid, STORAGE_COMMITMENT)
        self.assertEqual(cmd.extra, ((0x00001008, b"\x01\x00"),))
        self.assertEqual(encode_command(cmd), wire)


class EncodeTests(unittest.TestCase):
    def test_group_length_and_order(self):
        wire = encode_command(c.c_store_rq(1, CT, "1.2.3"))
        self.assertEqual(wire[:8], b"\x00\x00\x00\x00\x04\x00\x00\x00")
        self.assertEqual(struct.unpack_from("<I", wire, 8)[0], len(wire) - 12)
        tags, pos = [], 0
        while pos < len(wire):
            group, elem, length = struct.unpack_from("<HHI", wire, pos)
            tags.append((group << 16) | elem)
            pos += 8 + length
            self.assertEqual(length % 2, 0)
        self.assertEqual(tags, sorted(tags))

    def test_padding(self):
        cmd = Command(
            command_field=c.C_STORE_RSP,
            message_id_being_responded_to=1,
            affected_sop_class_uid="1.2.3",  # UI: NUL
            error_comment="odd",  # LO: space
            move_originator_ae="AET",  # AE: space
        )
        wire = encode_command(cmd)
        self.assertIn(b"1.2.3\x00", wire)
        self.assertIn(b"odd ", wire)
        self.assertIn(b"AET ", wire)

    def test_extra_is_sorted_among_fields(self):
        cmd = Command(
            command_field=c.C_MOVE_RQ,
            message_id=1,
            extra=((0x00000600, b"DEST"),),
            priority=0,
        )
        wire = encode_command(cmd)
        self.assertLess(wire.index(b"\x00\x00\x00\x07"), wire.index(b"\x00\x00\x00\x08"))
        self.assertLess(wire.index(b"\x00\x00\x00\x06"), wire.index(b"\x00\x00\x00\x07"))

    def test_odd_extra_value_is_padded(self):
        cmd = Command(command_field=c.C_ECHO_RQ, message_id=1, extra=((0x00000600, b"ABC"),))
        self.assertEqual(decode_command(encode_command(cmd)).extra, ((0x00000600, b"ABC\x00"),))

    def test_invalid_values_refused(self):
        bad = [
            Command(command_field=0x10000),
            Command(command_field=-1),
            Command(command_field=c.C_ECHO_RQ, message_id=True),
            Command(command_field=c.C_ECHO_RQ, affected_sop_class_uid="1.2.é"),
            Command(command_field=c.C_ECHO_RQ, move_originator_ae="ÄE"),
            Command(command_field=c.C_ECHO_RQ, offending_element=(0x1_0000_0000,)),
            Command(command_field=c.C_ECHO_RQ, extra=((0x00010000, b""),)),
            Command(command_field=c.C_ECHO_RQ, extra=((0x00000000, b"\0\0\0\0"),)),
            Command(command_field=c.C_ECHO_RQ, extra=((0x00000100, b"\0\0"),)),
            Command(command_field=c.C_ECHO_RQ, extra=((0x00000600, b""), (0x00000600, b""))),
            Command(command_field=c.C_ECHO_RQ, extra=((0x00005000, b"x" * MAX_COMMAND_LENGTH),)),
        ]
        for cmd in bad:
            self.assertRaises(DIMSEError, encode_command, cmd)

    def test_dimse_error_is_value_error(self):
        self.assertTrue(issubclass(DIMSEError, ValueError))


class BuilderTests(unittest.TestCase):
    def test_c_echo(self):
        rq = c.c_echo_rq(42)
        self.assertEqual(rq.command_field, 0x0030)
        self.assertEqual(rq.affected_sop_class_uid, VERIFICATION)
        self.assertFalse(rq.has_dataset)
        rsp = c.c_echo_rsp(rq, c.SUCCESS)
        self.assertEqual(rsp.command_field, 0x8030)
        self.assertEqual(rsp.message_id_being_responded_to, 42)
        self.assertEqual(rsp.status, 0)
        self.assertIsNone(rsp.message_id)

    def test_c_store(self):
        rq = c.c_store_rq(3, CT, "1.2.3")
        self.assertEqual(rq.command_field, 0x0001)
        self.assertTrue(rq.has_dataset)
        self.assertEqual(rq.command_data_set_type, c.DATASET_PRESENT)
        self.assertEqual(rq.priority, 0)
        self.assertIsNone(rq.move_originator_ae)
        rsp = c.c_store_rsp(rq, c.SUCCESS)
        self.assertEqual(rsp.command_field, 0x8001)
        self.assertEqual(rsp.affected_sop_instance_uid, "1.2.3")
        self.assertEqual(rsp.affected_sop_class_uid, CT)
        self.assertFalse(rsp.has_dataset)
        self.assertIsNone(rsp.error_comment)

    def test_error_comment_sanitised(self):
        rq = c.c_store_rq(3, CT, "1.2.3")
        rsp = c.c_store_rsp(rq, c.OUT_OF_RESOURCES, error_comment="disk\nfull: é" + "x" * 100)
        self.assertEqual(len(rsp.error_comment), 64)
        self.assertTrue(rsp.error_comment.startswith("disk?full: ?"))
        encode_command(rsp)  # encodable

    def test_failure_response_for_every_request(self):
        requests = [
            Command(command_field=c.C_FIND_RQ, message_id=1,
                    affected_sop_class_uid=STUDY_ROOT_FIND, priority=0,
                    command_data_set_type=1),
            Command(command_field=c.C_MOVE_RQ, message_id=2,
                    affected_sop_class_uid=STUDY_ROOT_MOVE, priority=0,
                    command_data_set_type=1, extra=((0x00000600, b"DEST"),)),
            Command(command_field=c.C_GET_RQ, message_id=3,
                    affected_sop_class_uid=STUDY_ROOT_MOVE, command_data_set_type=1),
            Command(command_field=c.C_STORE_RQ, message_id=4,
                    affected_sop_class_uid=CT, affected_sop_instance_uid="1.2.3",
                    command_data_set_type=1),
            Command(command_field=c.C_ECHO_RQ, message_id=5,
                    affected_sop_class_uid=VERIFICATION),
            Command(command_field=c.N_ACTION_RQ, message_id=6,
                    requested_sop_class_uid=STORAGE_COMMITMENT,
                    requested_sop_instance_uid="1.2.840.10008.1.20.1.1",
                    command_data_set_type=1),
            Command(command_field=c.N_GET_RQ, message_id=7,
                    requested_sop_class_uid="1.2.840.10008.5.1.1.16",
                    requested_sop_instance_uid="1.2.840.10008.5.1.1.17"),
            Command(command_field=c.N_SET_RQ, message_id=8,
                    requested_sop_class_uid="1.2.3", requested_sop_instance_uid="1.2.3.4",
                    command_data_set_type=1),
            Command(command_field=c.N_CREATE_RQ, message_id=9,
                    affected_sop_class_uid="1.2.840.10008.3.1.2.3.3",
                    command_data_set_type=1),
            Command(command_field=c.N_DELETE_RQ, message_id=10,
                    requested_sop_class_uid="1.2.3", requested_sop_instance_uid="1.2.3.4"),
            Command(command_field=c.N_EVENT_REPORT_RQ, message_id=11,
                    affected_sop_class_uid="1.2.3", affected_sop_instance_uid="1.2.3.4",
                    command_data_set_type=1),
            Command(command_field=0x0042, message_id=12),  # unknown service
        ]
        for rq in requests:
            rsp = c.failure_response(rq, c.UNRECOGNIZED_OPERATION)
            self.assertEqual(rsp.command_field, rq.command_field | 0x8000)
            self.assertTrue(rsp.is_response)
            self.assertEqual(rsp.message_id_being_responded_to, rq.message_id)
            self.assertEqual(
                rsp.affected_sop_class_uid,
                rq.affected_sop_class_uid or rq.requested_sop_class_uid,
            )
            self.assertEqual(
                rsp.affected_sop_instance_uid,
                rq.affected_sop_instance_uid or rq.requested_sop_instance_uid,
            )
            self.assertEqual(rsp.status, 0x0211)
            self.assertFalse(rsp.has_dataset)
            self.assertEqual(decode_command(encode_command(rsp)), rsp)
        self.assertEqual(c.failure_response(requests[0]).status, c.UNRECOGNIZED_OPERATION)
        self.assertEqual(
            c.failure_response(requests[0], c.PROCESSING_FAILURE, "nope").error_comment, "nope"
        )

    def test_no_response_to_cancel_or_response(self):
        cancel = Command(command_field=c.C_CANCEL_RQ, message_id_being_responded_to=1)
        self.assertIsNone(c.failure_response(cancel, c.UNRECOGNIZED_OPERATION))
        rsp = c.c_echo_rsp(c.c_echo_rq(1))
        self.assertIsNone(c.failure_response(rsp, c.UNRECOGNIZED_OPERATION))

    def test_constants(self):
        self.assertEqual(
            (c.C_STORE_RQ, c.C_STORE_RSP, c.C_ECHO_RQ, c.C_ECHO_RSP, c.C_FIND_RQ,
             c.C_GET_RQ, c.C_MOVE_RQ, c.C_CANCEL_RQ),
            (0x0001, 0x8001, 0x0030, 0x8030, 0x0020, 0x0010, 0x0021, 0x0FFF),
        )
        self.assertEqual(
            (c.SUCCESS, c.OUT_OF_RESOURCES, c.DATASET_DOES_NOT_MATCH_SOP_CLASS,
             c.CANNOT_UNDERSTAND, c.SOP_CLASS_NOT_SUPPORTED, c.UNRECOGNIZED_OPERATION,
             c.MISTYPED_ARGUMENT, c.PROCESSING_FAILURE, c.DUPLICATE_INVOCATION),
            (0x0000, 0xA700, 0xA900, 0xC000, 0x0122, 0x0211, 0x0212, 0x0110, 0x0210),
        )

    def test_status_category(self):
        cases = {
            0x0000: "Success", 0xFF00: "Pending", 0xFF01: "Pending", 0xFE00: "Cancel",
            0xB000: "Warning", 0xB007: "Warning", 0x0001: "Warning", 0x0107: "Warning",
            0xA700: "Failure", 0xA900: "Failure", 0xC000: "Failure", 0x0211: "Failure",
            0x0122: "Failure", 0x1234: "Failure",
        }
        for status, category in cases.items():
            self.assertEqual(c.status_category(status), category, hex(status))


class DecodeTests(unittest.TestCase):
    def setUp(self):
        self.valid = encode_command(c.c_store_rq(3, CT, "1.2.3.4.5"))

    def assertRejected(self, data):
        self.assertRaises(DIMSEError, decode_command, data)

    def test_accepts_memoryview_and_bytearray(self):
        expected = decode_command(self.valid)
        self.assertEqual(decode_command(memoryview(self.valid)), expected)
        self.assertEqual(decode_command(bytearray(self.valid)), expected)
        padded = b"xx" + self.valid
        self.assertEqual(decode_command(memoryview(padded)[2:]), expected)

    def test_out_of_order_tolerated(self):
        body = us(0x00000800, 0x0101) + us(0x00000110, 1) + us(0x00000100, 0x0030)
        cmd = decode_command(with_group_length(body))
        self.assertEqual(cmd.command_field, c.C_ECHO_RQ)
        self.assertEqual(cmd.message_id, 1)

    def test_missing_group_length_tolerated(self):
        body = us(0x00000100, 0x0030) + us(0x00000110, 1) + us(0x00000800, 0x0101)
        self.assertEqual(decode_command(body).message_id, 1)

    def test_uid_padding_variants(self):
        for raw in (b"1.2.3\x00", b"1.2.3 ", b"1.2.3"):
            body = (
                element(0x00000002, raw) + us(0x00000100, 0x0030)
                + us(0x00000110, 1) + us(0x00000800, 0x0101)
            )
            self.assertEqual(decode_command(with_group_length(body)).affected_sop_class_uid,
                             "1.2.3")

    def test_empty(self):
        self.assertRejected(b"")

    def test_every_truncation_rejected(self):
        for n in range(len(self.valid)):
            self.assertRejected(self.valid[:n])

    def test_too_large_refused_before_parsing(self):
        self.assertRejected(b"\x00" * (MAX_COMMAND_LENGTH + 1))
        # Even a would-be valid one.
        big = Command(command_field=c.C_ECHO_RQ, message_id=1,
                      extra=((0x00005000, b"x" * (MAX_COMMAND_LENGTH - 50)),))
        wire = encode_command(big)
        self.assertEqual(len(wire), MAX_COMMAND_LENGTH)  # exactly at the cap: fine
        self.assertEqual(decode_command(wire), big)
        self.assertRejected(wire + us(0x00005001, 0))

    def test_non_group_0000(self):
        body = us(0x00000100, 0x0030) + us(0x00000110, 1) + us(0x00000800, 0x0101)
        self.assertRejected(with_group_length(body + us(0x00080016, 0)))
        self.assertRejected(with_group_length(body + us(0x00020000, 0)))

    def test_missing_command_field(self):
        self.assertRejected(with_group_length(us(0x00000110, 1) + us(0x00000800, 0x0101)))

    def test_missing_data_set_type(self):
        self.assertRejected(with_group_length(us(0x00000100, 0x0030) + us(0x00000110, 1)))

    def test_missing_message_ids(self):
        self.assertRejected(with_group_length(us(0x00000100, 0x0030) + us(0x00000800, 0x0101)))
        self.assertRejected(with_group_length(us(0x00000100, 0x8030) + us(0x00000800, 0x0101)))
        self.assertRejected(with_group_length(us(0x00000100, 0x0FFF) + us(0x00000800, 0x0101)))
        cancel = decode_command(with_group_length(
            us(0x00000100, 0x0FFF) + us(0x00000120, 4) + us(0x00000800, 0x0101)))
        self.assertEqual(cancel.message_id_being_responded_to, 4)

    def test_wrong_length_us_ul_at(self):
        base = us(0x00000110, 1) + us(0x00000800, 0x0101)
        self.assertRejected(with_group_length(element(0x00000100, b"\x30\x00\x00\x00") + base))
        self.assertRejected(with_group_length(element(0x00000100, b"\x30") + base))
        self.assertRejected(with_group_length(element(0x00000100, b"") + base))
        good = us(0x00000100, 0x8001) + us(0x00000120, 1) + us(0x00000800, 0x0101)
        self.assertRejected(with_group_length(good + element(0x00000901, b"\x10\x00\x10")))
        # Group length must be a 4-byte UL.
        self.assertRejected(element(0x00000000, b"\x00\x00") + good)

    def test_group_length_mismatch(self):
        body = us(0x00000100, 0x0030) + us(0x00000110, 1) + us(0x00000800, 0x0101)
        wire = element(0x00000000, struct.pack("<I", len(body) + 2)) + body
        self.assertRejected(wire)

    def test_duplicate_element(self):
        body = us(0x00000100, 0x0030) + us(0x00000110, 1) + us(0x00000800, 0x0101)
        self.assertRejected(with_group_length(body + us(0x00000110, 2)))
        # An element without a field of its own, twice, apart or together.
        self.assertRejected(with_group_length(us(0x00000600, 1) + body + us(0x00000600, 1)))
        self.assertRejected(with_group_length(body + element(0x00005000, b"") * 2))
        # The group length, twice.
        once = with_group_length(body)
        self.assertRejected(once[:12] + once)

    def test_non_ascii_uid_and_ae(self):
        base = us(0x00000100, 0x0030) + us(0x00000110, 1) + us(0x00000800, 0x0101)
        for raw in ("1.2.é".encode("utf-8"), b"1.2\x013\x00", b"\xff\xfe", b"\x001.2"):
            self.assertRejected(with_group_length(element(0x00000002, raw) + base))
            self.assertRejected(with_group_length(base + element(0x00001030, raw)))

    def test_error_comment_is_lenient(self):
        body = (us(0x00000100, 0x8001) + us(0x00000120, 1) + us(0x00000800, 0x0101)
                + element(0x00000902, b"bad \xff\x1b[0m\x00"))
        self.assertEqual(decode_command(with_group_length(body)).error_comment, "bad ??[0m")

    def test_length_beyond_data(self):
        body = us(0x00000100, 0x0030) + us(0x00000110, 1) + us(0x00000800, 0x0101)
        self.assertRejected(with_group_length(body) + struct.pack("<HHI", 0, 0x0002, 100) + b"1.")
        self.assertRejected(body + struct.pack("<HHI", 0, 0x0002, 0xFFFFFFFF))


# --- property tests -----------------------------------------------------------

uid_component = st.one_of(st.just("0"), st.integers(1, 10**12).map(str))
uids = st.lists(uid_component, min_size=1, max_size=8).map(".".join).filter(
    lambda u: len(u) <= 64
)
us_values = st.integers(0, 0xFFFF)
printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=16)
ae_titles = printable.filter(bool)
comments = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=64).map(
    str.strip
)
_field_tags = {0x0002, 0x0003, 0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900, 0x0901,
               0x0902, 0x1000, 0x1001, 0x1030, 0x1031}
extras = st.dictionaries(
    st.integers(1, 0xFFFF).filter(lambda t: t not in _field_tags),
    st.binary(max_size=20).map(lambda b: b + b"\x00" if len(b) % 2 else b),
    max_size=4,
).map(lambda d: tuple(sorted(d.items())))


@st.composite
def commands(draw):
    field = draw(st.sampled_from(sorted(c.COMMAND_NAMES)) | us_values)
    response = bool(field & 0x8000) or field == c.C_CANCEL_RQ
    opt = lambda s: draw(st.none() | s)  # noqa: E731
    return Command(
        command_field=field,
        message_id=opt(us_values) if response else draw(us_values),
        message_id_being_responded_to=draw(us_values) if response else opt(us_values),
        affected_sop_class_uid=opt(uids),
        requested_sop_class_uid=opt(uids),
        affected_sop_instance_uid=opt(uids),
        requested_sop_instance_uid=opt(uids),
        priority=opt(st.integers(0, 2)),
        command_data_set_type=draw(st.sampled_from([0x0101, 0x0001, 0x0000, 0xFEFE])),
        status=opt(us_values),
        error_comment=opt(comments),
        offending_element=opt(st.lists(st.integers(0, 0xFFFFFFFF), max_size=3).map(tuple)),
        move_originator_ae=opt(ae_titles),
        move_originator_message_id=opt(us_values),
        extra=draw(extras),
    )


def valid_wires():
    return commands().map(encode_command)


class PropertyTests(unittest.TestCase):
    @FUZZ
    @given(commands())
    def test_round_trip(self, cmd):
        wire = encode_command(cmd)
        self.assertEqual(decode_command(wire), cmd)
        self.assertEqual(len(wire) % 2, 0)

    @FUZZ
    @given(st.binary(max_size=512))
    def test_random_bytes_only_dimse_error(self, data):
        try:
            cmd = decode_command(data)
        except DIMSEError:
            return
        self.assertIsInstance(cmd, Command)

    @FUZZ
    @given(valid_wires(), st.data())
    def test_mutations_only_dimse_error(self, wire, data):
        mutated = bytearray(wire)
        for _ in range(data.draw(st.integers(1, 4))):
            op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
            pos = data.draw(st.integers(0, max(len(mutated) - 1, 0)))
            if op == "flip" and mutated:
                mutated[pos] ^= data.draw(st.integers(1, 255))
            elif op == "insert":
                mutated[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
            elif op == "delete" and mutated:
                del mutated[pos : pos + data.draw(st.integers(1, 8))]
            else:
                del mutated[pos:]
        try:
            cmd = decode_command(bytes(mutated))
        except DIMSEError:
            return
        # Whatever decodes must re-encode; after that one normalisation
        # (padding of odd values) encoding and decoding are a fixed point.
        normalised = decode_command(encode_command(cmd))
        self.assertEqual(decode_command(encode_command(normalised)), normalised)

    @FUZZ
    @given(valid_wires())
    def test_truncations_of_random_commands(self, wire):
        for n in range(0, len(wire), max(1, len(wire) // 16)):
            self.assertRaises(DIMSEError, decode_command, wire[:n])
