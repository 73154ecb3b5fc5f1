"""PS3.10 section 7.1: the DICOM file preamble and File Meta Information.

Builds the bytes that go in front of a dataset received on the wire, so that
preamble + meta + the dataset bytes exactly as received form a valid Part 10
file (the meta group is always Explicit VR Little Endian); reads the meta
group of a file's first bytes (:func:`parse_meta`, pure: for a stored file
through :func:`read_meta`, blocking, and for a STOW-RS part as it arrives)
and the leading elements of a data set (:func:`read_elements`, pure).
"""

from __future__ import annotations

import os
import struct

PREAMBLE = b"\x00" * 128 + b"DICM"

_SHORT = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_LONG = struct.Struct("<HH2s2xL")  # group, element, VR, reserved, 32-bit length


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return _LONG.pack(0x0002, element, vr, len(value)) + value
    return _SHORT.pack(0x0002, element, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def file_meta(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_class_uid: str,
    implementation_version_name: str,
    source_ae_title: str | None,
) -> bytes:
    """Preamble, ``DICM`` and the group 0002 elements, ready to write."""
    body = b"".join(
        [
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _ui(sop_class_uid)),
            _element(0x0003, b"UI", _ui(sop_instance_uid)),
            _element(0x0010, b"UI", _ui(transfer_syntax_uid)),
            _element(0x0012, b"UI", _ui(implementation_class_uid)),
            _element(0x0013, b"SH", _text(implementation_version_name)),
        ]
        + ([_element(0x0016, b"AE", _text(source_ae_title))] if source_ae_title else [])
    )
    group_length = _SHORT.pack(0x0002, 0x0000, b"UL", 4) + struct.pack("<L", len(body))
    return PREAMBLE + group_length + body


#: The most File Meta Information we read (a real one is a few hundred bytes).
META_LIMIT = 64 << 10


