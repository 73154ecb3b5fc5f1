"""Byte-level encoder and decoder for the PS3.8 upper-layer PDUs.

This module is private: use the names re-exported by :mod:`gateway.ul.pdu`.

References used throughout:

* PS3.8 section 9.3 (PDU structures, Tables 9-11 .. 9-26),
* PS3.8 Annex D.1 (Maximum Length sub-item),
* PS3.8 Annex E (PDV message control header),
* PS3.7 Annex D.3.3 (the other User Information sub-items).

All multi-byte integers are big endian (PS3.8 9.3.1).  Every item and
sub-item starts with the same 4-byte header: item-type (1), reserved (1),
item-length (2); only the PDV item (4-byte length, no type) differs.

Decoding rules applied everywhere:

* A length field is compared with the bytes actually remaining before
  anything is sliced; a mismatch is a :class:`PDUError`.
* Reserved fields are never tested on receipt (PS3.8 9.3: "shall be sent with
  a value 00H but not tested to this value when received").
* Item types we do not recognise are skipped (PS3.8 9.3.1: "Items of
  unrecognized types shall be ignored and skipped"), except inside the User
  Information item, where they are kept as :class:`UnknownItem` so that a
  proxy can see them.  A *known* item type in a place where it does not
  belong (e.g. a Presentation Context AC item inside an A-ASSOCIATE-RQ) is
  reported as an unexpected PDU parameter.
* Values that are "not significant" per the standard (e.g. the transfer
  syntax of a rejected presentation context) are decoded leniently.
"""

from __future__ import annotations

import struct
from typing import Callable, Iterator, Union

# The PDU classes are imported at the bottom of this module: gateway.ul.pdu
# imports this module's public functions as its last statement, so defining
# those functions before importing the classes keeps the import cycle
# working whichever of the two modules is imported first.  All class and
# constant names below are only looked up when a function is called.

__all__ = ["decode_pdu", "encode_pdu", "encode_pdata"]

Buffer = Union[bytes, bytearray, memoryview]

# ---------------------------------------------------------------------------
# Item types
# ---------------------------------------------------------------------------

# PS3.8 9.3.2 / 9.3.3
ITEM_APPLICATION_CONTEXT = 0x10
ITEM_PRESENTATION_CONTEXT_RQ = 0x20
ITEM_PRESENTATION_CONTEXT_AC = 0x21
ITEM_ABSTRACT_SYNTAX = 0x30
ITEM_TRANSFER_SYNTAX = 0x40
ITEM_USER_INFORMATION = 0x50
# PS3.8 Annex D.1 and PS3.7 Annex D.3.3
SUB_MAX_LENGTH = 0x51
SUB_IMPLEMENTATION_CLASS_UID = 0x52
SUB_ASYNC_OPS_WINDOW = 0x53
SUB_ROLE_SELECTION = 0x54
SUB_IMPLEMENTATION_VERSION_NAME = 0x55
SUB_SOP_CLASS_EXTENDED = 0x56
SUB_SOP_CLASS_COMMON_EXTENDED = 0x57
SUB_USER_IDENTITY_RQ = 0x58
SUB_USER_IDENTITY_AC = 0x59

# Item types that only make sense at some other nesting level; seeing one in
# the wrong place is an "unexpected PDU parameter" rather than an unknown item.
_PDU_LEVEL_ITEMS = frozenset(
    {
        ITEM_APPLICATION_CONTEXT,
        ITEM_PRESENTATION_CONTEXT_RQ,
        ITEM_PRESENTATION_CONTEXT_AC,
        ITEM_ABSTRACT_SYNTAX,
        ITEM_TRANSFER_SYNTAX,
        ITEM_USER_INFORMATION,
    }
)

# ---------------------------------------------------------------------------
# Fixed layouts
# ---------------------------------------------------------------------------

_PDU_HEADER = struct.Struct(">BxI")  # type, reserved, length (PS3.8 9.3.1)
_ITEM_HEADER = struct.Struct(">BxH")  # type, reserved, length
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

# A-ASSOCIATE-RQ/AC fixed part after the PDU header (Tables 9-11 and 9-17):
# protocol-version (2), reserved (2), called AE (16), calling AE (16),
# reserved (32).  In the AC the AE title fields are formally "reserved" but
# carry the values of the RQ; they are decoded the same way.
_ASSOC_FIXED = struct.Struct(">H2x16s16s32x")
_ASSOC_HEADER = struct.Struct(">BxIH2x16s16s32x")

