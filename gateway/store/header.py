"""The indexed attributes of a stored instance, from its header only.

Picked out of the first bytes of the data set as the writer kept them, or
read from the file by pydicom without the pixel data; text is decoded with
the data set's Specific Character Set (pydicom handles ISO-IR 6, ISO-IR 100,
ISO 2022 IR 87, ISO-IR 192 and the other PS3.5 character sets).  Blocking:
the storage writer calls :func:`header_attributes` in the same disk job that
puts the file in place.
"""

from __future__ import annotations

import re

from gateway.dimse import sop
from gateway.part10 import read_elements

#: The indexed attributes: tag -> (pydicom keyword, key in the attributes).
_INDEXED = {0x00100020: ("PatientID", "patient_id"), 0x00100010: ("PatientName", "patient_name"),
            0x0020000D: ("StudyInstanceUID", "study_uid"), 0x0020000E: ("SeriesInstanceUID", "series_uid"),
            0x00080060: ("Modality", "modality")}
_SPECIFIC_CHARACTER_SET = 0x00080005
#: What either way of reading looks for (and, for the quick read, how far).
_HEADER_TAGS = [keyword for keyword, _key in _INDEXED.values()] + ["SpecificCharacterSet"]
_HEADER_TAG_NUMBERS = frozenset(_INDEXED) | {_SPECIFIC_CHARACTER_SET}
_LAST_HEADER_TAG = max(_HEADER_TAG_NUMBERS)
#: Transfer syntaxes whose data set is not plain little endian: their header
#: is read from the file by pydicom.
_NOT_LITTLE_ENDIAN = frozenset({sop.EXPLICIT_VR_BIG_ENDIAN, sop.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
                                sop.JPIP_REFERENCED_DEFLATE})


def header_attributes(path: str, head: bytes | None = None, transfer_syntax: str = "",
                      complete: bool = False) -> dict:
    """The indexed attributes of a stored instance, from its header only.

    ``head`` may give the first bytes of the data set (all of them when
    ``complete``), as the writer kept them: the few indexed elements are
    then picked out of it (:func:`gateway.part10.read_elements`), and a
    value of plain ASCII is taken as it is, without its padding.  Any other
    value is decoded by pydicom with the data set's Specific Character Set
    (ISO-IR 6, ISO-IR 100, ISO 2022 IR 87, ISO-IR 192 and the rest of
    PS3.5), and when ``head`` ends too soon, is not little endian, or is not
    given, pydicom reads the file itself up to the pixel data.  Both ways
    give the same strings.  A data set that cannot be parsed gets empty
    attributes and ``header_error``: it is still stored as-is.  Blocking:
    the storage writer runs it in its pool job, right after the file is in
    place.
    """
    try:
        attrs = quick_attributes(head, transfer_syntax, complete) if head is not None else None
        if attrs is None:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            attrs = {key: str(ds.get(keyword, "") or "") for keyword, key in _INDEXED.values()}
        attrs["header_error"] = ""
    except Exception as e:  # a malformed dataset is still stored as-is
        attrs = {key: "" for _keyword, key in _INDEXED.values()}
        attrs["header_error"] = f"{type(e).__name__}: {e}"
    return attrs


_PLAIN = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")  # printable ASCII but the backslash (value separator)


def quick_attributes(head, transfer_syntax: str, complete: bool) -> dict | None:
    """The indexed attributes picked out of the first bytes of a data set
    (all of it when ``complete``), or None when they do not settle them or
    the data set is not little endian (:func:`header_attributes` then has
    pydicom read the file).  Pure: it also serves before a file exists."""
    if transfer_syntax in _NOT_LITTLE_ENDIAN:
        return None
    implicit = transfer_syntax == sop.IMPLICIT_VR_LITTLE_ENDIAN
    try:
        found = read_elements(head, implicit=implicit, last_tag=_LAST_HEADER_TAG,
                              wanted=_HEADER_TAG_NUMBERS, complete=complete)
    except ValueError:  # Truncated, or not a data set: pydicom will say what it makes of it
        return None
    attrs, others = {}, {}
    for number, (keyword, key) in _INDEXED.items():
        vr, value = found.get(number, (None, b""))
        value = value.rstrip(b"\0 ")
        if _PLAIN.fullmatch(value):
            attrs[key] = value.decode("ascii")
        else:
            others[number] = (vr, value)
    if others:  # another character set, several values, control characters
        from pydicom.dataelem import RawDataElement
        from pydicom.dataset import Dataset
        from pydicom.tag import Tag

        if _SPECIFIC_CHARACTER_SET in found:
            others[_SPECIFIC_CHARACTER_SET] = found[_SPECIFIC_CHARACTER_SET]
        raw = {}
        for number, (vr, value) in others.items():
            tag = Tag(number)
            raw[tag] = RawDataElement(tag, vr.decode("ascii") if vr else None, len(value), value, 0,
                                      implicit, True)
        ds = Dataset(raw)
        for number in others.keys() & _INDEXED.keys():
            keyword, key = _INDEXED[number]
            attrs[key] = str(ds.get(keyword, "") or "")
    return attrs
