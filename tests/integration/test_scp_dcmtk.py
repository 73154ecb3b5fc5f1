"""The gateway as Storage/Verification SCP, driven by DCMTK's echoscu and storescu."""

from __future__ import annotations

import os
import socket

import pydicom
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from gateway import IMPLEMENTATION_CLASS_UID
from tests import dicomfiles
from tests.integration.harness import require_program, run, start_gateway


def _by_uid(paths):
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}


class DCMTKTests(unittest.TestCase):
    timeout = 240

    def setUp(self):
        require_program("storescu")
        require_program("echoscu")

    def assertStoredAsSent(self, gw, sent_paths, calling_ae="STORESCU"):
        stored = gw.stored_files()
        self.assertEqual(len(stored), len(sent_paths))
        sent = _by_uid(sent_paths)
        for path in stored:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            meta = ds.file_meta
            source = sent[ds.SOPInstanceUID]
            original = pydicom.dcmread(source, stop_before_pixels=True).file_meta
            self.assertEqual(meta.MediaStorageSOPInstanceUID, ds.SOPInstanceUID)
            self.assertEqual(meta.MediaStorageSOPClassUID, original.MediaStorageSOPClassUID)
            self.assertEqual(meta.ImplementationClassUID, IMPLEMENTATION_CLASS_UID)
            self.assertEqual(meta.ImplementationVersionName, "DICOMGW_0_1")
            self.assertEqual(meta.SourceApplicationEntityTitle.strip(), calling_ae)
            self.assertEqual(meta.TransferSyntaxUID, original.TransferSyntaxUID)
            self.assertEqual(dicomfiles.dataset_bytes(path), dicomfiles.dataset_bytes(source),
                             f"dataset bytes of {path} differ from {source}")

    @defer.inlineCallbacks
    def test_echo(self):
        gw = yield start_gateway(self)
        out, err, code = yield run("echoscu", "-v", "-aec", "DICOMGW", "127.0.0.1", str(gw.port))
        self.assertEqual(code, 0, err)
        self.assertIn("Received Echo Response (Success)", out + err)

    @defer.inlineCallbacks
    def test_unknown_called_ae_rejected_reason_7(self):
        gw = yield start_gateway(self)
        out, err, code = yield run("echoscu", "-aec", "NOBODY", "127.0.0.1", str(gw.port))
        self.assertNotEqual(code, 0)
        self.assertIn("Rejected Permanent, Source: Service User", out + err)
        self.assertIn("Called AE Title Not Recognized", out + err)

    @defer.inlineCallbacks
    def test_500_ct_one_association(self):
        """The foundation's acceptance test: 500 CT 512x512 on one association."""
        src = self.mktemp()
        paths = dicomfiles.make_series(src, 500)
        gw = yield start_gateway(self, fsync=True)
        out, err, code = yield run("storescu", "-aec", "DICOMGW", "127.0.0.1", str(gw.port), *paths)
        self.assertEqual(code, 0, err)
        self.assertStoredAsSent(gw, paths)

    @defer.inlineCallbacks
    def test_transfer_syntaxes_and_sop_classes(self):
        src = self.mktemp()
        os.makedirs(src)
        implicit = dicomfiles.ct_image(os.path.join(src, "implicit.dcm"),
                                       transfer_syntax=dicomfiles.ImplicitVRLittleEndian)
        rle = dicomfiles.rle_image(os.path.join(src, "rle.dcm"))
        odd = dicomfiles.odd_instance(os.path.join(src, "odd.dcm"))
        explicit = dicomfiles.ct_image(os.path.join(src, "explicit.dcm"), number=7)
        gw = yield start_gateway(self, max_pdu_length=16384)
        # -xr proposes RLE first (then uncompressed), -xi implicit first: each
        # file goes out in its own encoding, so the bytes must be identical.
        for flag, files in (("-xr", [rle, odd, explicit]), ("-xi", [implicit])):
            out, err, code = yield run("storescu", flag, "-aec", "DICOMGW", "127.0.0.1", str(gw.port), *files)
            self.assertEqual(code, 0, err)
        self.assertStoredAsSent(gw, [implicit, rle, odd, explicit])

    @defer.inlineCallbacks
    def test_random_bytes_then_still_serving(self):
        gw = yield start_gateway(self)

        def garbage():
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            try:
                s.sendall(os.urandom(4096))
                return s.recv(64)
            except ConnectionResetError:
                return b""
            finally:
                s.close()

        answer = yield deferToThread(garbage)
        # Either an A-ABORT PDU (type 0x07) or a plain close.
        if answer:
            self.assertEqual(answer[0], 0x07, answer)
        out, err, code = yield run("echoscu", "-aec", "DICOMGW", "127.0.0.1", str(gw.port))
        self.assertEqual(code, 0, err)