# Presentation context item value prefixes (Tables 9-13 and 9-18).
_PC_RQ_FIXED = struct.Struct(">B3x")  # id, 3 reserved
_PC_AC_FIXED = struct.Struct(">BxBx")  # id, reserved, result/reason, reserved

# A-ASSOCIATE-RJ (Table 9-21), A-RELEASE-RQ/RP (9-24/9-25), A-ABORT (9-26):
# 4-byte bodies.
_RJ_BODY = struct.Struct(">xBBB")  # reserved, result, source, reason
_ABORT_BODY = struct.Struct(">2xBB")  # 2 reserved, source, reason
_RJ_PDU = struct.Struct(">BxIxBBB")
_ABORT_PDU = struct.Struct(">BxI2xBB")
_RELEASE_PDU = struct.Struct(">BxI4x")

# P-DATA-TF (Table 9-22) carrying one PDV item (Table 9-23): PDU type,
# reserved, PDU length, item length, context id, message control header.
_PDATA_ONE_PDV = struct.Struct(">BxIIBB")
# PDV item header: item length (4), context id (1), message control header
# (1, Annex E.2; it is the first byte of the item's value).
_PDV_HEADER = struct.Struct(">IBB")

_ROLE_TAIL = struct.Struct(">BB")  # SCU role, SCP role (PS3.7 D.3.3.4)
_ASYNC_OPS = struct.Struct(">HH")  # invoked, performed (PS3.7 D.3.3.3)


# ---------------------------------------------------------------------------
# Decoding helpers
# ---------------------------------------------------------------------------


def _invalid(message: str) -> PDUError:
    return PDUError(message, ABORT_INVALID_PDU_PARAMETER_VALUE)


def _unexpected(message: str) -> PDUError:
    return PDUError(message, ABORT_UNEXPECTED_PDU_PARAMETER)


def _iter_items(mv: memoryview, start: int, end: int, where: str) -> Iterator[tuple[int, int, int]]:
    """Yield ``(item_type, value_start, value_end)`` for the items in
    ``mv[start:end]``, checking every header and length against ``end``."""
    off = start
    while off < end:
        if end - off < 4:
            raise _invalid(f"truncated item header in {where}")
        item_type, length = _ITEM_HEADER.unpack_from(mv, off)
        off += 4
        if length > end - off:
            raise _invalid(
                f"item 0x{item_type:02X} in {where} claims {length} bytes, "
                f"only {end - off} remain"
            )
        yield item_type, off, off + length
        off += length


def _ascii(mv: memoryview, start: int, end: int, what: str) -> str:
    """Decode a UID or name field: ISO 646 (ASCII), with trailing NUL and
    space padding removed (PS3.5 9.1 pads UIDs with NUL, names with spaces;
    neither is significant)."""
    try:
        text = str(mv[start:end], "ascii")
    except UnicodeDecodeError:
        raise _invalid(f"{what} is not ASCII") from None
    return text.rstrip("\x00 ")


def _ae_title(raw: bytes) -> str:
    # PS3.8 Table 9-11: leading and trailing spaces are not significant.  The
    # field is decoded as latin-1 so decoding itself can never fail; whether
    # the title is acceptable is for the association layer to decide.
    return raw.decode("latin-1").rstrip(" \x00").lstrip(" ")


def _u16_prefixed(mv: memoryview, off: int, end: int, what: str) -> tuple[int, int]:
    """Read a 2-byte length at ``off`` and return ``(value_start, value_end)``
    for the value that follows it, checked against ``end``."""
    if end - off < 2:
        raise _invalid(f"truncated {what} length")
    (length,) = _U16.unpack_from(mv, off)
    off += 2
    if length > end - off:
        raise _invalid(f"{what} length {length} exceeds the {end - off} bytes remaining")
    return off, off + length


# ---------------------------------------------------------------------------
# A-ASSOCIATE-RQ / -AC
# ---------------------------------------------------------------------------