def dataset_offset(head: bytes) -> int:
    """Where the data set starts in a Part 10 file, from its first 144 bytes
    (or more): after the meta group, whose length (0002,0000) PS3.10
    requires to come first.  ValueError for anything else."""
    if len(head) < 144 or head[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
    group, element, vr, length = _SHORT.unpack_from(head, 132)
    if (group, element, vr, length) != (0x0002, 0x0000, b"UL", 4):
        raise ValueError("File Meta Information Group Length missing")
    (group_length,) = struct.unpack_from("<L", head, 140)
    if group_length > META_LIMIT:
        raise ValueError(f"implausible File Meta Information length {group_length}")
    return 144 + group_length


def parse_meta(head) -> tuple[int, str, str, str] | None:
    """(data set offset, SOP class, SOP instance, transfer syntax) from the
    first bytes of a Part 10 file, or None while ``head`` is too short to
    tell; a UID the meta group lacks is "".  ValueError as soon as the bytes
    are not a Part 10 file's start (a wrong prefix is seen at 132 bytes).
    Pure: for a file being read, or a body being received."""
    n = len(head)
    if n >= 132 and head[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix after the 128-byte preamble)")
    if n < 144:
        return None
    offset = dataset_offset(head)
    if n < offset:
        return None
    elements = read_elements(memoryview(head)[144:offset], implicit=False, last_tag=0x0002FFFF, complete=True)

    def uid(element):
        raw = elements.get(0x00020000 | element, (None, b""))[1]
        return raw.rstrip(b"\x00 ").decode("ascii", "replace")

    return offset, uid(0x0002), uid(0x0003), uid(0x0010)


def read_meta(path: str) -> tuple[str, str, str, int, int]:
    """(SOP class, SOP instance, transfer syntax, data set offset, data set
    size) of a Part 10 file.  Blocking: call it in a thread.  ValueError for
    anything that is not a Part 10 file with those three UIDs in its meta group.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(144)
        offset = dataset_offset(head)
        if offset > size:
            raise ValueError(f"implausible File Meta Information length {offset - 144}")
        head += f.read(offset - 144)
    _offset, *uids = parse_meta(head)
    for value, what in zip(uids, ("Media Storage SOP Class UID", "Media Storage SOP Instance UID",
                                  "Transfer Syntax UID")):
        if not value:
            raise ValueError(f"no {what} in the File Meta Information")
    return (*uids, offset, size - offset)


# ---- reading the leading elements of a data set (PS3.5 section 7) ----------

#: Explicit VRs whose length field is 32-bit, after two reserved bytes
#: (PS3.5 Table 7.1-1); every other VR has a 16-bit length.
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                      b"UT", b"UV"})
UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_TAG_LENGTH = struct.Struct("<HHL")  # group, element, 32-bit length (implicit VR, items)
_MAX_DEPTH = 16  # nested sequences skipped before the data set is called malformed


class Truncated(ValueError):
    """The bytes end before the elements asked for: read more of the file."""


def read_elements(data, *, implicit: bool, last_tag: int, wanted=None,
                  complete: bool = False) -> dict[int, tuple[bytes | None, bytes]]:
    """The top-level elements of a little-endian data set, up to ``last_tag``.

    ``data`` is the start of the data set (the whole of it when ``complete``).
    Returns ``{tag: (VR or None when implicit, value bytes)}`` for the elements
    whose tag is at most ``last_tag`` (only those in ``wanted``, if given).
    Sequences of undefined length are walked through, not decoded.  Raises
    :class:`Truncated` when ``data`` ends first, ValueError when the bytes
    are not a data set.  Pure and bounded: every length is checked against
    the bytes at hand before it is used.
    """
    view = memoryview(data)
    found: dict[int, tuple[bytes | None, bytes]] = {}
    pos, end = 0, len(view)
    while pos < end:
        tag, vr, length, pos = _element_header(view, pos, implicit)
        if tag > last_tag:
            return found
        if length == UNDEFINED_LENGTH:
            if tag == _ITEM or tag == _ITEM_END or tag == _SEQUENCE_END:
                raise ValueError(f"item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) outside a sequence")
            # A UN element of undefined length is a sequence in implicit VR
            # (PS3.5 section 6.2.2).
            pos = _skip_sequence(view, pos, implicit or vr == b"UN", 1)
            continue
        if pos + length > end:
            raise Truncated("element value runs past the data")
        if wanted is None or tag in wanted:
            found[tag] = (vr, bytes(view[pos:pos + length]))
        pos += length
    if not complete:
        raise Truncated(f"the data end before ({last_tag >> 16:04X},{last_tag & 0xFFFF:04X})")
    return found


def _element_header(view, pos: int, implicit: bool):
    """(tag, VR or None, value length, position of the value)."""
    if pos + 8 > len(view):
        raise Truncated("element header runs past the data")
    group, element, length = _TAG_LENGTH.unpack_from(view, pos)
    tag = (group << 16) | element
    if implicit or group == 0xFFFE:  # item tags never carry a VR
        return tag, None, length, pos + 8
    vr = bytes(view[pos + 4:pos + 6])
    if vr in LONG_VRS:
        if pos + 12 > len(view):
            raise Truncated("element header runs past the data")
        (length,) = struct.unpack_from("<L", view, pos + 8)
        return tag, vr, length, pos + 12
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise ValueError(f"({group:04X},{element:04X}) has no valid VR: {vr!r}")
    return tag, vr, length >> 16, pos + 8  # the 16-bit length follows the VR


def _skip_sequence(view, pos: int, implicit: bool, depth: int) -> int:
    """Walk a sequence of undefined length; return the position after it."""
    if depth > _MAX_DEPTH:
        raise ValueError("sequences nested too deep")
    while True:
        tag, _vr, length, pos = _element_header(view, pos, True)
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise ValueError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) where a sequence item belongs")
        if length != UNDEFINED_LENGTH:
            pos += length
            continue
        while True:  # an item of undefined length: its elements, up to the item end
            tag, vr, length, pos = _element_header(view, pos, implicit)
            if tag == _ITEM_END:
                break
            if length == UNDEFINED_LENGTH:
                pos = _skip_sequence(view, pos, implicit or vr == b"UN", depth + 1)
            else:
                pos += length
