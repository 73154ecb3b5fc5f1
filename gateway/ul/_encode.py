"""Byte-level encoder for the PS3.8 upper-layer PDUs.

This module is private: use :func:`gateway.ul.encode_pdu` and
:func:`gateway.ul.encode_pdata`.  The layouts are in :mod:`gateway.ul._wire`.
"""

from __future__ import annotations

import struct
from typing import Callable, Union

import gateway.ul._wire as W
import gateway.ul.pdu as P


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
    return W.ITEM_HEADER.pack(item_type, len(value)) + value


def _u16_field(value: bytes, what: str) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"{what} of {len(value)} bytes exceeds 65535")
    return W.U16.pack(len(value)) + value


def _encode_pc_rq(pc: P.PresentationContextRQ) -> bytes:
    # Table 9-13: id, 3 reserved, abstract syntax sub-item, transfer syntaxes.
    parts = [
        W.PC_RQ_FIXED.pack(pc.id),
        _item(W.ITEM_ABSTRACT_SYNTAX, _encode_text(pc.abstract_syntax, "abstract syntax")),
    ]
    for ts in pc.transfer_syntaxes:
        parts.append(_item(W.ITEM_TRANSFER_SYNTAX, _encode_text(ts, "transfer syntax")))
    return _item(W.ITEM_PRESENTATION_CONTEXT_RQ, b"".join(parts))


def _encode_pc_ac(pc: P.PresentationContextAC) -> bytes:
    # The transfer syntax sub-item is always sent (Table 9-18 makes it part of
    # the item); for a rejected context it may be empty.
    value = W.PC_AC_FIXED.pack(pc.id, pc.result) + _item(
        W.ITEM_TRANSFER_SYNTAX, _encode_text(pc.transfer_syntax, "transfer syntax")
    )
    return _item(W.ITEM_PRESENTATION_CONTEXT_AC, value)


def _encode_user_information(ui: P.UserInformation) -> bytes:
    subs: list[tuple[int, bytes]] = []
    if ui.max_length is not None:
        subs.append((W.SUB_MAX_LENGTH, W.U32.pack(ui.max_length)))
    if ui.implementation_class_uid is not None:
        uid = _encode_text(ui.implementation_class_uid, "implementation class UID")
        subs.append((W.SUB_IMPLEMENTATION_CLASS_UID, uid))
    if ui.async_ops is not None:
        subs.append((W.SUB_ASYNC_OPS_WINDOW, W.ASYNC_OPS.pack(*ui.async_ops)))
    for role in ui.role_selections:
        uid = _u16_field(_encode_text(role.sop_class_uid, "SOP class UID"), "SOP class UID")
        subs.append((W.SUB_ROLE_SELECTION, uid + W.ROLE_TAIL.pack(role.scu_role, role.scp_role)))
    if ui.implementation_version_name is not None:
        name = _encode_text(ui.implementation_version_name, "implementation version name")
        subs.append((W.SUB_IMPLEMENTATION_VERSION_NAME, name))
    for neg in ui.extended_negotiations:
        uid = _u16_field(_encode_text(neg.sop_class_uid, "SOP class UID"), "SOP class UID")
        subs.append((W.SUB_SOP_CLASS_EXTENDED, uid + bytes(neg.info)))
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
        subs.append((W.SUB_SOP_CLASS_COMMON_EXTENDED, value))
    ident = ui.user_identity
    if isinstance(ident, P.UserIdentityRQ):
        value = (
            bytes((ident.identity_type, 1 if ident.positive_response_requested else 0))
            + _u16_field(bytes(ident.primary_field), "primary field")
            + _u16_field(bytes(ident.secondary_field), "secondary field")
        )
        subs.append((W.SUB_USER_IDENTITY_RQ, value))
    elif isinstance(ident, P.UserIdentityAC):
        response = _u16_field(bytes(ident.server_response), "server response")
        subs.append((W.SUB_USER_IDENTITY_AC, response))
    elif ident is not None:
        raise TypeError(f"unsupported user identity {ident!r}")
    # Sub-item order is not significant, but some older peers expect
    # ascending item types (PS3.8 9.3.2.3 note): the known sub-items are
    # emitted in that order above.  Unknown ones follow in their own order.
    for unk in ui.unknown:
        subs.append((unk.item_type, bytes(unk.data)))
    return _item(W.ITEM_USER_INFORMATION, b"".join(_item(t, v) for t, v in subs))


def _encode_associate(pdu: P.AssociateRQ | P.AssociateAC) -> bytes:
    if isinstance(pdu, P.AssociateRQ):
        pdu_type, encode_pc = P.A_ASSOCIATE_RQ, _encode_pc_rq
    else:
        pdu_type, encode_pc = P.A_ASSOCIATE_AC, _encode_pc_ac
    app_context = _encode_text(pdu.application_context, "application context name")
    items = [_item(W.ITEM_APPLICATION_CONTEXT, app_context)]
    items.extend(encode_pc(pc) for pc in pdu.presentation_contexts)  # type: ignore[arg-type]
    items.append(_encode_user_information(pdu.user_information))
    variable = b"".join(items)
    header = W.ASSOC_HEADER.pack(
        pdu_type,
        W.ASSOC_FIXED.size + len(variable),
        pdu.protocol_version,
        _encode_ae(pdu.called_ae, "called AE title"),
        _encode_ae(pdu.calling_ae, "calling AE title"),
    )
    return header + variable


def _encode_pdata_tf(pdu: P.PDataTF) -> bytes:
    parts = []
    for pdv in pdu.pdvs:
        parts.append(W.PDV_HEADER.pack(len(pdv.data) + 2, pdv.context_id, pdv.control))
        parts.append(pdv.data)
    variable = b"".join(parts)
    return W.PDU_HEADER.pack(P.P_DATA_TF, len(variable)) + variable


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
        return W.PDATA_ONE_PDV.pack(P.P_DATA_TF, n + 6, n + 2, context_id, control) + data
    except struct.error as exc:
        raise ValueError(f"cannot encode P-DATA-TF: {exc}") from None


_ENCODERS: dict[type, Callable[[object], bytes]] = {
    P.AssociateRQ: _encode_associate,  # type: ignore[dict-item]
    P.AssociateAC: _encode_associate,  # type: ignore[dict-item]
    P.AssociateRJ: lambda p: W.RJ_PDU.pack(
        P.A_ASSOCIATE_RJ, 4, p.result, p.source, p.reason  # type: ignore[attr-defined]
    ),
    P.PDataTF: _encode_pdata_tf,  # type: ignore[dict-item]
    P.ReleaseRQ: lambda p: W.RELEASE_PDU.pack(P.A_RELEASE_RQ, 4),
    P.ReleaseRP: lambda p: W.RELEASE_PDU.pack(P.A_RELEASE_RP, 4),
    P.Abort: lambda p: W.ABORT_PDU.pack(P.A_ABORT, 4, p.source, p.reason),  # type: ignore[attr-defined]
}