def _decode_pc_rq(mv: memoryview, start: int, end: int) -> PresentationContextRQ:
    # PS3.8 9.3.2.2, Table 9-13: id, 3 reserved, then one Abstract Syntax
    # sub-item (0x30, Table 9-14) and one or more Transfer Syntax sub-items
    # (0x40, Table 9-15).
    if end - start < _PC_RQ_FIXED.size:
        raise _invalid("truncated presentation context (RQ) item")
    (context_id,) = _PC_RQ_FIXED.unpack_from(mv, start)
    _check_context_id(context_id)
    abstract: str | None = None
    transfers: list[str] = []
    for item_type, vs, ve in _iter_items(mv, start + 4, end, "presentation context"):
        if item_type == ITEM_ABSTRACT_SYNTAX:
            if abstract is not None:
                raise _unexpected(f"presentation context {context_id} has two abstract syntaxes")
            abstract = _ascii(mv, vs, ve, "abstract syntax name")
        elif item_type == ITEM_TRANSFER_SYNTAX:
            transfers.append(_ascii(mv, vs, ve, "transfer syntax name"))
        elif item_type in _PDU_LEVEL_ITEMS:
            raise _unexpected(f"item 0x{item_type:02X} inside presentation context {context_id}")
        # else: unrecognised item type, ignored (PS3.8 9.3.1)
    if abstract is None:
        raise _invalid(f"presentation context {context_id} has no abstract syntax")
    if not transfers:
        raise _invalid(f"presentation context {context_id} has no transfer syntax")
    return PresentationContextRQ(context_id, abstract, tuple(transfers))


def _decode_pc_ac(mv: memoryview, start: int, end: int) -> PresentationContextAC:
    # PS3.8 9.3.3.2, Table 9-18: id, reserved, result/reason, reserved, then
    # one Transfer Syntax sub-item (Table 9-19).  When the result is not
    # acceptance the transfer syntax "shall not be significant and its value
    # shall not be tested when received", so it may be missing or garbage.
    if end - start < _PC_AC_FIXED.size:
        raise _invalid("truncated presentation context (AC) item")
    context_id, result = _PC_AC_FIXED.unpack_from(mv, start)
    _check_context_id(context_id)
    accepted = result == PC_ACCEPTANCE
    transfer: str | None = None
    for item_type, vs, ve in _iter_items(mv, start + 4, end, "presentation context"):
        if item_type == ITEM_TRANSFER_SYNTAX:
            if transfer is not None:
                raise _unexpected(f"presentation context {context_id} has two transfer syntaxes")
            if accepted:
                transfer = _ascii(mv, vs, ve, "transfer syntax name")
            else:
                try:
                    transfer = _ascii(mv, vs, ve, "transfer syntax name")
                except PDUError:
                    transfer = ""
        elif item_type in _PDU_LEVEL_ITEMS:
            raise _unexpected(f"item 0x{item_type:02X} inside presentation context {context_id}")
    if transfer is None:
        if accepted:
            raise _invalid(f"accepted presentation context {context_id} has no transfer syntax")
        transfer = ""
    return PresentationContextAC(context_id, result, transfer)


def _check_context_id(context_id: int) -> None:
    # PS3.8 9.3.2.2 / 9.3.3.2 / 9.3.5.1: "odd integers between 1 and 255".
    # The field is one byte, so odd already implies 1..255.
    if not context_id & 1:
        raise _invalid(f"presentation context id {context_id} is not odd")


