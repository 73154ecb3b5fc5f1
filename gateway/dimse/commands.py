"""DIMSE command sets: encoding, decoding and the few builders the gateway needs.

Pure: no I/O, no Twisted.

A command set (PS3.7 section 6.3 and Annex E) is a list of group 0000 data
elements, always encoded in Implicit VR Little Endian whatever transfer
syntax the presentation context negotiated (PS3.7 section 6.3.1): each
element is tag group (2 bytes), tag element (2 bytes), value length (4
bytes), value, all little endian.  The first element is the Command Group
Length (0000,0000), the number of bytes that follow it.

The elements the gateway acts on are typed fields of :class:`Command`; any
other group 0000 element (retired ones, Move Destination, sub-operation
counts, ...) is kept verbatim in ``Command.extra`` and encoded back
unchanged, never an error.

:func:`decode_command` receives bytes straight from the network and must be
safe on hostile input: anything malformed raises :class:`DIMSEError` and no
other exception.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional, Union

from gateway.dimse.sop import VERIFICATION

# The status codes and status_category live in gateway.dimse.status; re-exported here.
from gateway.dimse.status import *  # noqa: F401,F403
from gateway.dimse.status import SUCCESS, UNRECOGNIZED_OPERATION

__all__ = [
    "DIMSEError",
    "Command",
    "encode_command",
    "decode_command",
    "c_echo_rq",
    "c_echo_rsp",
    "c_store_rq",
    "c_store_rsp",
    "failure_response",
    "status_category",
    "MAX_COMMAND_LENGTH",
]


class DIMSEError(ValueError):
    """A command set or DIMSE message that breaks PS3.7.

    The receiving side answers one with an A-ABORT: a peer that sends a
    message we cannot parse cannot be answered with a DIMSE response.
    """


#: Largest command set accepted (or produced).  Real command sets are a few
#: hundred bytes; the cap bounds what a peer can make us buffer.
MAX_COMMAND_LENGTH = 64 * 1024

# ---------------------------------------------------------------------------
# Command Field values (PS3.7 Annex E, Table E.1-1 and sections 9.3 / 10.3)
# ---------------------------------------------------------------------------

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_GET_RQ = 0x0010
C_GET_RSP = 0x8010
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_MOVE_RQ = 0x0021
C_MOVE_RSP = 0x8021
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
N_GET_RQ = 0x0110
N_GET_RSP = 0x8110
N_SET_RQ = 0x0120
N_SET_RSP = 0x8120
N_ACTION_RQ = 0x0130
N_ACTION_RSP = 0x8130
N_CREATE_RQ = 0x0140
N_CREATE_RSP = 0x8140
N_DELETE_RQ = 0x0150
N_DELETE_RSP = 0x8150
C_CANCEL_RQ = 0x0FFF

#: Bit set in the Command Field of every response (PS3.7 Table E.1-1).
RESPONSE_BIT = 0x8000

COMMAND_NAMES = {
    C_STORE_RQ: "C-STORE-RQ",
    C_STORE_RSP: "C-STORE-RSP",
    C_GET_RQ: "C-GET-RQ",
    C_GET_RSP: "C-GET-RSP",
    C_FIND_RQ: "C-FIND-RQ",
    C_FIND_RSP: "C-FIND-RSP",
    C_MOVE_RQ: "C-MOVE-RQ",
    C_MOVE_RSP: "C-MOVE-RSP",
    C_ECHO_RQ: "C-ECHO-RQ",
    C_ECHO_RSP: "C-ECHO-RSP",
    N_EVENT_REPORT_RQ: "N-EVENT-REPORT-RQ",
    N_EVENT_REPORT_RSP: "N-EVENT-REPORT-RSP",
    N_GET_RQ: "N-GET-RQ",
    N_GET_RSP: "N-GET-RSP",
    N_SET_RQ: "N-SET-RQ",
    N_SET_RSP: "N-SET-RSP",
    N_ACTION_RQ: "N-ACTION-RQ",
    N_ACTION_RSP: "N-ACTION-RSP",
    N_CREATE_RQ: "N-CREATE-RQ",
    N_CREATE_RSP: "N-CREATE-RSP",
    N_DELETE_RQ: "N-DELETE-RQ",
    N_DELETE_RSP: "N-DELETE-RSP",
    C_CANCEL_RQ: "C-CANCEL-RQ",
}

# Command Data Set Type (0000,0800), PS3.7 Table E.1-1: 0101H means "no data
# set"; any other value means a data set follows.  0001H is what we send.
NO_DATASET = 0x0101
DATASET_PRESENT = 0x0001

# Priority (0000,0700), PS3.7 Table E.1-1.
PRIORITY_MEDIUM = 0x0000
PRIORITY_HIGH = 0x0001
PRIORITY_LOW = 0x0002

# ---------------------------------------------------------------------------
# The command set itself
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One decoded command set.  ``None`` means "element absent".

    Tags in ``offending_element`` and ``extra`` are 32-bit ints,
    ``(group << 16) | element``.  ``extra`` holds, in tag order, every group
    0000 element that has no field here, with its raw (still padded) value.
    """

    command_field: int
    message_id: Optional[int] = None
    message_id_being_responded_to: Optional[int] = None
    affected_sop_class_uid: Optional[str] = None
    requested_sop_class_uid: Optional[str] = None
    affected_sop_instance_uid: Optional[str] = None
    requested_sop_instance_uid: Optional[str] = None
    priority: Optional[int] = None
    command_data_set_type: int = NO_DATASET
    status: Optional[int] = None
    error_comment: Optional[str] = None
    offending_element: Optional[tuple[int, ...]] = None
    move_originator_ae: Optional[str] = None
    move_originator_message_id: Optional[int] = None
    extra: tuple[tuple[int, bytes], ...] = ()

    @property
    def has_dataset(self) -> bool:
        """True if a data set follows this command (PS3.7 Table E.1-1)."""
        return self.command_data_set_type != NO_DATASET

    @property
    def is_response(self) -> bool:
        return bool(self.command_field & RESPONSE_BIT)

    @property
    def name(self) -> str:
        """E.g. "C-STORE-RQ"; unknown fields as hex, for logs."""
        return COMMAND_NAMES.get(self.command_field, f"0x{self.command_field:04X}")

    @property
    def sop_class_uid(self) -> Optional[str]:
        """The affected SOP class, or else the requested one."""
        return self.affected_sop_class_uid or self.requested_sop_class_uid


