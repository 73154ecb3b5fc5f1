"""Tests for gateway.dimse.sop: UID validation and SOP class classification."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from gateway.dimse import sop


class IsValidUIDTests(unittest.TestCase):
    def test_valid(self):
        for uid in (
            "1.2.840.10008.1.1",
            "0",
            "1",
            "0.0",
            "1.2.840.10008.5.1.4.1.1.2",
            "2.25.329800735698586629295641978511506172918",
            "1." + "2" * 62,  # 64 characters
            "1.0.2.10.100",
        ):
            self.assertTrue(sop.is_valid_uid(uid), uid)
        self.assertEqual(len("1." + "2" * 62), 64)

    def test_invalid(self):
        for uid in (
            "",  # empty
            "1.02",  # leading zero
            "01.2",
            "1.2.00",
            "1." + "2" * 63,  # 65 characters
            "1..2",  # empty component
            ".1.2",
            "1.2.",  # trailing dot
            ".",
            "1.2a",  # letters
            "abc",
            "1.2.3\x00",  # padding is not part of the UID
            "1.2.3 ",
            " 1.2.3",
            "../x",  # path-like
            "1/2",
            "1.2\n",
            "-1.2",
            "+1",
            "1,2",
            "\u0661.\u0662",  # non-ASCII digits
            "1.2.3\u00b2",
        ):
            self.assertFalse(sop.is_valid_uid(uid), repr(uid))

    def test_non_string(self):
        for value in (None, 1, b"1.2.3", ["1"]):
            self.assertFalse(sop.is_valid_uid(value))

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.text(max_size=80))
    def test_random_text_matches_definition(self, text):
        expected = (
            0 < len(text) <= 64
            and all(
                part and all(ch in "0123456789" for ch in part)
                and not (len(part) > 1 and part[0] == "0")
                for part in text.split(".")
            )
        )
        self.assertEqual(sop.is_valid_uid(text), expected)


class ClassificationTests(unittest.TestCase):
    def test_known_storage(self):
        for uid in (
            "1.2.840.10008.5.1.4.1.1.2",  # CT
            "1.2.840.10008.5.1.4.1.1.4",  # MR
            "1.2.840.10008.5.1.4.1.1.7",  # secondary capture
            "1.2.840.10008.5.1.4.1.1.88.11",  # basic text SR
            "1.2.840.10008.5.1.4.1.1.104.1",  # encapsulated PDF
            "1.2.840.10008.5.1.4.1.1.481.5",  # RT plan
            "1.2.840.10008.5.1.4.1.1.5",  # NM (retired)
            "1.2.840.10008.5.1.4.38.1",  # hanging protocol (non-patient)
            "1.2.840.10008.1.3.10",  # media storage directory
        ):
            self.assertIn(uid, sop.STORAGE_SOP_CLASSES)
            self.assertTrue(sop.is_storage_sop_class(uid), uid)
            self.assertTrue(sop.is_known_storage_sop_class(uid), uid)

    def test_known_non_storage(self):
        for uid in (
            sop.VERIFICATION,
            sop.STORAGE_COMMITMENT_PUSH,
            "1.2.840.10008.5.1.4.1.2.1.1",  # patient root find
            "1.2.840.10008.5.1.4.1.2.2.2",  # study root move
            "1.2.840.10008.5.1.4.1.2.2.3",  # study root get
            "1.2.840.10008.5.1.4.31",  # modality worklist
            "1.2.840.10008.3.1.2.3.3",  # MPPS
            "1.2.840.10008.5.1.1.1",  # basic film session
            "1.2.840.10008.5.1.1.9",  # grayscale print meta
            "1.2.840.10008.5.1.4.33",  # instance availability notification
            "1.2.840.10008.5.1.4.34.6.1",  # UPS push
            "1.2.840.10008.5.1.4.38.2",  # hanging protocol find
        ):
            self.assertIn(uid, sop.NON_STORAGE_SOP_CLASSES)
            self.assertFalse(sop.is_storage_sop_class(uid), uid)
            self.assertFalse(sop.is_known_storage_sop_class(uid), uid)

    def test_unknown_is_storage_by_default(self):
        for uid in ("1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.999", "1.3.6.1.4.1.9590.100.1.2"):
            self.assertTrue(sop.is_storage_sop_class(uid))
            self.assertFalse(sop.is_known_storage_sop_class(uid))

    def test_what_is_not_a_uid_or_not_a_sop_class_is_not_storage(self):
        for uid in ("NOT-A-UID", "1.2.3..4", "01.2.3", "1.2.3.", "", "1" * 65, "1.2.3\x004",
                    sop.IMPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.4.50",  # transfer syntaxes
                    "1.2.840.10008.3.1.1.1",  # the DICOM application context name
                    "1.2.840.10008.15.0.3.1"):  # a coding scheme
            self.assertFalse(sop.is_storage_sop_class(uid), repr(uid))

    def test_padding_ignored(self):
        self.assertFalse(sop.is_storage_sop_class(sop.VERIFICATION + "\x00"))
        self.assertTrue(sop.is_known_storage_sop_class("1.2.840.10008.5.1.4.1.1.2\x00"))

    def test_tables_are_disjoint_and_valid(self):
        self.assertFalse(sop.STORAGE_SOP_CLASSES & sop.NON_STORAGE_SOP_CLASSES)
        self.assertGreater(len(sop.STORAGE_SOP_CLASSES), 150)
        self.assertGreater(len(sop.NON_STORAGE_SOP_CLASSES), 50)
        for uid in sop.STORAGE_SOP_CLASSES | sop.NON_STORAGE_SOP_CLASSES:
            self.assertTrue(sop.is_valid_uid(uid), uid)
            self.assertTrue(uid.startswith("1.2.840.10008."), uid)
            self.assertTrue(sop.sop_class_name(uid), uid)
        for uid in sop.KNOWN_TRANSFER_SYNTAXES:
            self.assertTrue(sop.is_valid_uid(uid), uid)

    def test_agrees_with_pydicom_registry(self):
        # Test-only cross-check of the transcribed tables against pydicom's
        # copy of the PS3.6 registry.
        from pydicom.uid import UID

        for uid in sop.STORAGE_SOP_CLASSES | sop.NON_STORAGE_SOP_CLASSES:
            registered = UID(uid)
            if registered.is_valid and registered.name != uid:
                self.assertIn(registered.type, ("SOP Class", "Meta SOP Class"), uid)

    def test_names(self):
        self.assertEqual(sop.sop_class_name("1.2.840.10008.5.1.4.1.1.2"), "CT Image Storage")
        self.assertEqual(sop.sop_class_name(sop.VERIFICATION), "Verification SOP Class")
        self.assertIsNone(sop.sop_class_name("1.2.3"))

    def test_transfer_syntax_constants(self):
        self.assertEqual(sop.IMPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2")
        self.assertEqual(sop.EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.1")
        self.assertEqual(sop.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.1.99")
        self.assertEqual(sop.EXPLICIT_VR_BIG_ENDIAN, "1.2.840.10008.1.2.2")
        self.assertEqual(sop.RLE_LOSSLESS, "1.2.840.10008.1.2.5")
        self.assertEqual(sop.JPEG_BASELINE, "1.2.840.10008.1.2.4.50")
        self.assertIn(sop.JPEG_BASELINE, sop.KNOWN_TRANSFER_SYNTAXES)
        self.assertIn("1.2.840.10008.1.2.4.52", sop.KNOWN_TRANSFER_SYNTAXES)
        self.assertTrue(sop.NATIVE_TRANSFER_SYNTAXES <= sop.KNOWN_TRANSFER_SYNTAXES)

    def test_no_heavy_imports(self):
        import gateway.dimse.commands
        import gateway.dimse.message  # noqa: F401
        import sys

        for module in ("gateway.dimse.sop", "gateway.dimse.commands", "gateway.dimse.message"):
            source = open(sys.modules[module].__file__, encoding="utf-8").read()
            for banned in ("import twisted", "from twisted", "pynetdicom", "import pydicom",
                           "from pydicom"):
                self.assertNotIn(banned, source, module)
