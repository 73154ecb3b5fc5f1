"""Test instances made with pydicom: CT images, small instances, odd encodings.

Every file is a complete Part 10 file as a modality would send it.  Pixel
data is pseudo-random so that nothing compresses by accident.
"""

from __future__ import annotations

import os
import random

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from gateway.part10 import dataset_offset

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _base(sop_class, study_uid, series_uid, number, patient_id="PAT001"):
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.10.543.")
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.Modality = "CT" if sop_class == CTImageStorage else "OT"
    ds.InstanceNumber = number
    ds.StudyDate = "20261122"
    return ds


def _meta(ds, transfer_syntax):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.543.1"
    ds.file_meta = meta
    return ds


def _save(ds, path, transfer_syntax):
    _meta(ds, transfer_syntax)
    implicit = transfer_syntax == ImplicitVRLittleEndian
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return path


def ct_image(path, *, study_uid=None, series_uid=None, number=1, rows=512, cols=512,
             transfer_syntax=ExplicitVRLittleEndian, rng=None, patient_id="PAT001"):
    rng = rng or random.Random(number)
    ds = _base(CTImageStorage, study_uid or generate_uid(), series_uid or generate_uid(), number, patient_id)
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = rng.randbytes(rows * cols * 2)
    return _save(ds, path, transfer_syntax)


def small_instance(path, *, size=8192, number=1, transfer_syntax=ImplicitVRLittleEndian, rng=None):
    """A Secondary Capture of about ``size`` bytes."""
    rng = rng or random.Random(number)
    ds = _base(SecondaryCaptureImageStorage, generate_uid(), generate_uid(), number)
    side = max(8, int((size // 2) ** 0.5))
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = rng.randbytes(side * side * 2)
    return _save(ds, path, transfer_syntax)


def odd_instance(path, *, number=1):
    """Private elements, an undefined-length sequence, an odd-length-looking
    private value, explicit VR: things a re-encoder would disturb."""
    ds = _base(MR_IMAGE_STORAGE, generate_uid(), generate_uid(), number)
    ds.Modality = "MR"
    block = ds.private_block(0x0029, "DICOMGW TEST", create=True)
    block.add_new(0x10, "OB", b"\x01\x02\x03\x04\x05\x06")
    block.add_new(0x11, "LO", "private text")
    item = Dataset()
    item.CodeValue = "T1"
    item.CodingSchemeDesignator = "99TEST"
    seq = Sequence([item])
    seq.is_undefined_length = True
    ds.add_new(0x00082218, "SQ", seq)  # AnatomicRegionSequence
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(256))
    return _save(ds, path, ExplicitVRLittleEndian)


def rle_image(path, *, number=1, rows=64, cols=64):
    """An RLE Lossless (encapsulated pixel data) instance, made by pydicom's own encoder."""
    rng = random.Random(number)
    ds = _base(SecondaryCaptureImageStorage, generate_uid(), generate_uid(), number)
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(rng.randrange(4) * 60 for _ in range(rows * cols))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.compress(RLELossless)
    return _save(ds, path, RLELossless)


def dataset_bytes(path) -> bytes:
    """The dataset part of a Part 10 file (everything after the meta group)."""
    with open(path, "rb") as f:
        data = f.read()
    return data[dataset_offset(data):]


def make_series(directory, count, maker=ct_image, **kw):
    os.makedirs(directory, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        path = os.path.join(directory, f"img{i:05d}.dcm")
        if maker is ct_image:
            maker(path, study_uid=study, series_uid=series, number=i + 1, **kw)
        else:
            maker(path, number=i + 1, **kw)
        paths.append(path)
    return paths