# Value representations used in group 0000 (PS3.7 Table E.1-1).
_US, _UI, _AE, _LO, _AT = "US", "UI", "AE", "LO", "AT"

# tag -> (Command field name, VR) for the typed fields.
_FIELDS: dict[int, tuple[str, str]] = {
    0x00000002: ("affected_sop_class_uid", _UI),
    0x00000003: ("requested_sop_class_uid", _UI),
    0x00000100: ("command_field", _US),
    0x00000110: ("message_id", _US),
    0x00000120: ("message_id_being_responded_to", _US),
    0x00000700: ("priority", _US),
    0x00000800: ("command_data_set_type", _US),
    0x00000900: ("status", _US),
    0x00000901: ("offending_element", _AT),
    0x00000902: ("error_comment", _LO),
    0x00001000: ("affected_sop_instance_uid", _UI),
    0x00001001: ("requested_sop_instance_uid", _UI),
    0x00001030: ("move_originator_ae", _AE),
    0x00001031: ("move_originator_message_id", _US),
}

_TAG_GROUP_LENGTH = 0x00000000

_HEADER = struct.Struct("<HHI")  # group, element, value length
_US_STRUCT = struct.Struct("<H")
_UL_STRUCT = struct.Struct("<I")


def _tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


# --- encoding ---------------------------------------------------------------


def _ascii(value: str, tag: int) -> bytes:
    if not isinstance(value, str):
        raise DIMSEError(f"{_tag_str(tag)}: expected str, got {type(value).__name__}")
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        raise DIMSEError(f"{_tag_str(tag)}: value is not ASCII") from None


def _encode_us(value: object, tag: int) -> bytes:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
        raise DIMSEError(f"{_tag_str(tag)}: {value!r} is not a valid US")
    return _US_STRUCT.pack(value)