def _decode_user_information(mv: memoryview, start: int, end: int) -> UserInformation:
    # PS3.8 9.3.2.3 / 9.3.3.3 (Tables 9-16 and 9-20).  Sub-items may come in
    # any order.  Sub-items the standard allows only once are rejected when
    # repeated (two different Maximum Length values cannot both be honoured);
    # 0x58 and 0x59 are decoded wherever they appear and the association layer
    # checks that the right one arrived.
    max_length: int | None = None
    class_uid: str | None = None
    version_name: str | None = None
    async_ops: tuple[int, int] | None = None
    identity: UserIdentityRQ | UserIdentityAC | None = None
    roles: list[RoleSelection] = []
    ext: list[ExtendedNegotiation] = []
    common: list[CommonExtendedNegotiation] = []
    unknown: list[UnknownItem] = []

    for item_type, vs, ve in _iter_items(mv, start, end, "user information"):
        if item_type == SUB_MAX_LENGTH:
            # PS3.8 Annex D.1, Tables D.1-1/D.1-2: a 4-byte unsigned value;
            # 0 means "no maximum".
            if ve - vs != 4:
                raise _invalid("maximum length sub-item must be 4 bytes")
            if max_length is not None:
                raise _unexpected("repeated maximum length sub-item")
            (max_length,) = _U32.unpack_from(mv, vs)
        elif item_type == SUB_IMPLEMENTATION_CLASS_UID:
            # PS3.7 D.3.3.2.1/2: the UID is the whole value.
            if class_uid is not None:
                raise _unexpected("repeated implementation class UID sub-item")
            class_uid = _ascii(mv, vs, ve, "implementation class UID")
        elif item_type == SUB_ASYNC_OPS_WINDOW:
            # PS3.7 D.3.3.3: max operations invoked (2), performed (2).
            if ve - vs != 4:
                raise _invalid("asynchronous operations window sub-item must be 4 bytes")
            if async_ops is not None:
                raise _unexpected("repeated asynchronous operations window sub-item")
            async_ops = _ASYNC_OPS.unpack_from(mv, vs)
        elif item_type == SUB_ROLE_SELECTION:
            roles.append(_decode_role_selection(mv, vs, ve))
        elif item_type == SUB_IMPLEMENTATION_VERSION_NAME:
            # PS3.7 D.3.3.2.3/4: 1 to 16 ISO 646 characters, the whole value.
            if version_name is not None:
                raise _unexpected("repeated implementation version name sub-item")
            version_name = _ascii(mv, vs, ve, "implementation version name")
        elif item_type == SUB_SOP_CLASS_EXTENDED:
            ext.append(_decode_extended(mv, vs, ve))
        elif item_type == SUB_SOP_CLASS_COMMON_EXTENDED:
            common.append(_decode_common_extended(mv, vs, ve))
        elif item_type == SUB_USER_IDENTITY_RQ or item_type == SUB_USER_IDENTITY_AC:
            if identity is not None:
                raise _unexpected("repeated user identity sub-item")
            if item_type == SUB_USER_IDENTITY_RQ:
                identity = _decode_identity_rq(mv, vs, ve)
            else:
                identity = _decode_identity_ac(mv, vs, ve)
        else:
            # Unknown sub-items are kept, never an error.
            unknown.append(UnknownItem(item_type, bytes(mv[vs:ve])))

    return UserInformation(
        max_length=max_length,
        implementation_class_uid=class_uid,
        implementation_version_name=version_name,
        async_ops=async_ops,
        role_selections=tuple(roles),
        extended_negotiations=tuple(ext),
        common_extended_negotiations=tuple(common),
        user_identity=identity,
        unknown=tuple(unknown),
    )


def _decode_role_selection(mv: memoryview, start: int, end: int) -> RoleSelection:
    # PS3.7 D.3.3.4: UID-length (2), SOP class UID, SCU-role (1), SCP-role (1).
    us, ue = _u16_prefixed(mv, start, end, "role selection SOP class UID")
    if end - ue != 2:
        raise _invalid("role selection sub-item length does not match its UID length")
    scu, scp = _ROLE_TAIL.unpack_from(mv, ue)
    return RoleSelection(_ascii(mv, us, ue, "role selection SOP class UID"), scu, scp)


def _decode_extended(mv: memoryview, start: int, end: int) -> ExtendedNegotiation:
    # PS3.7 D.3.3.5: UID-length (2), SOP class UID, then the
    # service-class-application-information up to the end of the item.
    us, ue = _u16_prefixed(mv, start, end, "extended negotiation SOP class UID")
    return ExtendedNegotiation(
        _ascii(mv, us, ue, "extended negotiation SOP class UID"), bytes(mv[ue:end])
    )


def _decode_common_extended(mv: memoryview, start: int, end: int) -> CommonExtendedNegotiation:
    # PS3.7 D.3.3.6: byte 2 of this sub-item is a "sub-item version" (00H)
    # rather than a reserved byte; it is not tested.  Value: SOP-class-uid
    # length (2) + UID, service-class-uid length (2) + UID, related general
    # SOP class identification length (2) followed by that many bytes of
    # (UID length (2) + UID) sub-fields.
    ss, se = _u16_prefixed(mv, start, end, "common extended negotiation SOP class UID")
    cs, ce = _u16_prefixed(mv, se, end, "common extended negotiation service class UID")
    rs, re_ = _u16_prefixed(mv, ce, end, "related general SOP class identification")
    if re_ != end:
        raise _invalid("common extended negotiation sub-item has trailing bytes")
    related: list[str] = []
    off = rs
    while off < re_:
        us, ue = _u16_prefixed(mv, off, re_, "related general SOP class UID")
        related.append(_ascii(mv, us, ue, "related general SOP class UID"))
        off = ue
    return CommonExtendedNegotiation(
        _ascii(mv, ss, se, "common extended negotiation SOP class UID"),
        _ascii(mv, cs, ce, "service class UID"),
        tuple(related),
    )


