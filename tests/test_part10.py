"""Reading the leading elements of a data set (gateway.part10.read_elements)."""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from gateway.part10 import Truncated, dataset_offset, parse_meta, read_elements
from tests.dicomfiles import ct_image

WANTED = frozenset({0x00100020, 0x0020000D})


def explicit(tag, vr, value):
    if vr in (b"OB", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2s2xL", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def implicit(tag, value, length=None):
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value) if length is None else length) + value


def undefined(tag, vr, body, is_implicit=False):
    head = (struct.pack("<HHL", tag >> 16, tag & 0xFFFF, 0xFFFFFFFF) if is_implicit
            else struct.pack("<HH2s2xL", tag >> 16, tag & 0xFFFF, vr, 0xFFFFFFFF))
    return head + body + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def item(body, defined=True):
    if defined:
        return struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body
    return struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + body + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)


class ReadElementsTests(unittest.TestCase):
    def test_explicit_vr_through_nested_undefined_length_sequences(self):
        inner = undefined(0x00081110, b"SQ", item(explicit(0x00081150, b"UI", b"1.2\x00"), defined=False))
        data = (explicit(0x00080060, b"CS", b"CT")
                + undefined(0x00082218, b"SQ", item(inner, defined=False) + item(b"", defined=True))
                + explicit(0x00100020, b"LO", b"PAT1")
                + explicit(0x0020000D, b"UI", b"1.2.3\x00")
                + explicit(0x7FE00010, b"OB", b"\x00" * 8))
        self.assertEqual(read_elements(data, implicit=False, last_tag=0x0020000E, wanted=WANTED),
                         {0x00100020: (b"LO", b"PAT1"), 0x0020000D: (b"UI", b"1.2.3\x00")})
        everything = read_elements(data, implicit=False, last_tag=0x0020000E)
        self.assertEqual(sorted(everything), [0x00080060, 0x00100020, 0x0020000D])

    def test_implicit_vr_and_un_of_undefined_length(self):
        seq = undefined(0x00091010, None, item(implicit(0x00091011, b"ab"), defined=False), is_implicit=True)
        data = seq + implicit(0x00100020, b"P2") + implicit(0x0020000D, b"9.8\x00") + implicit(0x00280010, b"xx")
        self.assertEqual(read_elements(data, implicit=True, last_tag=0x0020000E, wanted=WANTED),
                         {0x00100020: (None, b"P2"), 0x0020000D: (None, b"9.8\x00")})
        # Explicit VR, but UN of undefined length: its content is implicit VR (PS3.5 6.2.2).
        un = undefined(0x00091010, b"UN", item(implicit(0x00091011, b"ab"), defined=False))
        data = un + explicit(0x00100020, b"LO", b"P3") + explicit(0x00200010, b"SH", b"X")
        self.assertEqual(read_elements(data, implicit=False, last_tag=0x0020000E, wanted=WANTED),
                         {0x00100020: (b"LO", b"P3")})

    def test_the_end_of_the_bytes_is_truncated_unless_they_are_all_of_it(self):
        data = explicit(0x00100020, b"LO", b"PAT1") + explicit(0x0020000D, b"UI", b"1.2.3\x00")
        self.assertEqual(read_elements(data, implicit=False, last_tag=0x0020000E, complete=True),
                         {0x00100020: (b"LO", b"PAT1"), 0x0020000D: (b"UI", b"1.2.3\x00")})
        with self.assertRaises(Truncated):
            read_elements(data, implicit=False, last_tag=0x0020000E)
        for cut in range(1, len(data)):
            with self.assertRaises(Truncated):
                read_elements(data[:cut], implicit=False, last_tag=0x0020000E)

    def test_malformed_data_sets(self):
        with self.assertRaisesRegex(ValueError, "no valid VR"):
            read_elements(b"\x10\x00\x20\x00\x01\x02\x04\x00PAT1", implicit=False, last_tag=0x0020000E)
        with self.assertRaisesRegex(ValueError, "outside a sequence"):
            read_elements(implicit(0xFFFEE000, b"", 0xFFFFFFFF), implicit=True, last_tag=0xFFFFFFFF)
        with self.assertRaisesRegex(ValueError, "where a sequence item belongs"):
            read_elements(undefined(0x00082218, b"SQ", explicit(0x00100020, b"LO", b"PAT1")),
                          implicit=False, last_tag=0x0020000E)
        deep = b"".join(struct.pack("<HH2s2xL", 0x0008, 0x2218, b"SQ", 0xFFFFFFFF)
                        + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) for _ in range(40))
        with self.assertRaisesRegex(ValueError, "nested too deep"):
            read_elements(deep, implicit=False, last_tag=0x0020000E)

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=300), st.booleans(), st.booleans())
    def test_random_bytes_only_raise_value_error(self, data, is_implicit, complete):
        try:
            found = read_elements(data, implicit=is_implicit, last_tag=0x0020000E, complete=complete)
        except ValueError:
            return
        for vr, value in found.values():
            self.assertLessEqual(len(value), len(data))


class ParseMetaTests(unittest.TestCase):
    """parse_meta: one reader of the File Meta Information, for files and for
    bodies that are still arriving."""

    def _file(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(ct_image(os.path.join(directory, "ct.dcm"), rows=32, cols=32), "rb") as f:
            return f.read()

    def test_meta_of_a_real_file_and_its_prefixes(self):
        data = self._file()
        end, cls, inst, ts = parse_meta(data)
        self.assertEqual(data[end:end + 4], data[dataset_offset(data):dataset_offset(data) + 4])
        self.assertEqual((cls, ts), ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"))
        self.assertTrue(inst.startswith("1.2.826.0.1.3680043.10.543."))
        for n in (0, 100, 131, 132, 143, 144, end - 1):
            self.assertIsNone(parse_meta(data[:n]), n)
        self.assertEqual(parse_meta(bytearray(data[:end])), (end, cls, inst, ts))

    def test_not_part10(self):
        data = self._file()
        cases = [b"\x00" * 128 + b"DICN", b"\x00" * 128 + b"DICN" + b"\x00" * 20,
                 data[:132] + b"\x02\x00\x01\x00OB" + data[138:],
                 data[:140] + (1 << 20).to_bytes(4, "little") + data[144:]]
        for bad in cases:
            with self.assertRaises(ValueError):
                parse_meta(bad)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(min_size=0, max_size=400))
    def test_random_bytes_only_raise_value_error(self, data):
        try:
            parse_meta(b"\x00" * 128 + b"DICM" + data)
        except ValueError:
            pass
