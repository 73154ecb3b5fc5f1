"""The indexed header attributes: picked out of the data set's first bytes, or read by pydicom."""

from __future__ import annotations

import os

from twisted.trial import unittest

from gateway.store.header import header_attributes


class HeaderTests(unittest.TestCase):
    """The attributes picked out of a data set's first bytes equal pydicom's reading of the file."""

    def both(self, path, cut=None):
        import pydicom

        from tests import dicomfiles

        ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        data = dicomfiles.dataset_bytes(path)
        head = data if cut is None else data[:cut]
        return header_attributes(path), header_attributes(path, head, ts, cut is None)

    def test_generated_instances(self):
        from tests import dicomfiles

        makers = [dicomfiles.ct_image, dicomfiles.small_instance, dicomfiles.odd_instance, dicomfiles.rle_image]
        for maker in makers:
            kw = {"rows": 8, "cols": 8} if maker is dicomfiles.ct_image else {}
            path = maker(self.mktemp(), **kw)
            from_file, quick = self.both(path)
            self.assertEqual(quick, from_file, maker.__name__)
            self.assertTrue(from_file["study_uid"] and from_file["modality"], maker.__name__)
            for cut in (0, 10, 200):  # too short: read from the file, same result
                self.assertEqual(self.both(path, cut)[1], from_file)

    def test_values_that_are_not_plain_ascii(self):
        import pydicom

        from tests import dicomfiles

        cases = [
            (None, "PAT\\2", "Doe^John "),  # two values; padding
            ("ISO_IR 100", "Zoë", "Buc^Jérôme"),
            ("ISO_IR 192", "患者", "Wang^XiaoDong=王^小東"),
            (["", "ISO 2022 IR 87"], "ID1", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
            (None, "tab\there", "x\x01y"),
        ]
        for charset, patient_id, name in cases:
            for implicit in (False, True):
                path = dicomfiles.ct_image(self.mktemp(), rows=8, cols=8)
                ds = pydicom.dcmread(path)
                if charset:
                    ds.SpecificCharacterSet = charset
                ds.PatientID = patient_id
                ds.PatientName = name
                if implicit:
                    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
                ds.save_as(path, enforce_file_format=True)
                from_file, quick = self.both(path)
                self.assertEqual(quick, from_file, (charset, patient_id, name, implicit))
                self.assertEqual(quick["header_error"], "")

    def test_a_data_set_that_is_not_one(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(b"not DICOM at all")
        attrs = header_attributes(path, b"\x10\x00\x20\x00zz\x04\x00PAT1", "1.2.840.10008.1.2.1", True)
        self.assertNotEqual(attrs["header_error"], "")  # pydicom had the last word: not readable
        self.assertEqual(attrs["patient_id"], "")