def _decode_identity_rq(mv: memoryview, start: int, end: int) -> UserIdentityRQ:
    # PS3.7 D.3.3.7.1: user-identity-type (1), positive-response-requested
    # (1), primary-field length (2) + primary field, secondary-field length
    # (2) + secondary field (non-empty only for type 2, username+passcode;
    # the type itself is the association layer's business).
    if end - start < 2:
        raise _invalid("truncated user identity sub-item")
    identity_type = mv[start]
    positive = mv[start + 1]
    ps, pe = _u16_prefixed(mv, start + 2, end, "user identity primary field")
    ss, se = _u16_prefixed(mv, pe, end, "user identity secondary field")
    if se != end:
        raise _invalid("user identity sub-item has trailing bytes")
    return UserIdentityRQ(identity_type, positive != 0, bytes(mv[ps:pe]), bytes(mv[ss:se]))


def _decode_identity_ac(mv: memoryview, start: int, end: int) -> UserIdentityAC:
    # PS3.7 D.3.3.7.2: server-response length (2) + server response.
    rs, re_ = _u16_prefixed(mv, start, end, "user identity server response")
    if re_ != end:
        raise _invalid("user identity (AC) sub-item has trailing bytes")
    return UserIdentityAC(bytes(mv[rs:re_]))


def _decode_associate(pdu_type: int, body: Buffer) -> AssociateRQ | AssociateAC:
    # PS3.8 9.3.2 (Table 9-11) and 9.3.3 (Table 9-17).
    mv = memoryview(body)
    end = len(mv)
    if end < _ASSOC_FIXED.size:
        raise _invalid(f"A-ASSOCIATE PDU body of {end} bytes is shorter than its fixed fields")
    version, called, calling = _ASSOC_FIXED.unpack_from(mv, 0)
    is_rq = pdu_type == A_ASSOCIATE_RQ
    pc_type = ITEM_PRESENTATION_CONTEXT_RQ if is_rq else ITEM_PRESENTATION_CONTEXT_AC
    decode_pc: Callable[[memoryview, int, int], object] = _decode_pc_rq if is_rq else _decode_pc_ac

    app_context: str | None = None
    user_info: UserInformation | None = None
    contexts = []
    for item_type, vs, ve in _iter_items(mv, _ASSOC_FIXED.size, end, "A-ASSOCIATE PDU"):
        if item_type == pc_type:
            contexts.append(decode_pc(mv, vs, ve))
        elif item_type == ITEM_APPLICATION_CONTEXT:
            # PS3.8 9.3.2.1, Table 9-12: the name is the whole value.
            if app_context is not None:
                raise _unexpected("repeated application context item")
            app_context = _ascii(mv, vs, ve, "application context name")
        elif item_type == ITEM_USER_INFORMATION:
            if user_info is not None:
                raise _unexpected("repeated user information item")
            user_info = _decode_user_information(mv, vs, ve)
        elif item_type in _PDU_LEVEL_ITEMS:
            raise _unexpected(f"item 0x{item_type:02X} not allowed in this PDU")
        # else: unrecognised item type, ignored (PS3.8 9.3.1)

    if app_context is None:
        raise _invalid("A-ASSOCIATE PDU without an application context item")
    # The User Information item is mandatory, but nothing in it is needed to
    # decode the PDU; its absence is tolerated and read as "no sub-items".
    if user_info is None:
        user_info = UserInformation()
    cls = AssociateRQ if is_rq else AssociateAC
    return cls(
        called_ae=_ae_title(called),
        calling_ae=_ae_title(calling),
        presentation_contexts=tuple(contexts),  # type: ignore[arg-type]
        user_information=user_info,
        application_context=app_context,
        protocol_version=version,
    )


# ---------------------------------------------------------------------------
# The fixed-size PDUs
# ---------------------------------------------------------------------------


def _check_fixed(name: str, body: Buffer) -> None:
    if len(body) != 4:
        raise _invalid(f"{name} PDU body must be 4 bytes, got {len(body)}")