def _encode_at(value: object, tag: int) -> bytes:
    out = bytearray()
    for t in value:  # type: ignore[attr-defined]
        if not isinstance(t, int) or not 0 <= t <= 0xFFFFFFFF:
            raise DIMSEError(f"{_tag_str(tag)}: {t!r} is not a tag")
        out += struct.pack("<HH", t >> 16, t & 0xFFFF)
    return bytes(out)


def _encode_ui(value: object, tag: int) -> bytes:
    raw = _ascii(value, tag)  # type: ignore[arg-type]
    # PS3.5 6.2: UI is padded to even length with NUL, text VRs with space.
    return raw + b"\x00" if len(raw) % 2 else raw


def _encode_text(value: object, tag: int) -> bytes:
    raw = _ascii(value, tag)  # type: ignore[arg-type]
    return raw + b" " if len(raw) % 2 else raw


_ENCODE_VR = {_US: _encode_us, _AT: _encode_at, _UI: _encode_ui, _AE: _encode_text, _LO: _encode_text}
# The typed fields in ascending tag order, each with its encoder.
_ENCODERS = [(tag, name, _ENCODE_VR[vr]) for tag, (name, vr) in sorted(_FIELDS.items())]


def encode_command(cmd: Command) -> bytes:
    """Encode ``cmd`` as an Implicit VR Little Endian command set.

    Elements are written in ascending tag order, preceded by a computed
    Command Group Length (0000,0000) (PS3.7 section 6.3.1 and Annex E).
    Values in ``extra`` are written as given, NUL-padded if of odd length.
    Raises :class:`DIMSEError` (a ValueError) if a field cannot be encoded.
    """
    pack = _HEADER.pack
    elements = []  # (tag, element bytes), in tag order
    for tag, name, encode in _ENCODERS:
        value = getattr(cmd, name)
        if value is not None:
            raw = encode(value, tag)
            elements.append((tag, pack(0x0000, tag, len(raw)) + raw))
    if cmd.extra:
        taken = {tag for tag, _ in elements}
        for tag, raw in cmd.extra:
            if not isinstance(tag, int) or not 0 < tag <= 0xFFFF:
                raise DIMSEError(f"extra element {tag!r} is not a group 0000 tag")
            if tag in taken:
                raise DIMSEError(f"extra element {_tag_str(tag)} given twice or shadows a field")
            taken.add(tag)
            raw = bytes(raw)
            if len(raw) % 2:
                raw += b"\x00"
            elements.append((tag, pack(0x0000, tag, len(raw)) + raw))
        elements.sort()
    body = b"".join([element for _tag, element in elements])
    encoded = pack(0x0000, 0x0000, 4) + _UL_STRUCT.pack(len(body)) + body
    if len(encoded) > MAX_COMMAND_LENGTH:
        raise DIMSEError(f"command set of {len(encoded)} bytes exceeds {MAX_COMMAND_LENGTH}")
    return encoded


# --- decoding ---------------------------------------------------------------


# Maps every byte outside printable ASCII to "?".
_PRINTABLE_OR_QUESTION = bytes(b if 0x20 <= b <= 0x7E else 0x3F for b in range(256))
# Printable ASCII: deleting these leaves exactly the bytes that are not.
_PRINTABLE = bytes(range(0x20, 0x7F))


def _decode_text(raw: bytes, tag: int, strict: bool) -> str:
    """Decode an ASCII string value, dropping padding (PS3.5 6.2).

    Leading/trailing spaces are insignificant for AE and LO, and UI values
    are padded with NUL (some senders wrongly use a space): both are
    stripped.  ``strict`` refuses non-printable or non-ASCII bytes;
    otherwise each such byte becomes "?" (free text, only ever logged: this
    also keeps control characters out of the logs).
    """
    raw = raw.rstrip(b"\x00")
    if strict:
        if raw.translate(None, _PRINTABLE):  # in C: no per-byte Python loop
            raise DIMSEError(f"{_tag_str(tag)}: value is not printable ASCII")
        text = raw.decode("ascii")
    else:
        text = raw.translate(_PRINTABLE_OR_QUESTION).decode("ascii")
    return text.strip(" ")


def _decode_us(raw: bytes, tag: int) -> int:
    if len(raw) != 2:
        raise DIMSEError(f"{_tag_str(tag)}: US value of length {len(raw)}")
    return raw[0] | raw[1] << 8


