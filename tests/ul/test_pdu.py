"""Tests for gateway.ul.pdu: encoding and decoding of the PS3.8 PDUs.

pynetdicom is used here only as an independent peer implementation to
cross-check the bytes on the wire.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from gateway.ul import _decode
from gateway.ul import (
    ABORT_INVALID_PDU_PARAMETER_VALUE,
    ABORT_UNEXPECTED_PDU_PARAMETER,
    ABORT_UNRECOGNIZED_PDU,
    DICOM_APPLICATION_CONTEXT,
    PDV,
    Abort,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    CommonExtendedNegotiation,
    ExtendedNegotiation,
    PDataTF,
    PDUError,
    PresentationContextAC,
    PresentationContextRQ,
    ReleaseRP,
    ReleaseRQ,
    RoleSelection,
    UnknownItem,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
    decode_pdu,
    encode_pdata,
    encode_pdu,
)

VERIFICATION = "1.2.840.10008.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
PROCEDURE_LOG = "1.2.840.10008.5.1.4.1.1.88.40"
STORAGE_SERVICE = "1.2.840.10008.4.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPL_UID = "1.2.826.0.1.3680043.9.1234.1"

HYPOTHESIS = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def roundtrip(pdu):
    raw = encode_pdu(pdu)
    return decode_pdu(raw[0], raw[6:])


def full_user_info_rq() -> UserInformation:
    return UserInformation(
        max_length=16384,
        implementation_class_uid=IMPL_UID,
        implementation_version_name="DICOMGW_01",
        async_ops=(3, 2),
        role_selections=(RoleSelection(CT_STORAGE, 1, 0), RoleSelection(VERIFICATION, 0, 1)),
        extended_negotiations=(ExtendedNegotiation(CT_STORAGE, b"\x01\x00\x01"),),
        common_extended_negotiations=(
            CommonExtendedNegotiation(PROCEDURE_LOG, STORAGE_SERVICE, (ENHANCED_SR, CT_STORAGE)),
            CommonExtendedNegotiation(CT_STORAGE, STORAGE_SERVICE),
        ),
        user_identity=UserIdentityRQ(2, True, b"user", b"secret"),
        unknown=(UnknownItem(0x60, b"\x01\x02\x03"), UnknownItem(0x5A, b"")),
    )


def sample_rq() -> AssociateRQ:
    return AssociateRQ(
        called_ae="STORESCP",
        calling_ae="GATEWAY",
        presentation_contexts=(
            PresentationContextRQ(1, VERIFICATION, (IMPLICIT_LE,)),
            PresentationContextRQ(3, CT_STORAGE, (EXPLICIT_LE, IMPLICIT_LE)),
        ),
        user_information=full_user_info_rq(),
    )


def sample_ac() -> AssociateAC:
    return AssociateAC(
        called_ae="STORESCP",
        calling_ae="GATEWAY",
        presentation_contexts=(
            PresentationContextAC(1, 0, IMPLICIT_LE),
            PresentationContextAC(3, 4, ""),
            PresentationContextAC(5, 3, IMPLICIT_LE),
        ),
        user_information=UserInformation(
            max_length=0,
            implementation_class_uid=IMPL_UID,
            implementation_version_name="SCP_1",
            async_ops=(1, 1),
            role_selections=(RoleSelection(CT_STORAGE, 1, 1),),
            extended_negotiations=(ExtendedNegotiation(CT_STORAGE, b""),),
            user_identity=UserIdentityAC(b"token"),
        ),
    )


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def assoc_body(items: bytes, version: int = 1) -> bytes:
    """An A-ASSOCIATE-RQ/AC body with the given variable items."""
    return struct.pack(">H2x16s16s32x", version, b"CALLED".ljust(16), b"CALLING".ljust(16)) + items


APP_CTX_ITEM = item(0x10, DICOM_APPLICATION_CONTEXT.encode())
PC_RQ_ITEM = item(
    0x20, b"\x01\x00\x00\x00" + item(0x30, VERIFICATION.encode()) + item(0x40, IMPLICIT_LE.encode())
)
PC_AC_ITEM = item(0x21, b"\x01\x00\x00\x00" + item(0x40, IMPLICIT_LE.encode()))
ONE_RQ_CONTEXT = (PresentationContextRQ(1, VERIFICATION, (IMPLICIT_LE,)),)
ONE_AC_CONTEXT = (PresentationContextAC(1, 0, IMPLICIT_LE),)


class DecodeErrorMixin:
    def assertPDUError(self, pdu_type, body, reason=ABORT_INVALID_PDU_PARAMETER_VALUE):
        with self.assertRaises(PDUError) as cm:
            _decode._decode_strict(pdu_type, body)
        self.assertEqual(cm.exception.reason, reason, str(cm.exception))
        # the public entry point agrees
        with self.assertRaises(PDUError):
            decode_pdu(pdu_type, body)
        return cm.exception


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


class RoundTripTests(unittest.TestCase):
    def check(self, pdu):
        self.assertEqual(roundtrip(pdu), pdu)

    def test_associate_rq_full(self):
        self.check(sample_rq())

    def test_associate_rq_minimal(self):
        self.check(AssociateRQ("A", "B", ONE_RQ_CONTEXT))

    def test_associate_rq_protocol_version_kept_raw(self):
        pdu = AssociateRQ("A", "B", ONE_RQ_CONTEXT, protocol_version=0x8003)
        self.assertEqual(roundtrip(pdu).protocol_version, 0x8003)

    def test_associate_ac_full(self):
        self.check(sample_ac())

    def test_associate_ac_identity_empty_response(self):
        self.check(AssociateAC("A", "B", ONE_AC_CONTEXT, UserInformation(user_identity=UserIdentityAC(b""))))

    def test_each_user_information_field_alone(self):
        variants = [
            UserInformation(max_length=0),
            UserInformation(max_length=0xFFFFFFFF),
            UserInformation(implementation_class_uid=IMPL_UID),
            UserInformation(implementation_version_name="X"),
            UserInformation(async_ops=(0, 65535)),
            UserInformation(role_selections=(RoleSelection(CT_STORAGE, 0, 0),)),
            UserInformation(extended_negotiations=(ExtendedNegotiation(CT_STORAGE, b"\xff" * 10),)),
            UserInformation(
                common_extended_negotiations=(
                    CommonExtendedNegotiation(PROCEDURE_LOG, STORAGE_SERVICE, (ENHANCED_SR,)),
                )
            ),
            UserInformation(user_identity=UserIdentityRQ(1, False, b"alice")),
            UserInformation(user_identity=UserIdentityRQ(5, True, b"jwt" * 100, b"")),
            UserInformation(user_identity=UserIdentityAC(b"ok")),
            UserInformation(unknown=(UnknownItem(0x99, b"abc"),)),
        ]
        for ui in variants:
            self.check(AssociateRQ("CALLED", "CALLING", ONE_RQ_CONTEXT, ui))
            self.check(AssociateAC("CALLED", "CALLING", ONE_AC_CONTEXT, ui))

    def test_associate_rj(self):
        self.check(AssociateRJ(1, 1, 7))
        self.check(AssociateRJ(2, 3, 1))

    def test_release_and_abort(self):
        self.check(ReleaseRQ())
        self.check(ReleaseRP())
        self.check(Abort(0, 0))
        self.check(Abort(2, 6))

    def test_pdata_multiple_pdvs(self):
        pdu = PDataTF(
            (PDV(1, 0x03, b"\x00\x01command"), PDV(3, 0x00, b""), PDV(255, 0x02, b"x" * 1000))
        )
        self.check(pdu)

    def test_encode_pdata_matches_encode_pdu(self):
        for data in (b"", b"abc", memoryview(b"\x00" * 70000)):
            self.assertEqual(
                encode_pdata(7, 2, data), encode_pdu(PDataTF((PDV(7, 2, bytes(data)),)))
            )

    def test_encode_pdata_layout(self):
        raw = encode_pdata(1, 3, b"hello")
        self.assertEqual(raw, b"\x04\x00\x00\x00\x00\x0b\x00\x00\x00\x07\x01\x03hello")
        self.assertEqual(len(raw), 12 + 5)

    def test_pdv_data_is_zero_copy_memoryview(self):
        body = encode_pdata(1, 3, b"payload")[6:]
        pdu = decode_pdu(4, body)
        pdv = pdu.pdvs[0]
        self.assertIsInstance(pdv.data, memoryview)
        self.assertIs(pdv.data.obj, body)
        self.assertEqual(pdv.data, b"payload")
        self.assertEqual(pdv, PDV(1, 3, b"payload"))
        self.assertTrue(pdv.is_command)
        self.assertTrue(pdv.is_last)

    def test_decode_accepts_bytearray_and_memoryview(self):
        raw = encode_pdu(sample_rq())
        for body in (bytearray(raw[6:]), memoryview(raw)[6:]):
            self.assertEqual(decode_pdu(1, body), sample_rq())
        raw = encode_pdata(3, 0, b"abc")
        self.assertEqual(decode_pdu(4, bytearray(raw[6:])).pdvs[0].data, b"abc")

    def test_user_info_sub_items_order(self):
        # Known sub-items in ascending item-type order (PS3.8 9.3.2.3 note),
        # then the unknown ones in their original order.
        raw = encode_pdu(sample_rq())
        ui_start = raw.index(b"\x50\x00", 74)
        types = []
        off = ui_start + 4
        while off < len(raw):
            types.append(raw[off])
            off += 4 + struct.unpack_from(">H", raw, off + 2)[0]
        self.assertEqual(off, len(raw))
        self.assertEqual(types[-2:], [0x60, 0x5A])
        self.assertEqual(types[:-2], sorted(types[:-2]))


# ---------------------------------------------------------------------------
# Field-level behaviour
# ---------------------------------------------------------------------------


class FieldTests(DecodeErrorMixin, unittest.TestCase):
    def test_ae_title_padding_stripped(self):
        body = bytearray(assoc_body(APP_CTX_ITEM + PC_RQ_ITEM))
        body[4:20] = b"  PADDED\x00\x00    ".ljust(16, b"\x00")
        body[20:36] = b"\xe9TE           ".ljust(16)
        pdu = decode_pdu(1, bytes(body))
        self.assertEqual(pdu.called_ae, "PADDED")
        self.assertEqual(pdu.calling_ae, "\xe9TE")

    def test_ae_title_encode_padded_with_spaces(self):
        raw = encode_pdu(AssociateRQ("AB", "C", ()))
        self.assertEqual(raw[10:26], b"AB" + b" " * 14)
        self.assertEqual(raw[26:42], b"C" + b" " * 15)

    def test_ae_title_encode_errors(self):
        self.assertRaises(ValueError, encode_pdu, AssociateRQ("A" * 17, "B", ()))
        self.assertRaises(ValueError, encode_pdu, AssociateRQ("A", "\xe9", ()))
        self.assertRaises(ValueError, encode_pdu, AssociateAC("A" * 17, "B", ()))

    def test_encode_value_errors(self):
        self.assertRaises(
            ValueError, encode_pdu, AssociateRQ("A", "B", (), application_context="\xe9")
        )
        self.assertRaises(
            ValueError,
            encode_pdu,
            AssociateRQ("A", "B", (PresentationContextRQ(256, "1", ("1",)),)),
        )
        big = UserInformation(unknown=(UnknownItem(0x60, b"x" * 70000),))
        self.assertRaises(ValueError, encode_pdu, AssociateRQ("A", "B", (), big))
        self.assertRaises(ValueError, encode_pdu, Abort(256, 0))
        self.assertRaises(ValueError, encode_pdata, 256, 0, b"")
        self.assertRaises(TypeError, encode_pdu, object())

    def test_uid_padding_stripped(self):
        items = item(0x10, b"1.2.840.10008.3.1.1.1\x00") + item(
            0x20, b"\x01\x00\x00\x00" + item(0x30, b"1.2.3 ") + item(0x40, b"1.2.840.10008.1.2\x00")
        )
        pdu = decode_pdu(1, assoc_body(items))
        self.assertEqual(pdu.application_context, DICOM_APPLICATION_CONTEXT)
        self.assertEqual(
            pdu.presentation_contexts[0], PresentationContextRQ(1, "1.2.3", (IMPLICIT_LE,))
        )

    def test_non_ascii_uid(self):
        items = item(0x10, b"1.2.\xff")
        self.assertPDUError(1, assoc_body(items))
        ui = item(0x50, item(0x52, b"1.2.\x80"))
        self.assertPDUError(1, assoc_body(APP_CTX_ITEM + PC_RQ_ITEM + ui))
        ui = item(0x50, item(0x55, "n\xe9".encode("latin-1")))
        self.assertPDUError(1, assoc_body(APP_CTX_ITEM + PC_RQ_ITEM + ui))

    def test_reserved_fields_not_tested(self):
        ui = item(0x50, item(0x51, b"\0\0\x40\0"))
        body = bytearray(assoc_body(APP_CTX_ITEM + PC_RQ_ITEM + ui))
        body[2:4] = b"\xff\xff"  # reserved after protocol version
        body[36:68] = b"\xff" * 32
        body[68 + 1] = 0xFF  # reserved byte of the application context item
        pc = 68 + len(APP_CTX_ITEM)
        body[pc + 1] = 0xFF
        body[pc + 5 : pc + 8] = b"\xff\xff\xff"
        pdu = decode_pdu(1, bytes(body))
        self.assertEqual(pdu.presentation_contexts[0].id, 1)
        self.assertEqual(pdu.user_information.max_length, 0x4000)
        self.assertEqual(decode_pdu(3, b"\xff\x01\x02\x03"), AssociateRJ(1, 2, 3))
        self.assertEqual(decode_pdu(7, b"\xff\xff\x02\x06"), Abort(2, 6))
        self.assertEqual(decode_pdu(5, b"\xff" * 4), ReleaseRQ())
        self.assertEqual(decode_pdu(6, b"\xff" * 4), ReleaseRP())

    def test_max_length_zero_kept(self):
        ui = item(0x50, item(0x51, b"\0\0\0\0"))
        pdu = decode_pdu(1, assoc_body(APP_CTX_ITEM + PC_RQ_ITEM + ui))
        self.assertEqual(pdu.user_information.max_length, 0)

    def test_presentation_contexts_one_at_least_each_id_once(self):
        self.assertPDUError(1, assoc_body(APP_CTX_ITEM))
        self.assertPDUError(2, assoc_body(APP_CTX_ITEM))
        # Two contexts with id 1 (the second proposing MR in another syntax):
        # they could not be told apart on the wire.
        second = item(0x20, b"\x01\x00\x00\x00" + item(0x30, b"1.2.840.10008.5.1.4.1.1.4")
                      + item(0x40, b"1.2.840.10008.1.2.1"))
        with self.assertRaises(PDUError) as cm:
            _decode._decode_strict(1, assoc_body(APP_CTX_ITEM + PC_RQ_ITEM + second))
        self.assertIn("presentation context id 1 appears twice", str(cm.exception))
        self.assertPDUError(2, assoc_body(APP_CTX_ITEM + PC_AC_ITEM + PC_AC_ITEM))

    def test_user_information_absent(self):
        pdu = decode_pdu(1, assoc_body(APP_CTX_ITEM + PC_RQ_ITEM))
        self.assertEqual(pdu.user_information, UserInformation())

    def test_unknown_items_skipped(self):
        # PS3.8 9.3.1: items of unrecognized types are ignored and skipped,
        # at PDU level and inside presentation contexts.
        pc = item(
            0x20,
            b"\x01\x00\x00\x00"
            + item(0x31, b"junk")
            + item(0x30, VERIFICATION.encode())
            + item(0x40, IMPLICIT_LE.encode()),
        )
        body = assoc_body(item(0x60, b"??") + APP_CTX_ITEM + pc + item(0xFF, b""))
        pdu = decode_pdu(1, body)
        self.assertEqual(
            pdu.presentation_contexts, (PresentationContextRQ(1, VERIFICATION, (IMPLICIT_LE,)),)
        )

    def test_unknown_user_info_sub_items_kept(self):
        ui = item(0x50, item(0x51, b"\0\0\x10\0") + item(0x5F, b"\x01\x02") + item(0x00, b""))
        info = decode_pdu(2, assoc_body(APP_CTX_ITEM + PC_AC_ITEM + ui)).user_information
        self.assertEqual(info.unknown, (UnknownItem(0x5F, b"\x01\x02"), UnknownItem(0, b"")))
        self.assertEqual(info.max_length, 0x1000)

    def test_rejected_context_transfer_syntax_not_tested(self):
        # Table 9-18: not significant unless accepted, may even be missing.
        pcs = (
            item(0x21, b"\x01\x00\x03\x00")
            + item(0x21, b"\x03\x00\x04\x00" + item(0x40, b"\xff\xfe"))
            + item(0x21, b"\x05\x00\x01\x00" + item(0x40, b""))
        )
        pdu = decode_pdu(2, assoc_body(APP_CTX_ITEM + pcs))
        self.assertEqual(
            pdu.presentation_contexts,
            (
                PresentationContextAC(1, 3, ""),
                PresentationContextAC(3, 4, ""),
                PresentationContextAC(5, 1, ""),
            ),
        )

    def test_accepted_context_without_transfer_syntax(self):
        self.assertPDUError(2, assoc_body(APP_CTX_ITEM + item(0x21, b"\x01\x00\x00\x00")))

    def test_related_general_sop_classes_empty(self):
        value = struct.pack(">H", 3) + b"1.2" + struct.pack(">H", 3) + b"4.5" + b"\0\0"
        ui = item(0x50, item(0x57, value))
        info = decode_pdu(1, assoc_body(APP_CTX_ITEM + PC_RQ_ITEM + ui)).user_information
        self.assertEqual(
            info.common_extended_negotiations, (CommonExtendedNegotiation("1.2", "4.5"),)
        )


# ---------------------------------------------------------------------------
# Interoperability with an independent implementation
# ---------------------------------------------------------------------------


def _pynetdicom_user_info(rq: bool):
    from pynetdicom import pdu_primitives as prim

    items = []
    ml = prim.MaximumLengthNotification()
    ml.maximum_length_received = 16384 if rq else 0
    items.append(ml)
    ic = prim.ImplementationClassUIDNotification()
    ic.implementation_class_uid = IMPL_UID
    items.append(ic)
    ao = prim.AsynchronousOperationsWindowNegotiation()
    ao.maximum_number_operations_invoked = 3
    ao.maximum_number_operations_performed = 2
    items.append(ao)
    rs = prim.SCP_SCU_RoleSelectionNegotiation()
    rs.sop_class_uid = CT_STORAGE
    rs.scu_role = True
    rs.scp_role = False
    items.append(rs)
    iv = prim.ImplementationVersionNameNotification()
    iv.implementation_version_name = "DICOMGW_01"
    items.append(iv)
    en = prim.SOPClassExtendedNegotiation()
    en.sop_class_uid = CT_STORAGE
    en.service_class_application_information = b"\x01\x00\x01"
    items.append(en)
    if rq:
        ce = prim.SOPClassCommonExtendedNegotiation()
        ce.sop_class_uid = PROCEDURE_LOG
        ce.service_class_uid = STORAGE_SERVICE
        ce.related_general_sop_class_identification = [ENHANCED_SR, CT_STORAGE]
        items.append(ce)
    ui = prim.UserIdentityNegotiation()
    if rq:
        ui.user_identity_type = 2
        ui.positive_response_requested = True
        ui.primary_field = b"user"
        ui.secondary_field = b"secret"
    else:
        ui.server_response = b"token"
    items.append(ui)
    return items


def _our_user_info(rq: bool) -> UserInformation:
    return UserInformation(
        max_length=16384 if rq else 0,
        implementation_class_uid=IMPL_UID,
        implementation_version_name="DICOMGW_01",
        async_ops=(3, 2),
        role_selections=(RoleSelection(CT_STORAGE, 1, 0),),
        extended_negotiations=(ExtendedNegotiation(CT_STORAGE, b"\x01\x00\x01"),),
        common_extended_negotiations=(
            (CommonExtendedNegotiation(PROCEDURE_LOG, STORAGE_SERVICE, (ENHANCED_SR, CT_STORAGE)),)
            if rq
            else ()
        ),
        user_identity=(
            UserIdentityRQ(2, True, b"user", b"secret") if rq else UserIdentityAC(b"token")
        ),
    )


class PynetdicomInteropTests(unittest.TestCase):
    def _assoc_primitive(self, rq: bool):
        from pynetdicom.pdu_primitives import A_ASSOCIATE
        from pynetdicom.presentation import PresentationContext

        primitive = A_ASSOCIATE()
        primitive.application_context_name = DICOM_APPLICATION_CONTEXT
        primitive.called_ae_title = "STORESCP"
        primitive.calling_ae_title = "GATEWAY"
        primitive.user_information = _pynetdicom_user_info(rq)
        if rq:
            for cid, abstract, transfers in (
                (1, VERIFICATION, [IMPLICIT_LE]),
                (3, CT_STORAGE, [EXPLICIT_LE, IMPLICIT_LE]),
            ):
                pc = PresentationContext()
                pc.context_id = cid
                pc.abstract_syntax = abstract
                pc.transfer_syntax = transfers
                primitive.presentation_context_definition_list.append(pc)
        else:
            primitive.result = 0
            for cid, result, ts in ((1, 0, IMPLICIT_LE), (3, 3, EXPLICIT_LE)):
                pc = PresentationContext()
                pc.context_id = cid
                pc.abstract_syntax = CT_STORAGE
                pc.transfer_syntax = [ts]
                pc.result = result
                primitive.presentation_context_definition_results_list.append(pc)
        return primitive

    def our_rq(self) -> AssociateRQ:
        return AssociateRQ(
            "STORESCP",
            "GATEWAY",
            (
                PresentationContextRQ(1, VERIFICATION, (IMPLICIT_LE,)),
                PresentationContextRQ(3, CT_STORAGE, (EXPLICIT_LE, IMPLICIT_LE)),
            ),
            _our_user_info(True),
        )

    def our_ac(self) -> AssociateAC:
        return AssociateAC(
            "STORESCP",
            "GATEWAY",
            (PresentationContextAC(1, 0, IMPLICIT_LE), PresentationContextAC(3, 3, EXPLICIT_LE)),
            _our_user_info(False),
        )

    def test_associate_rq_bytes(self):
        from pynetdicom.pdu import A_ASSOCIATE_RQ

        theirs = A_ASSOCIATE_RQ(self._assoc_primitive(True)).encode()
        self.assertEqual(encode_pdu(self.our_rq()), theirs)
        self.assertEqual(decode_pdu(theirs[0], theirs[6:]), self.our_rq())

    def test_associate_rq_decoded_by_peer(self):
        from pynetdicom.pdu import A_ASSOCIATE_RQ

        peer = A_ASSOCIATE_RQ()
        peer.decode(encode_pdu(self.our_rq()))
        self.assertEqual(peer.called_ae_title, "STORESCP")
        self.assertEqual(peer.calling_ae_title, "GATEWAY")
        self.assertEqual(len(peer.presentation_context), 2)
        self.assertEqual(peer.presentation_context[1].abstract_syntax, CT_STORAGE)

    def test_associate_ac_bytes(self):
        from pynetdicom.pdu import A_ASSOCIATE_AC

        theirs = A_ASSOCIATE_AC(self._assoc_primitive(False)).encode()
        self.assertEqual(encode_pdu(self.our_ac()), theirs)
        self.assertEqual(decode_pdu(theirs[0], theirs[6:]), self.our_ac())

    def test_pdata_bytes(self):
        from pynetdicom.pdu import P_DATA_TF
        from pynetdicom.pdu_primitives import P_DATA

        primitive = P_DATA()
        primitive.presentation_data_value_list = [[1, b"\x03cmd"], [3, b"\x00" + b"d" * 300]]
        theirs = P_DATA_TF(primitive).encode()
        ours = PDataTF((PDV(1, 3, b"cmd"), PDV(3, 0, b"d" * 300)))
        self.assertEqual(encode_pdu(ours), theirs)
        self.assertEqual(decode_pdu(4, theirs[6:]), ours)

        single = P_DATA()
        single.presentation_data_value_list = [[5, b"\x02" + b"last"]]
        self.assertEqual(encode_pdata(5, 2, b"last"), P_DATA_TF(single).encode())

    def test_fixed_pdus_bytes(self):
        from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_RELEASE_RP, A_RELEASE_RQ

        rj = A_ASSOCIATE_RJ()
        rj.result, rj.source, rj.reason_diagnostic = 1, 1, 7
        self.assertEqual(encode_pdu(AssociateRJ(1, 1, 7)), rj.encode())
        ab = A_ABORT_RQ()
        ab.source, ab.reason_diagnostic = 2, 6
        self.assertEqual(encode_pdu(Abort(2, 6)), ab.encode())
        self.assertEqual(encode_pdu(ReleaseRQ()), A_RELEASE_RQ().encode())
        self.assertEqual(encode_pdu(ReleaseRP()), A_RELEASE_RP().encode())


# ---------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------


def item_boundaries(body: bytes, start: int) -> set[int]:
    """Offsets in ``body`` at which a top-level item ends."""
    ends = set()
    off = start
    while off < len(body):
        off += 4 + struct.unpack_from(">H", body, off + 2)[0]
        ends.add(off)
    return ends


class HostileInputTests(DecodeErrorMixin, unittest.TestCase):
    def test_unknown_pdu_type(self):
        for pdu_type in (0, 8, 0x20, 0xFF, -1, 1 << 40):
            self.assertPDUError(pdu_type, b"\0\0\0\0", ABORT_UNRECOGNIZED_PDU)

    def test_fixed_size_bodies(self):
        for pdu_type in (3, 5, 6, 7):
            for size in (0, 1, 2, 3, 5, 8, 100):
                self.assertPDUError(pdu_type, b"\0" * size)

    def _check_all_prefixes(self, pdu):
        raw = encode_pdu(pdu)
        body = raw[6:]
        self.assertEqual(decode_pdu(raw[0], body), pdu)
        # A prefix ending exactly on a top-level item boundary after the
        # application context and a first presentation context is itself a
        # well-formed (smaller) PDU: more contexts and the user information
        # are optional to the codec.  Every other prefix must be rejected.
        ok_lengths = {e for e in item_boundaries(body, 68) if e > 68 + len(APP_CTX_ITEM)}
        decoded_ok = set()
        for n in range(len(body)):
            try:
                _decode._decode_strict(raw[0], body[:n])
            except PDUError as exc:
                self.assertEqual(exc.reason, ABORT_INVALID_PDU_PARAMETER_VALUE, (n, str(exc)))
            else:
                decoded_ok.add(n)
        self.assertEqual(decoded_ok, ok_lengths - {len(body)})

    def test_truncated_associate_rq_every_length(self):
        self._check_all_prefixes(sample_rq())

    def test_truncated_associate_ac_every_length(self):
        self._check_all_prefixes(sample_ac())

    def test_truncated_pdata_every_length(self):
        pdu = PDataTF((PDV(1, 1, b"abcdef"), PDV(3, 2, b"gh")))
        body = encode_pdu(pdu)[6:]
        for n in range(len(body)):
            if n == 12:  # exactly the first PDV
                self.assertEqual(decode_pdu(4, body[:n]), PDataTF((PDV(1, 1, b"abcdef"),)))
            else:
                self.assertPDUError(4, body[:n])

    def test_overlong_item_lengths(self):
        raw = bytearray(encode_pdu(sample_rq()))
        body = raw[6:]
        # every top-level item and every user-information sub-item in turn
        offsets = [68]
        for end in sorted(item_boundaries(bytes(body), 68))[:-1]:
            offsets.append(end)
        ui = offsets[-1]
        off = ui + 4
        while off < len(body):
            offsets.append(off)
            off += 4 + struct.unpack_from(">H", body, off + 2)[0]
        for off in offsets:
            mutated = bytearray(body)
            length = struct.unpack_from(">H", mutated, off + 2)[0]
            for bad in (length + 1, 0xFFFF):
                struct.pack_into(">H", mutated, off + 2, bad)
                self.assertPDUError(1, bytes(mutated))

    def test_wrong_fixed_sub_item_sizes(self):
        for sub in (
            item(0x51, b"\0\0\x40"),
            item(0x51, b"\0\0\x40\0\0"),
            item(0x53, b"\0\1\0"),
            item(0x53, b"\0\1\0\1\0"),
            item(0x54, b"\0\x031.2\1"),  # missing SCP role
            item(0x54, b"\0\x031.2\1\1\1"),  # one byte too many
            item(0x54, b"\0\x091.2"),  # UID length overruns
            item(0x56, b"\0"),
            item(0x56, b"\0\x051.2"),
            item(0x57, b"\0\x031.2"),
            item(0x57, b"\0\x031.2\0\x034.5"),
            item(0x57, b"\0\x031.2\0\x034.5\0\x06\0\x031.2"),  # related overruns
            item(0x57, b"\0\x031.2\0\x034.5\0\x03\0\x051.2"),  # inner UID overruns
            item(0x57, b"\0\x031.2\0\x034.5\0\0X"),  # trailing byte
            item(0x58, b"\x01"),
            item(0x58, b"\x01\x00\x00\x02ab"),  # no secondary length
            item(0x58, b"\x01\x00\x00\x02ab\x00\x00X"),  # trailing byte
            item(0x59, b"\x00"),
            item(0x59, b"\x00\x05ab"),
            item(0x59, b"\x00\x01ab"),
        ):
            self.assertPDUError(1, assoc_body(APP_CTX_ITEM + PC_RQ_ITEM + item(0x50, sub)))

    def test_repeated_singleton_sub_items(self):
        for sub in (
            item(0x51, b"\0\0\x40\0") * 2,
            item(0x52, b"1.2") * 2,
            item(0x53, b"\0\1\0\1") * 2,
            item(0x55, b"V") * 2,
            item(0x58, b"\x01\x00\x00\x01a\x00\x00") + item(0x59, b"\x00\x00"),
        ):
            self.assertPDUError(
                1, assoc_body(APP_CTX_ITEM + PC_RQ_ITEM + item(0x50, sub)), ABORT_UNEXPECTED_PDU_PARAMETER
            )

    def test_associate_structure_errors(self):
        # fixed part too short
        self.assertPDUError(1, b"\0" * 67)
        # no application context
        self.assertPDUError(1, assoc_body(PC_RQ_ITEM))
        # two application contexts / two user information items
        self.assertPDUError(1, assoc_body(APP_CTX_ITEM * 2), ABORT_UNEXPECTED_PDU_PARAMETER)
        self.assertPDUError(
            1, assoc_body(APP_CTX_ITEM + PC_RQ_ITEM + item(0x50, b"") * 2), ABORT_UNEXPECTED_PDU_PARAMETER
        )
        # an AC presentation context inside an RQ and vice versa
        ac_item = item(0x21, b"\x01\x00\x00\x00" + item(0x40, IMPLICIT_LE.encode()))
        self.assertPDUError(1, assoc_body(APP_CTX_ITEM + ac_item), ABORT_UNEXPECTED_PDU_PARAMETER)
        self.assertPDUError(
            2, assoc_body(APP_CTX_ITEM + PC_RQ_ITEM), ABORT_UNEXPECTED_PDU_PARAMETER
        )
        # sub-item types at the wrong level
        self.assertPDUError(
            1, assoc_body(APP_CTX_ITEM + item(0x30, b"1.2")), ABORT_UNEXPECTED_PDU_PARAMETER
        )
        # truncated item header
        self.assertPDUError(1, assoc_body(APP_CTX_ITEM + PC_RQ_ITEM + b"\x20\x00\x00"))

    def test_presentation_context_rq_errors(self):
        ab = item(0x30, VERIFICATION.encode())
        ts = item(0x40, IMPLICIT_LE.encode())
        cases = [
            (b"\x01\x00\x00", ABORT_INVALID_PDU_PARAMETER_VALUE),  # truncated fixed part
            (b"\x01\x00\x00\x00" + ts, ABORT_INVALID_PDU_PARAMETER_VALUE),  # no abstract
            (b"\x01\x00\x00\x00" + ab, ABORT_INVALID_PDU_PARAMETER_VALUE),  # no transfer
            (b"\x01\x00\x00\x00" + ab + ab + ts, ABORT_UNEXPECTED_PDU_PARAMETER),
            (b"\x01\x00\x00\x00" + ab + ts + item(0x50, b""), ABORT_UNEXPECTED_PDU_PARAMETER),
            (b"\x02\x00\x00\x00" + ab + ts, ABORT_INVALID_PDU_PARAMETER_VALUE),  # even id
            (b"\x00\x00\x00\x00" + ab + ts, ABORT_INVALID_PDU_PARAMETER_VALUE),  # id 0
        ]
        for value, reason in cases:
            self.assertPDUError(1, assoc_body(APP_CTX_ITEM + item(0x20, value)), reason)

    def test_presentation_context_ac_errors(self):
        ts = item(0x40, IMPLICIT_LE.encode())
        cases = [
            (b"\x01\x00\x00", ABORT_INVALID_PDU_PARAMETER_VALUE),
            (b"\x04\x00\x00\x00" + ts, ABORT_INVALID_PDU_PARAMETER_VALUE),
            (b"\x01\x00\x00\x00" + ts + ts, ABORT_UNEXPECTED_PDU_PARAMETER),
            (b"\x01\x00\x00\x00" + item(0x40, b"\xff"), ABORT_INVALID_PDU_PARAMETER_VALUE),
        ]
        for value, reason in cases:
            self.assertPDUError(2, assoc_body(APP_CTX_ITEM + item(0x21, value)), reason)

    def test_pdata_errors(self):
        self.assertPDUError(4, b"")  # no PDV at all
        self.assertPDUError(4, b"\0\0\0\0\x01")  # header shorter than 6 bytes
        self.assertPDUError(4, b"\0\0\0\x01\x01\x00")  # item length 1
        self.assertPDUError(4, b"\0\0\0\x00\x01\x00")  # item length 0
        self.assertPDUError(4, b"\0\0\0\x03\x01\x00")  # overruns by one
        self.assertPDUError(4, b"\xff\xff\xff\xff\x01\x00")  # overruns by a lot
        for cid in (0, 2, 128, 254):
            self.assertPDUError(4, b"\0\0\0\x02" + bytes((cid,)) + b"\x00")
        # the second PDV is bad
        self.assertPDUError(4, encode_pdata(1, 0, b"ok")[6:] + b"\0\0\0\x02\x02\x00")
        self.assertPDUError(4, encode_pdata(1, 0, b"ok")[6:] + b"\0\0")


# ---------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------

uids = st.lists(st.integers(0, 10**12), min_size=1, max_size=8).map(
    lambda parts: ".".join(map(str, parts))
)
ae_titles = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16
).map(str.strip)
names = st.from_regex(r"[A-Za-z0-9_.\-]{0,16}", fullmatch=True)
context_ids = st.integers(0, 127).map(lambda i: 2 * i + 1)
u8 = st.integers(0, 255)
u16 = st.integers(0, 0xFFFF)
small_bytes = st.binary(max_size=40)

user_identities = st.one_of(
    st.none(),
    st.builds(UserIdentityRQ, u8, st.booleans(), small_bytes, small_bytes),
    st.builds(UserIdentityAC, small_bytes),
)
user_infos = st.builds(
    UserInformation,
    max_length=st.one_of(st.none(), st.integers(0, 0xFFFFFFFF)),
    implementation_class_uid=st.one_of(st.none(), uids),
    implementation_version_name=st.one_of(st.none(), names),
    async_ops=st.one_of(st.none(), st.tuples(u16, u16)),
    role_selections=st.lists(st.builds(RoleSelection, uids, u8, u8), max_size=3).map(tuple),
    extended_negotiations=st.lists(
        st.builds(ExtendedNegotiation, uids, small_bytes), max_size=3
    ).map(tuple),
    common_extended_negotiations=st.lists(
        st.builds(
            CommonExtendedNegotiation, uids, uids, st.lists(uids, max_size=3).map(tuple)
        ),
        max_size=3,
    ).map(tuple),
    user_identity=user_identities,
    unknown=st.lists(
        st.builds(UnknownItem, u8.filter(lambda t: not 0x51 <= t <= 0x59), small_bytes),
        max_size=3,
    ).map(tuple),
)
associate_rqs = st.builds(
    AssociateRQ,
    called_ae=ae_titles,
    calling_ae=ae_titles,
    presentation_contexts=st.lists(
        st.builds(
            PresentationContextRQ,
            context_ids,
            uids,
            st.lists(uids, min_size=1, max_size=4).map(tuple),
        ),
        min_size=1, max_size=5, unique_by=lambda pc: pc.id,
    ).map(tuple),
    user_information=user_infos,
    application_context=uids,
    protocol_version=u16,
)
associate_acs = st.builds(
    AssociateAC,
    called_ae=ae_titles,
    calling_ae=ae_titles,
    presentation_contexts=st.lists(
        st.one_of(
            st.builds(PresentationContextAC, context_ids, st.just(0), uids),
            st.builds(
                PresentationContextAC,
                context_ids,
                st.integers(1, 255),
                st.one_of(st.just(""), uids),
            ),
        ),
        min_size=1, max_size=5, unique_by=lambda pc: pc.id,
    ).map(tuple),
    user_information=user_infos,
    application_context=uids,
    protocol_version=u16,
)
pdata_tfs = st.builds(
    PDataTF,
    st.lists(
        st.builds(PDV, context_ids, u8, st.binary(max_size=200)), min_size=1, max_size=5
    ).map(tuple),
)
any_pdu = st.one_of(
    associate_rqs,
    associate_acs,
    pdata_tfs,
    st.builds(AssociateRJ, u8, u8, u8),
    st.builds(Abort, u8, u8),
    st.just(ReleaseRQ()),
    st.just(ReleaseRP()),
)


def decode_or_pdu_error(pdu_type, body):
    """Decode with the strict decoder; only PDUError is an acceptable failure."""
    try:
        _decode._decode_strict(pdu_type, body)
    except PDUError as exc:
        assert isinstance(exc.reason, int)


class PropertyTests(unittest.TestCase):
    @HYPOTHESIS
    @given(st.integers(1, 7), st.binary(max_size=300))
    def test_random_bodies_known_types(self, pdu_type, body):
        decode_or_pdu_error(pdu_type, body)

    @HYPOTHESIS
    @given(st.integers(-10, 300), st.binary(max_size=100))
    def test_random_bodies_any_type(self, pdu_type, body):
        decode_or_pdu_error(pdu_type, body)

    @HYPOTHESIS
    @given(st.integers(1, 2), st.binary(max_size=200))
    def test_random_items_after_valid_fixed_part(self, pdu_type, tail):
        # Random bytes rarely get past the 68-byte fixed part; start after it.
        decode_or_pdu_error(pdu_type, assoc_body(APP_CTX_ITEM + tail))
        decode_or_pdu_error(pdu_type, assoc_body(APP_CTX_ITEM + item(0x50, tail[:0xFFFF])))

    @HYPOTHESIS
    @given(any_pdu, st.data())
    def test_single_byte_mutation(self, pdu, data):
        raw = bytearray(encode_pdu(pdu))
        pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
        raw[pos] = data.draw(u8, label="byte")
        decode_or_pdu_error(raw[0], bytes(raw[6:]))

    @HYPOTHESIS
    @given(any_pdu, st.data())
    def test_truncation(self, pdu, data):
        raw = encode_pdu(pdu)
        cut = data.draw(st.integers(6, len(raw)), label="cut")
        decode_or_pdu_error(raw[0], raw[6:cut])

    @HYPOTHESIS
    @given(associate_rqs)
    def test_roundtrip_associate_rq(self, pdu):
        self.assertEqual(roundtrip(pdu), pdu)

    @HYPOTHESIS
    @given(associate_acs)
    def test_roundtrip_associate_ac(self, pdu):
        self.assertEqual(roundtrip(pdu), pdu)

    @HYPOTHESIS
    @given(pdata_tfs)
    def test_roundtrip_pdata(self, pdu):
        raw = encode_pdu(pdu)
        self.assertEqual(struct.unpack_from(">I", raw, 2)[0], len(raw) - 6)
        self.assertEqual(decode_pdu(4, raw[6:]), pdu)
        if len(pdu.pdvs) == 1:
            pdv = pdu.pdvs[0]
            self.assertEqual(encode_pdata(pdv.context_id, pdv.control, pdv.data), raw)
