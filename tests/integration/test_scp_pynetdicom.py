"""The gateway as SCP with pynetdicom as the requesting peer."""

from __future__ import annotations

import os

import pydicom
from twisted.internet import defer
from twisted.trial import unittest

from gateway.testing import partial_files
from tests import dicomfiles
from tests.integration.harness import in_thread, require_pynetdicom, start_gateway

CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
MR = "1.2.840.10008.5.1.4.1.1.4"


def _ae(max_pdu=16384):
    pynetdicom = require_pynetdicom()
    ae = pynetdicom.AE(ae_title="PYNETDICOM")
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae


class PynetdicomTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_store_files_as_is_multi_fragment(self):
        """Files sent by path go out without re-encoding: bytes must match.

        The gateway advertises 16 KiB PDUs, so every CT arrives in ~33 fragments.
        """
        src = self.mktemp()
        os.makedirs(src)
        files = [
            dicomfiles.ct_image(os.path.join(src, "ct_explicit.dcm")),
            dicomfiles.ct_image(os.path.join(src, "ct_implicit.dcm"), number=2,
                                transfer_syntax=dicomfiles.ImplicitVRLittleEndian),
            dicomfiles.rle_image(os.path.join(src, "rle.dcm")),
            dicomfiles.odd_instance(os.path.join(src, "odd.dcm")),
        ]
        gw = yield start_gateway(self, max_pdu_length=16384)

        def send():
            ae = _ae()
            for path in files:
                meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
                ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", gw.port, ae_title="DICOMGW")
            assert assoc.is_established, "association not established"
            try:
                return [assoc.send_c_store(path).Status for path in files]
            finally:
                assoc.release()

        statuses = yield in_thread(send)
        self.assertEqual(statuses, [0, 0, 0, 0])
        stored = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in gw.stored_files()}
        self.assertEqual(len(stored), 4)
        for path in files:
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            self.assertEqual(dicomfiles.dataset_bytes(stored[uid]), dicomfiles.dataset_bytes(path))

    @defer.inlineCallbacks
    def test_echo_and_unsupported_service(self):
        gw = yield start_gateway(self)

        def talk():
            ae = _ae()
            ae.add_requested_context("1.2.840.10008.1.1")
            ae.add_requested_context("1.2.840.10008.5.1.4.1.2.1.1")  # Patient Root Q/R FIND
            assoc = ae.associate("127.0.0.1", gw.port, ae_title="DICOMGW")
            try:
                contexts = {c.abstract_syntax: c.result for c in assoc.accepted_contexts + assoc.rejected_contexts}
                return assoc.send_c_echo().Status, contexts
            finally:
                assoc.release()

        status, contexts = yield in_thread(talk)
        self.assertEqual(status, 0x0000)
        self.assertEqual(contexts["1.2.840.10008.1.1"], 0)
        # Query/Retrieve is a known non-storage service: abstract syntax not supported.
        self.assertEqual(contexts["1.2.840.10008.5.1.4.1.2.1.1"], 3)

    @defer.inlineCallbacks
    def test_duplicate_instance_latest_wins(self):
        src = self.mktemp()
        os.makedirs(src)
        first = dicomfiles.ct_image(os.path.join(src, "a.dcm"), rows=32, cols=32)
        ds = pydicom.dcmread(first)
        ds.PatientName = "Second^Copy"
        second = os.path.join(src, "b.dcm")
        ds.save_as(second, enforce_file_format=True)
        gw = yield start_gateway(self)

        def send():
            ae = _ae()
            ae.add_requested_context(CT, ds.file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", gw.port, ae_title="DICOMGW")
            try:
                return [assoc.send_c_store(p).Status for p in (first, second)]
            finally:
                assoc.release()

        self.assertEqual((yield in_thread(send)), [0, 0])
        stored = gw.stored_files()
        self.assertEqual(len(stored), 1)
        self.assertEqual(str(pydicom.dcmread(stored[0]).PatientName), "Second^Copy")

    @defer.inlineCallbacks
    def test_invalid_uid_refused_nothing_written(self):
        gw = yield start_gateway(self)
        ds = pydicom.dcmread(dicomfiles.ct_image(os.path.join(self.mktemp() + ".dcm"), rows=8, cols=8))
        ds.SOPInstanceUID = "../../etc/passwd"

        def send():
            ae = _ae()
            ae.add_requested_context(CT, ds.file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", gw.port, ae_title="DICOMGW")
            try:
                return assoc.send_c_store(ds).Status
            finally:
                assoc.release()

        status = yield in_thread(send)
        self.assertEqual(status & 0xF000, 0xC000)
        self.assertEqual(gw.stored_files(), [])
        self.assertEqual(partial_files(os.path.join(gw.storage_root, "tmp")), [])

    @defer.inlineCallbacks
    def test_abort_mid_store_leaves_nothing(self):
        """A peer that aborts mid-dataset leaves no partial file behind."""
        gw = yield start_gateway(self, max_pdu_length=16384)

        def send_half_then_abort():
            ae = _ae()
            ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
            assoc = ae.associate("127.0.0.1", gw.port, ae_title="DICOMGW")
            from pynetdicom.pdu_primitives import P_DATA

            # A C-STORE-RQ command, then only part of the data set, then abort.
            from pynetdicom.dimse_primitives import C_STORE
            req = C_STORE()
            req.MessageID = 1
            req.AffectedSOPClassUID = CT
            req.AffectedSOPInstanceUID = "1.2.3.4.5"
            req.Priority = 0
            req.DataSet = None
            from pynetdicom.dimse_messages import C_STORE_RQ
            msg = C_STORE_RQ()
            msg.primitive_to_message(req)
            cid = assoc.accepted_contexts[0].context_id
            msg.command_set.CommandDataSetType = 0x0001
            for pdata in msg.encode_msg(cid, 16384):
                assoc.dul.send_pdu(pdata)
            p = P_DATA()
            p.presentation_data_value_list = [[cid, b"\x00" + b"\x00" * 1000]]
            assoc.dul.send_pdu(p)
            import time
            time.sleep(0.3)
            assoc.abort()

        yield in_thread(send_half_then_abort)
        for _ in range(50):
            if not gw.scp.active:
                break
            yield _sleep(0.05)
        self.assertEqual(gw.stored_files(), [])
        yield _sleep(0.2)
        self.assertEqual(partial_files(os.path.join(gw.storage_root, "tmp")), [])


def _sleep(seconds):
    from twisted.internet import reactor, task

    return task.deferLater(reactor, seconds, lambda: None)


class DiskFullTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_full_disk_answers_a700_and_leaves_nothing(self):
        import errno

        from gateway.store import writer as S

        def full(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(S, "_write", full)
        self.patch(S, "_writev", full)
        gw = yield start_gateway(self)
        path = dicomfiles.ct_image(self.mktemp() + ".dcm", rows=64, cols=64)

        def send():
            ae = _ae()
            ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
            assoc = ae.associate("127.0.0.1", gw.port, ae_title="DICOMGW")
            try:
                return assoc.send_c_store(path).Status
            finally:
                assoc.release()

        self.assertEqual((yield in_thread(send)), 0xA700)
        self.assertEqual(gw.stored_files(), [])
        self.assertEqual(partial_files(os.path.join(gw.storage_root, "tmp")), [])