def _decode_at(raw: bytes, tag: int) -> tuple[int, ...]:
    if len(raw) % 4:
        raise DIMSEError(f"{_tag_str(tag)}: AT value of length {len(raw)}")
    return tuple((group << 16) | element for group, element in struct.iter_unpack("<HH", raw))


def _decode_lo(raw: bytes, tag: int) -> str:
    return _decode_text(raw, tag, strict=False)


def _decode_strict(raw: bytes, tag: int) -> str:  # UI, AE
    return _decode_text(raw, tag, strict=True)


_DECODE_VR = {_US: _decode_us, _AT: _decode_at, _LO: _decode_lo, _UI: _decode_strict, _AE: _decode_strict}
# tag (group 0000, so the element number alone) -> (field name, decoder)
_DECODERS = {tag: (name, _DECODE_VR[vr]) for tag, (name, vr) in _FIELDS.items()}


def decode_command(data: Union[bytes, bytearray, memoryview]) -> Command:
    """Decode a complete command set (all its PDV fragments joined).

    Tolerated: elements out of tag order, a missing Command Group Length,
    unknown group 0000 elements (kept in ``extra``), odd value lengths.
    Refused with :class:`DIMSEError`: more than ``MAX_COMMAND_LENGTH``
    bytes, a truncated element, a tag outside group 0000, a duplicated tag,
    an undefined (0xFFFFFFFF) or overlong value length, a US/UL/AT value of
    the wrong length, a UID or AE title that is not printable ASCII, a group
    length that does not match, a missing Command Field or Command Data Set
    Type, and a message ID missing where PS3.7 makes it mandatory.
    """
    size = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
    if size > MAX_COMMAND_LENGTH:
        raise DIMSEError(f"command set of {size} bytes exceeds {MAX_COMMAND_LENGTH}")
    buf = data if isinstance(data, bytes) else bytes(data)  # small (capped above)

    values: dict[str, object] = {}
    extra: list[tuple[int, bytes]] = []
    group_length: Optional[int] = None
    unpack_from = _HEADER.unpack_from
    decoders = _DECODERS
    pos = 0
    while pos < size:
        if size - pos < 8:
            raise DIMSEError(f"truncated element header at offset {pos}")
        group, tag, length = unpack_from(buf, pos)
        if group != 0x0000:
            raise DIMSEError(f"element {_tag_str((group << 16) | tag)} is not in command group 0000")
        start = pos + 8
        # Undefined length (0xFFFFFFFF) is caught here too: it never fits.
        if length > size - start:
            raise DIMSEError(f"element {_tag_str(tag)} length {length} runs past the end")
        pos = start + length
        field = decoders.get(tag)
        if field is not None:
            name = field[0]
            if name in values:
                raise DIMSEError(f"element {_tag_str(tag)} appears twice")
            values[name] = field[1](buf[start:pos], tag)
        elif tag == _TAG_GROUP_LENGTH:
            if group_length is not None:
                raise DIMSEError(f"element {_tag_str(tag)} appears twice")
            if length != 4:
                raise DIMSEError(f"Command Group Length of length {length}")
            group_length = _UL_STRUCT.unpack_from(buf, start)[0]
        else:
            extra.append((tag, buf[start:pos]))
    if extra:
        extra.sort()
        for (tag, _), (next_tag, _) in zip(extra, extra[1:]):
            if tag == next_tag:
                raise DIMSEError(f"element {_tag_str(tag)} appears twice")

    # The group length counts every byte of the group after its own
    # 12-byte element; computed this way it does not depend on order.
    if group_length is not None and group_length != size - 12:
        raise DIMSEError(
            f"Command Group Length {group_length} does not match {size - 12} bytes"
        )
    if "command_field" not in values:
        raise DIMSEError("command set without Command Field (0000,0100)")
    if "command_data_set_type" not in values:
        raise DIMSEError("command set without Command Data Set Type (0000,0800)")

    # PS3.7 9.3 / 10.3: every request but C-CANCEL carries a Message ID;
    # every response and C-CANCEL-RQ carries Message ID Being Responded To.
    # Without it no response can be correlated, so the message is unusable.
    field_value = values["command_field"]
    if field_value & RESPONSE_BIT or field_value == C_CANCEL_RQ:
        if "message_id_being_responded_to" not in values:
            raise DIMSEError("command without Message ID Being Responded To (0000,0120)")
    elif "message_id" not in values:
        raise DIMSEError("request without Message ID (0000,0110)")

    return Command(extra=tuple(extra), **values)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Builders (PS3.7 9.3.1 C-STORE, 9.3.5 C-ECHO)