def _decode_rj(pdu_type: int, body: Buffer) -> AssociateRJ:
    # PS3.8 9.3.4, Table 9-21: reserved, result, source, reason/diag.
    _check_fixed("A-ASSOCIATE-RJ", body)
    return AssociateRJ(*_RJ_BODY.unpack_from(body, 0))


def _decode_release_rq(pdu_type: int, body: Buffer) -> ReleaseRQ:
    # PS3.8 9.3.6, Table 9-24: 4 reserved bytes.
    _check_fixed("A-RELEASE-RQ", body)
    return ReleaseRQ()


def _decode_release_rp(pdu_type: int, body: Buffer) -> ReleaseRP:
    # PS3.8 9.3.7, Table 9-25: 4 reserved bytes.
    _check_fixed("A-RELEASE-RP", body)
    return ReleaseRP()


def _decode_abort(pdu_type: int, body: Buffer) -> Abort:
    # PS3.8 9.3.8, Table 9-26: 2 reserved, source, reason/diag.  Reason is
    # "not significant" when the source is the service-user; kept raw.
    _check_fixed("A-ABORT", body)
    return Abort(*_ABORT_BODY.unpack_from(body, 0))


# ---------------------------------------------------------------------------
# P-DATA-TF: the hot receive path
# ---------------------------------------------------------------------------


def _decode_pdata(pdu_type: int, body: Buffer) -> PDataTF:
    # PS3.8 9.3.5, Tables 9-22/9-23.  Each PDV item: item-length (4),
    # presentation-context-ID (1), then the presentation data value, whose
    # first byte is the message control header (Annex E.2); so the item length
    # is at least 2.  The data are zero-copy slices of ``body``.  The reserved
    # bits 2-7 of the control header are passed through untested.
    mv = memoryview(body)
    end = len(mv)
    unpack = _PDV_HEADER.unpack_from
    pdvs = []
    off = 0
    while off < end:
        if end - off < 6:
            raise _invalid("truncated PDV item header")
        length, context_id, control = unpack(mv, off)
        if length < 2:
            raise _invalid(f"PDV item length {length} is less than 2")
        item_end = off + 4 + length
        if item_end > end:
            raise _invalid(f"PDV item length {length} exceeds the {end - off - 4} bytes remaining")
        if not context_id & 1:
            raise _invalid(f"PDV presentation context id {context_id} is not odd")
        pdvs.append(PDV(context_id, control, mv[off + 6 : item_end]))
        off = item_end
    if not pdvs:
        # "shall contain one or more Presentation-data-value Items"
        raise _invalid("P-DATA-TF PDU without any PDV item")
    return PDataTF(tuple(pdvs))


def _decode_strict(pdu_type: int, body: Buffer):
    """Decode without the safety net of :func:`decode_pdu` (used by tests to
    prove that every malformed input is caught explicitly)."""
    decoder = _DECODERS.get(pdu_type)
    if decoder is None:
        raise PDUError(f"unrecognized PDU type {pdu_type!r}", ABORT_UNRECOGNIZED_PDU)
    return decoder(pdu_type, body)


def decode_pdu(pdu_type: int, body: Buffer):
    """Decode the body of one PDU (the bytes after its 6-byte header).

    Returns an :class:`AssociateRQ`, :class:`AssociateAC`,
    :class:`AssociateRJ`, :class:`PDataTF`, :class:`ReleaseRQ`,
    :class:`ReleaseRP` or :class:`Abort`.  For P-DATA-TF the PDV data are
    memoryview slices of ``body``.  Malformed input raises :class:`PDUError`
    and nothing else.
    """
    try:
        return _decode_strict(pdu_type, body)
    except PDUError:
        raise
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        # Defence in depth: every length is checked explicitly above and the
        # fuzz tests exercise the strict decoder, but a network daemon must
        # never die on a malformed PDU.
        raise _invalid(f"malformed PDU: {exc}") from exc


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def _encode_ae(title: str, what: str) -> bytes:
    try:
        raw = title.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {title!r} is not ASCII") from None
    if len(raw) > 16:
        raise ValueError(f"{what} {title!r} is longer than 16 characters")
    return raw.ljust(16, b" ")


def _encode_text(value: str, what: str) -> bytes:
    # UIDs are sent without the PS3.5 NUL padding in UL items (PS3.8 Annex F).
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {value!r} is not ASCII") from None


def _item(item_type: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"item 0x{item_type:02X} value of {len(value)} bytes exceeds 65535")
    return _ITEM_HEADER.pack(item_type, len(value)) + value


