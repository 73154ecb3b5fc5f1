"""Byte-level decoder for the PS3.8 upper-layer PDUs.

This module is private: use :func:`gateway.ul.decode_pdu`.

References used throughout:

* PS3.8 section 9.3 (PDU structures, Tables 9-11 .. 9-26),
* PS3.8 Annex D.1 (Maximum Length sub-item),
* PS3.8 Annex E (PDV message control header),
* PS3.7 Annex D.3.3 (the other User Information sub-items).

The layouts are in :mod:`gateway.ul._wire`.

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

import gateway.ul._wire as W
import gateway.ul.pdu as P

Buffer = Union[bytes, bytearray, memoryview]


# ---------------------------------------------------------------------------
# Decoding helpers
# ---------------------------------------------------------------------------


def _invalid(message: str) -> P.PDUError:
    return P.PDUError(message, P.ABORT_INVALID_PDU_PARAMETER_VALUE)


def _unexpected(message: str) -> P.PDUError:
    return P.PDUError(message, P.ABORT_UNEXPECTED_PDU_PARAMETER)


def _once(found, what: str) -> None:
    """Refuse a second one of an item that may come only once."""
    if found is not None:
        raise _unexpected(f"repeated {what}")


def _iter_items(mv: memoryview, start: int, end: int, where: str) -> Iterator[tuple[int, int, int]]:
    """Yield ``(item_type, value_start, value_end)`` for the items in
    ``mv[start:end]``, checking every header and length against ``end``."""
    off = start
    while off < end:
        if end - off < 4:
            raise _invalid(f"truncated item header in {where}")
        item_type, length = W.ITEM_HEADER.unpack_from(mv, off)
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
    (length,) = W.U16.unpack_from(mv, off)
    off += 2
    if length > end - off:
        raise _invalid(f"{what} length {length} exceeds the {end - off} bytes remaining")
    return off, off + length


# ---------------------------------------------------------------------------
# A-ASSOCIATE-RQ / -AC
# ---------------------------------------------------------------------------


def _decode_pc_rq(mv: memoryview, start: int, end: int) -> P.PresentationContextRQ:
    # PS3.8 9.3.2.2, Table 9-13: id, 3 reserved, then one Abstract Syntax
    # sub-item (0x30, Table 9-14) and one or more Transfer Syntax sub-items
    # (0x40, Table 9-15).
    if end - start < W.PC_RQ_FIXED.size:
        raise _invalid("truncated presentation context (RQ) item")
    (context_id,) = W.PC_RQ_FIXED.unpack_from(mv, start)
    _check_context_id(context_id)
    abstract: str | None = None
    transfers: list[str] = []
    for item_type, vs, ve in _iter_items(mv, start + 4, end, "presentation context"):
        if item_type == W.ITEM_ABSTRACT_SYNTAX:
            if abstract is not None:
                raise _unexpected(f"presentation context {context_id} has two abstract syntaxes")
            abstract = _ascii(mv, vs, ve, "abstract syntax name")
        elif item_type == W.ITEM_TRANSFER_SYNTAX:
            transfers.append(_ascii(mv, vs, ve, "transfer syntax name"))
        elif item_type in W.PDU_LEVEL_ITEMS:
            raise _unexpected(f"item 0x{item_type:02X} inside presentation context {context_id}")
        # else: unrecognised item type, ignored (PS3.8 9.3.1)
    if abstract is None:
        raise _invalid(f"presentation context {context_id} has no abstract syntax")
    if not transfers:
        raise _invalid(f"presentation context {context_id} has no transfer syntax")
    return P.PresentationContextRQ(context_id, abstract, tuple(transfers))


def _decode_pc_ac(mv: memoryview, start: int, end: int) -> P.PresentationContextAC:
    # PS3.8 9.3.3.2, Table 9-18: id, reserved, result/reason, reserved, then
    # one Transfer Syntax sub-item (Table 9-19).  When the result is not
    # acceptance the transfer syntax "shall not be significant and its value
    # shall not be tested when received", so it may be missing or garbage.
    if end - start < W.PC_AC_FIXED.size:
        raise _invalid("truncated presentation context (AC) item")
    context_id, result = W.PC_AC_FIXED.unpack_from(mv, start)
    _check_context_id(context_id)
    accepted = result == P.PC_ACCEPTANCE
    transfer: str | None = None
    for item_type, vs, ve in _iter_items(mv, start + 4, end, "presentation context"):
        if item_type == W.ITEM_TRANSFER_SYNTAX:
            if transfer is not None:
                raise _unexpected(f"presentation context {context_id} has two transfer syntaxes")
            if accepted:
                transfer = _ascii(mv, vs, ve, "transfer syntax name")
            else:
                try:
                    transfer = _ascii(mv, vs, ve, "transfer syntax name")
                except P.PDUError:
                    transfer = ""
        elif item_type in W.PDU_LEVEL_ITEMS:
            raise _unexpected(f"item 0x{item_type:02X} inside presentation context {context_id}")
    if transfer is None:
        if accepted:
            raise _invalid(f"accepted presentation context {context_id} has no transfer syntax")
        transfer = ""
    return P.PresentationContextAC(context_id, result, transfer)


def _check_context_id(context_id: int) -> None:
    # PS3.8 9.3.2.2 / 9.3.3.2 / 9.3.5.1: "odd integers between 1 and 255".
    # The field is one byte, so odd already implies 1..255.
    if not context_id & 1:
        raise _invalid(f"presentation context id {context_id} is not odd")


def _decode_user_information(mv: memoryview, start: int, end: int) -> P.UserInformation:
    # PS3.8 9.3.2.3 / 9.3.3.3 (Tables 9-16 and 9-20).  Sub-items may come in
    # any order.  Sub-items the standard allows only once are rejected when
    # repeated (two different Maximum Length values cannot both be honoured);
    # 0x58 and 0x59 are decoded wherever they appear and the association layer
    # checks that the right one arrived.
    max_length: int | None = None
    class_uid: str | None = None
    version_name: str | None = None
    async_ops: tuple[int, int] | None = None
    identity: P.UserIdentityRQ | P.UserIdentityAC | None = None
    roles: list[P.RoleSelection] = []
    ext: list[P.ExtendedNegotiation] = []
    common: list[P.CommonExtendedNegotiation] = []
    unknown: list[P.UnknownItem] = []

    for item_type, vs, ve in _iter_items(mv, start, end, "user information"):
        if item_type == W.SUB_MAX_LENGTH:
            # PS3.8 Annex D.1, Tables D.1-1/D.1-2: a 4-byte unsigned value;
            # 0 means "no maximum".
            if ve - vs != 4:
                raise _invalid("maximum length sub-item must be 4 bytes")
            _once(max_length, "maximum length sub-item")
            (max_length,) = W.U32.unpack_from(mv, vs)
        elif item_type == W.SUB_IMPLEMENTATION_CLASS_UID:
            # PS3.7 D.3.3.2.1/2: the UID is the whole value.
            _once(class_uid, "implementation class UID sub-item")
            class_uid = _ascii(mv, vs, ve, "implementation class UID")
        elif item_type == W.SUB_ASYNC_OPS_WINDOW:
            # PS3.7 D.3.3.3: max operations invoked (2), performed (2).
            if ve - vs != 4:
                raise _invalid("asynchronous operations window sub-item must be 4 bytes")
            _once(async_ops, "asynchronous operations window sub-item")
            async_ops = W.ASYNC_OPS.unpack_from(mv, vs)
        elif item_type == W.SUB_ROLE_SELECTION:
            roles.append(_decode_role_selection(mv, vs, ve))
        elif item_type == W.SUB_IMPLEMENTATION_VERSION_NAME:
            # PS3.7 D.3.3.2.3/4: 1 to 16 ISO 646 characters, the whole value.
            _once(version_name, "implementation version name sub-item")
            version_name = _ascii(mv, vs, ve, "implementation version name")
        elif item_type == W.SUB_SOP_CLASS_EXTENDED:
            ext.append(_decode_extended(mv, vs, ve))
        elif item_type == W.SUB_SOP_CLASS_COMMON_EXTENDED:
            common.append(_decode_common_extended(mv, vs, ve))
        elif item_type == W.SUB_USER_IDENTITY_RQ or item_type == W.SUB_USER_IDENTITY_AC:
            _once(identity, "user identity sub-item")
            if item_type == W.SUB_USER_IDENTITY_RQ:
                identity = _decode_identity_rq(mv, vs, ve)
            else:
                identity = _decode_identity_ac(mv, vs, ve)
        else:
            # Unknown sub-items are kept, never an error.
            unknown.append(P.UnknownItem(item_type, bytes(mv[vs:ve])))

    return P.UserInformation(
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


def _decode_role_selection(mv: memoryview, start: int, end: int) -> P.RoleSelection:
    # PS3.7 D.3.3.4: UID-length (2), SOP class UID, SCU-role (1), SCP-role (1).
    us, ue = _u16_prefixed(mv, start, end, "role selection SOP class UID")
    if end - ue != 2:
        raise _invalid("role selection sub-item length does not match its UID length")
    scu, scp = W.ROLE_TAIL.unpack_from(mv, ue)
    return P.RoleSelection(_ascii(mv, us, ue, "role selection SOP class UID"), scu, scp)


def _decode_extended(mv: memoryview, start: int, end: int) -> P.ExtendedNegotiation:
    # PS3.7 D.3.3.5: UID-length (2), SOP class UID, then the
    # service-class-application-information up to the end of the item.
    us, ue = _u16_prefixed(mv, start, end, "extended negotiation SOP class UID")
    return P.ExtendedNegotiation(
        _ascii(mv, us, ue, "extended negotiation SOP class UID"), bytes(mv[ue:end])
    )


def _decode_common_extended(mv: memoryview, start: int, end: int) -> P.CommonExtendedNegotiation:
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
    return P.CommonExtendedNegotiation(
        _ascii(mv, ss, se, "common extended negotiation SOP class UID"),
        _ascii(mv, cs, ce, "service class UID"),
        tuple(related),
    )


def _decode_identity_rq(mv: memoryview, start: int, end: int) -> P.UserIdentityRQ:
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
    return P.UserIdentityRQ(identity_type, positive != 0, bytes(mv[ps:pe]), bytes(mv[ss:se]))


def _decode_identity_ac(mv: memoryview, start: int, end: int) -> P.UserIdentityAC:
    # PS3.7 D.3.3.7.2: server-response length (2) + server response.
    rs, re_ = _u16_prefixed(mv, start, end, "user identity server response")
    if re_ != end:
        raise _invalid("user identity (AC) sub-item has trailing bytes")
    return P.UserIdentityAC(bytes(mv[rs:re_]))


def _decode_associate(pdu_type: int, body: Buffer) -> P.AssociateRQ | P.AssociateAC:
    # PS3.8 9.3.2 (Table 9-11) and 9.3.3 (Table 9-17).
    mv = memoryview(body)
    end = len(mv)
    if end < W.ASSOC_FIXED.size:
        raise _invalid(f"A-ASSOCIATE PDU body of {end} bytes is shorter than its fixed fields")
    version, called, calling = W.ASSOC_FIXED.unpack_from(mv, 0)
    is_rq = pdu_type == P.A_ASSOCIATE_RQ
    pc_type = W.ITEM_PRESENTATION_CONTEXT_RQ if is_rq else W.ITEM_PRESENTATION_CONTEXT_AC
    decode_pc: Callable[[memoryview, int, int], object] = _decode_pc_rq if is_rq else _decode_pc_ac

    app_context: str | None = None
    user_info: P.UserInformation | None = None
    contexts = []
    for item_type, vs, ve in _iter_items(mv, W.ASSOC_FIXED.size, end, "A-ASSOCIATE PDU"):
        if item_type == pc_type:
            contexts.append(decode_pc(mv, vs, ve))
        elif item_type == W.ITEM_APPLICATION_CONTEXT:
            # PS3.8 9.3.2.1, Table 9-12: the name is the whole value.
            _once(app_context, "application context item")
            app_context = _ascii(mv, vs, ve, "application context name")
        elif item_type == W.ITEM_USER_INFORMATION:
            _once(user_info, "user information item")
            user_info = _decode_user_information(mv, vs, ve)
        elif item_type in W.PDU_LEVEL_ITEMS:
            raise _unexpected(f"item 0x{item_type:02X} not allowed in this PDU")
        # else: unrecognised item type, ignored (PS3.8 9.3.1)

    if app_context is None:
        raise _invalid("A-ASSOCIATE PDU without an application context item")
    # "One or more" presentation contexts, each with an id of its own: two
    # with one id would be two negotiations the P-DATA could not tell apart.
    if not contexts:
        raise _invalid("A-ASSOCIATE PDU without a presentation context item")
    seen: set[int] = set()
    for pc in contexts:
        if pc.id in seen:
            raise _invalid(f"presentation context id {pc.id} appears twice")
        seen.add(pc.id)
    # The User Information item is mandatory, but nothing in it is needed to
    # decode the PDU; its absence is tolerated and read as "no sub-items".
    # The items may come in any order (PS3.8 9.3.2 lists them, it orders nothing).
    if user_info is None:
        user_info = P.UserInformation()
    cls = P.AssociateRQ if is_rq else P.AssociateAC
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


def _decode_rj(pdu_type: int, body: Buffer) -> P.AssociateRJ:
    # PS3.8 9.3.4, Table 9-21: reserved, result, source, reason/diag.
    _check_fixed("A-ASSOCIATE-RJ", body)
    return P.AssociateRJ(*W.RJ_BODY.unpack_from(body, 0))


def _decode_release_rq(pdu_type: int, body: Buffer) -> P.ReleaseRQ:
    # PS3.8 9.3.6, Table 9-24: 4 reserved bytes.
    _check_fixed("A-RELEASE-RQ", body)
    return P.ReleaseRQ()


def _decode_release_rp(pdu_type: int, body: Buffer) -> P.ReleaseRP:
    # PS3.8 9.3.7, Table 9-25: 4 reserved bytes.
    _check_fixed("A-RELEASE-RP", body)
    return P.ReleaseRP()


def _decode_abort(pdu_type: int, body: Buffer) -> P.Abort:
    # PS3.8 9.3.8, Table 9-26: 2 reserved, source, reason/diag.  Reason is
    # "not significant" when the source is the service-user; kept raw.
    _check_fixed("A-ABORT", body)
    return P.Abort(*W.ABORT_BODY.unpack_from(body, 0))


# ---------------------------------------------------------------------------
# P-DATA-TF: the hot receive path
# ---------------------------------------------------------------------------


def _decode_pdata(pdu_type: int, body: Buffer) -> P.PDataTF:
    # PS3.8 9.3.5, Tables 9-22/9-23.  Each PDV item: item-length (4),
    # presentation-context-ID (1), then the presentation data value, whose
    # first byte is the message control header (Annex E.2); so the item length
    # is at least 2.  The data are zero-copy slices of ``body``.  The reserved
    # bits 2-7 of the control header are passed through untested.
    mv = memoryview(body)
    end = len(mv)
    unpack = W.PDV_HEADER.unpack_from
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
        pdvs.append(P.PDV(context_id, control, mv[off + 6 : item_end]))
        off = item_end
    if not pdvs:
        # "shall contain one or more Presentation-data-value Items"
        raise _invalid("P-DATA-TF PDU without any PDV item")
    return P.PDataTF(tuple(pdvs))


def _decode_strict(pdu_type: int, body: Buffer):
    """Decode without the safety net of :func:`decode_pdu` (used by tests to
    prove that every malformed input is caught explicitly)."""
    decoder = _DECODERS.get(pdu_type)
    if decoder is None:
        raise P.PDUError(f"unrecognized PDU type {pdu_type!r}", P.ABORT_UNRECOGNIZED_PDU)
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
    except P.PDUError:
        raise
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        # Defence in depth: every length is checked explicitly above and the
        # fuzz tests exercise the strict decoder, but a network daemon must
        # never die on a malformed PDU.
        raise _invalid(f"malformed PDU: {exc}") from exc


_DECODERS: dict[int, Callable[[int, Buffer], object]] = {
    P.A_ASSOCIATE_RQ: _decode_associate,
    P.A_ASSOCIATE_AC: _decode_associate,
    P.A_ASSOCIATE_RJ: _decode_rj,
    P.P_DATA_TF: _decode_pdata,
    P.A_RELEASE_RQ: _decode_release_rq,
    P.A_RELEASE_RP: _decode_release_rp,
    P.A_ABORT: _decode_abort,
}