# ---------------------------------------------------------------------------

_MAX_LO = 64  # PS3.5 Table 6.2-1: LO holds at most 64 characters


def _clean_comment(text: Optional[str]) -> Optional[str]:
    """Make free text fit an LO value: ASCII, no control chars, <= 64 chars."""
    if text is None:
        return None
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text)
    return cleaned[:_MAX_LO].strip() or None


def c_echo_rq(message_id: int) -> Command:
    """C-ECHO-RQ (PS3.7 Table 9.3-12)."""
    return Command(
        command_field=C_ECHO_RQ,
        message_id=message_id,
        affected_sop_class_uid=VERIFICATION,
        command_data_set_type=NO_DATASET,
    )


def c_echo_rsp(request: Command, status: int = SUCCESS) -> Command:
    """C-ECHO-RSP answering ``request`` (PS3.7 Table 9.3-13)."""
    return Command(
        command_field=C_ECHO_RSP,
        message_id_being_responded_to=request.message_id,
        affected_sop_class_uid=request.affected_sop_class_uid or VERIFICATION,
        command_data_set_type=NO_DATASET,
        status=status,
    )


def c_store_rq(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    priority: int = PRIORITY_MEDIUM,
    move_originator_ae: Optional[str] = None,
    move_originator_message_id: Optional[int] = None,
) -> Command:
    """C-STORE-RQ (PS3.7 Table 9.3-1); the data set follows it.

    The Move Originator elements are set when the store is a sub-operation
    of a C-MOVE (PS3.7 9.1.1.1.8 / 9.1.1.1.9).
    """
    return Command(
        command_field=C_STORE_RQ,
        message_id=message_id,
        affected_sop_class_uid=sop_class_uid,
        affected_sop_instance_uid=sop_instance_uid,
        priority=priority,
        command_data_set_type=DATASET_PRESENT,
        move_originator_ae=move_originator_ae,
        move_originator_message_id=move_originator_message_id,
    )


def c_store_rsp(
    request: Command, status: int, error_comment: Optional[str] = None
) -> Command:
    """C-STORE-RSP answering ``request`` (PS3.7 Table 9.3-2).

    ``error_comment`` (0000,0902) is sanitised to a valid LO value.
    """
    return Command(
        command_field=C_STORE_RSP,
        message_id_being_responded_to=request.message_id,
        affected_sop_class_uid=request.affected_sop_class_uid,
        affected_sop_instance_uid=request.affected_sop_instance_uid,
        command_data_set_type=NO_DATASET,
        status=status,
        error_comment=_clean_comment(error_comment),
    )


def failure_response(
    request: Command, status: int = UNRECOGNIZED_OPERATION, error_comment: Optional[str] = None
) -> Optional[Command]:
    """A data-set-less response refusing ``request``, whatever its service.

    Used to answer DIMSE services the gateway does not provide (typically
    with UNRECOGNIZED_OPERATION 0211H, PS3.7 Annex C).  The response Command
    Field is the request's with the response bit set (PS3.7 Table E.1-1);
    the Affected SOP Class UID is the request's affected or requested one,
    and likewise the Affected SOP Instance UID where the request had one.

    Returns None when nothing may be sent back: for C-CANCEL-RQ, which has
    no response (PS3.7 section 9.3), and for a command that is itself a
    response.
    """
    if request.command_field == C_CANCEL_RQ or request.is_response:
        return None
    return Command(
        command_field=request.command_field | RESPONSE_BIT,
        message_id_being_responded_to=request.message_id,
        affected_sop_class_uid=request.sop_class_uid,
        affected_sop_instance_uid=(
            request.affected_sop_instance_uid or request.requested_sop_instance_uid
        ),
        command_data_set_type=NO_DATASET,
        status=status,
        error_comment=_clean_comment(error_comment),
    )