def _u16_field(value: bytes, what: str) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"{what} of {len(value)} bytes exceeds 65535")
    return _U16.pack(len(value)) + value


def _encode_pc_rq(pc: PresentationContextRQ) -> bytes:
    # Table 9-13: id, 3 reserved, abstract syntax sub-item, transfer syntaxes.
    parts = [
        _PC_RQ_FIXED.pack(pc.id),
        _item(ITEM_ABSTRACT_SYNTAX, _encode_text(pc.abstract_syntax, "abstract syntax")),
    ]
    for ts in pc.transfer_syntaxes:
        parts.append(_item(ITEM_TRANSFER_SYNTAX, _encode_text(ts, "transfer syntax")))
    return _item(ITEM_PRESENTATION_CONTEXT_RQ, b"".join(parts))


def _encode_pc_ac(pc: PresentationContextAC) -> bytes:
    # The transfer syntax sub-item is always sent (Table 9-18 makes it part of
    # the item); for a rejected context it may be empty.
    value = _PC_AC_FIXED.pack(pc.id, pc.result) + _item(
        ITEM_TRANSFER_SYNTAX, _encode_text(pc.transfer_syntax, "transfer syntax")
    )
    return _item(ITEM_PRESENTATION_CONTEXT_AC, value)


def _encode_user_information(ui: UserInformation) -> bytes:
    subs: list[tuple[int, bytes]] = []
    if ui.max_length is not None:
        subs.append((SUB_MAX_LENGTH, _U32.pack(ui.max_length)))
    if ui.implementation_class_uid is not None:
        uid = _encode_text(ui.implementation_class_uid, "implementation class UID")
        subs.append((SUB_IMPLEMENTATION_CLASS_UID, uid))
    if ui.async_ops is not None:
        subs.append((SUB_ASYNC_OPS_WINDOW, _ASYNC_OPS.pack(*ui.async_ops)))
    for role in ui.role_selections:
        uid = _u16_field(_encode_text(role.sop_class_uid, "SOP class UID"), "SOP class UID")
        subs.append((SUB_ROLE_SELECTION, uid + _ROLE_TAIL.pack(role.scu_role, role.scp_role)))
    if ui.implementation_version_name is not None:
        name = _encode_text(ui.implementation_version_name, "implementation version name")
        subs.append((SUB_IMPLEMENTATION_VERSION_NAME, name))
    for neg in ui.extended_negotiations:
        uid = _u16_field(_encode_text(neg.sop_class_uid, "SOP class UID"), "SOP class UID")
        subs.append((SUB_SOP_CLASS_EXTENDED, uid + bytes(neg.info)))
    for cneg in ui.common_extended_negotiations:
        related = b"".join(
            _u16_field(_encode_text(uid, "related general SOP class UID"), "related UID")
            for uid in cneg.related_general_sop_classes
        )
        value = (
            _u16_field(_encode_text(cneg.sop_class_uid, "SOP class UID"), "SOP class UID")
            + _u16_field(
                _encode_text(cneg.service_class_uid, "service class UID"), "service class UID"
            )
            + _u16_field(related, "related general SOP class identification")
        )
        # The second byte (sub-item version) is 00H, as _item writes it.
        subs.append((SUB_SOP_CLASS_COMMON_EXTENDED, value))
    ident = ui.user_identity
    if isinstance(ident, UserIdentityRQ):
        value = (
            bytes((ident.identity_type, 1 if ident.positive_response_requested else 0))
            + _u16_field(bytes(ident.primary_field), "primary field")
            + _u16_field(bytes(ident.secondary_field), "secondary field")
        )
        subs.append((SUB_USER_IDENTITY_RQ, value))
    elif isinstance(ident, UserIdentityAC):
        response = _u16_field(bytes(ident.server_response), "server response")
        subs.append((SUB_USER_IDENTITY_AC, response))
    elif ident is not None:
        raise TypeError(f"unsupported user identity {ident!r}")
    # Sub-item order is not significant, but some older peers expect
    # ascending item types (PS3.8 9.3.2.3 note): the known sub-items are
    # emitted in that order above.  Unknown ones follow in their own order.
    for unk in ui.unknown:
        subs.append((unk.item_type, bytes(unk.data)))
    return _item(ITEM_USER_INFORMATION, b"".join(_item(t, v) for t, v in subs))


