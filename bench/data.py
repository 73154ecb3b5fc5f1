"""Benchmark data, made with pydicom and cached in the work directory.

CT images and small instances come from the test generators
(``tests/dicomfiles.py``) so the benchmark sends what the interoperability
tests send.  The 1 GiB instance is written by streaming its Pixel Data after
a pydicom-written header: pydicom never holds the gigabyte.
"""

from __future__ import annotations

import os
import random
import struct

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from tests.dicomfiles import ct_image, make_series, small_instance

_DONE = ".complete"


def _cached(directory: str, count: int, build) -> list[str]:
    """The files of ``directory``, built once; a marker file says it is complete."""
    marker = os.path.join(directory, _DONE)
    if os.path.exists(marker):
        with open(marker) as f:
            if int(f.read() or 0) == count:
                return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".dcm"))
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
    paths = build()
    with open(marker, "w") as f:
        f.write(str(count))
    return paths


def ct_series(workdir: str, groups: int, per_group: int, rows: int = 512) -> list[list[str]]:
    """``groups`` series of ``per_group`` CT images (rows x rows, 16 bit) each."""
    out = []
    for g in range(groups):
        directory = os.path.join(workdir, "data", f"ct{rows}-{per_group}-{g}")
        out.append(_cached(directory, per_group,
                           lambda: make_series(directory, per_group, ct_image, rows=rows, cols=rows)))
    return out


def small_instances(workdir: str, count: int, size: int = 8192) -> list[str]:
    directory = os.path.join(workdir, "data", f"small{size}-{count}")

    def build():
        os.makedirs(directory, exist_ok=True)
        return [small_instance(os.path.join(directory, f"s{i:05d}.dcm"), size=size, number=i + 1,
                               transfer_syntax=ExplicitVRLittleEndian)
                for i in range(count)]

    return _cached(directory, count, build)


def big_instance(workdir: str, size: int) -> str:
    """One Secondary Capture instance whose Pixel Data is ``size`` bytes (even)."""
    directory = os.path.join(workdir, "data", f"big-{size}")
    path = os.path.join(directory, "big.dcm")

    def build():
        os.makedirs(directory, exist_ok=True)
        ds = Dataset()
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.PatientID = "BENCH"
        ds.PatientName = "Bench^Big"
        ds.Modality = "OT"
        cols = 16384
        rows = size // (2 * cols)
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
        length = rows * cols * 2
        # Pixel Data (7FE0,0010) is the last element: append it by hand, in
        # chunks of pseudo-random bytes so nothing compresses by accident.
        block = random.Random(7).randbytes(1 << 20)
        with open(path, "ab") as f:
            f.write(struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", length))
            left = length
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
        return [path]

    return _cached(directory, 1, build)[0]
