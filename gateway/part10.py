"""PS3.10 section 7.1: the DICOM file preamble and File Meta Information.

Pure: builds the bytes that go in front of a dataset received on the wire,
so that preamble + meta + the dataset bytes exactly as received form a valid
Part 10 file.  The meta group is always Explicit VR Little Endian.
"""

from __future__ import annotations

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


def dataset_offset(data: bytes) -> int:
    """Where the dataset starts in a Part 10 file: after the meta group.

    Reads the group length (0002,0000), which PS3.10 requires to be first.
    """
    if data[128:132] != b"DICM":
        raise ValueError("no DICM prefix")
    group, element, vr, length = _SHORT.unpack_from(data, 132)
    if (group, element, vr) != (0x0002, 0x0000, b"UL") or length != 4:
        raise ValueError("File Meta Information Group Length missing")
    (group_length,) = struct.unpack_from("<L", data, 140)
    return 144 + group_length