def _encode_associate(pdu: AssociateRQ | AssociateAC) -> bytes:
    if isinstance(pdu, AssociateRQ):
        pdu_type, encode_pc = A_ASSOCIATE_RQ, _encode_pc_rq
    else:
        pdu_type, encode_pc = A_ASSOCIATE_AC, _encode_pc_ac
    app_context = _encode_text(pdu.application_context, "application context name")
    items = [_item(ITEM_APPLICATION_CONTEXT, app_context)]
    items.extend(encode_pc(pc) for pc in pdu.presentation_contexts)  # type: ignore[arg-type]
    items.append(_encode_user_information(pdu.user_information))
    variable = b"".join(items)
    header = _ASSOC_HEADER.pack(
        pdu_type,
        _ASSOC_FIXED.size + len(variable),
        pdu.protocol_version,
        _encode_ae(pdu.called_ae, "called AE title"),
        _encode_ae(pdu.calling_ae, "calling AE title"),
    )
    return header + variable


def _encode_pdata_tf(pdu: PDataTF) -> bytes:
    parts = []
    for pdv in pdu.pdvs:
        parts.append(_PDV_HEADER.pack(len(pdv.data) + 2, pdv.context_id, pdv.control))
        parts.append(pdv.data)
    variable = b"".join(parts)
    return _PDU_HEADER.pack(P_DATA_TF, len(variable)) + variable


def encode_pdu(pdu) -> bytes:
    """Encode one PDU, 6-byte header included.

    Raises ``TypeError`` for something that is not a PDU and ``ValueError``
    for values that cannot be encoded (AE title too long or not ASCII, a
    field out of range, an item over 65535 bytes): those are programming
    errors, not protocol errors.
    """
    encoder = _ENCODERS.get(type(pdu))
    if encoder is None:
        raise TypeError(f"not a PDU: {pdu!r}")
    try:
        return encoder(pdu)
    except struct.error as exc:
        raise ValueError(f"cannot encode {type(pdu).__name__}: {exc}") from None


def encode_pdata(context_id: int, control: int, data: Union[bytes, memoryview]) -> bytes:
    """Encode a P-DATA-TF PDU carrying exactly one PDV.

    ``control`` is the message control header (bit 0: command, bit 1: last
    fragment).  This is the hot send path: one pack of the 12 header bytes
    and one concatenation.
    """
    n = len(data)
    try:
        return _PDATA_ONE_PDV.pack(P_DATA_TF, n + 6, n + 2, context_id, control) + data
    except struct.error as exc:
        raise ValueError(f"cannot encode P-DATA-TF: {exc}") from None


# ---------------------------------------------------------------------------
# Classes and dispatch tables (see the note on the import cycle at the top)
# ---------------------------------------------------------------------------

from gateway.ul.pdu import (  # noqa: E402
    ABORT_INVALID_PDU_PARAMETER_VALUE,
    ABORT_UNEXPECTED_PDU_PARAMETER,
    ABORT_UNRECOGNIZED_PDU,
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
    PC_ACCEPTANCE,
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
)

_DECODERS: dict[int, Callable[[int, Buffer], object]] = {
    A_ASSOCIATE_RQ: _decode_associate,
    A_ASSOCIATE_AC: _decode_associate,
    A_ASSOCIATE_RJ: _decode_rj,
    P_DATA_TF: _decode_pdata,
    A_RELEASE_RQ: _decode_release_rq,
    A_RELEASE_RP: _decode_release_rp,
    A_ABORT: _decode_abort,
}

_ENCODERS: dict[type, Callable[[object], bytes]] = {
    AssociateRQ: _encode_associate,  # type: ignore[dict-item]
    AssociateAC: _encode_associate,  # type: ignore[dict-item]
    AssociateRJ: lambda p: _RJ_PDU.pack(
        A_ASSOCIATE_RJ, 4, p.result, p.source, p.reason  # type: ignore[attr-defined]
    ),
    PDataTF: _encode_pdata_tf,  # type: ignore[dict-item]
    ReleaseRQ: lambda p: _RELEASE_PDU.pack(A_RELEASE_RQ, 4),
    ReleaseRP: lambda p: _RELEASE_PDU.pack(A_RELEASE_RP, 4),
    Abort: lambda p: _ABORT_PDU.pack(A_ABORT, 4, p.source, p.reason),  # type: ignore[attr-defined]
}
