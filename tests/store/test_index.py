"""The index database's coalesced writes: one transaction per batch, each call isolated."""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from gateway.store.index import Database, header_attributes


def insert(conn, shared, value):
    conn.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER UNIQUE)")
    conn.execute("INSERT INTO t (v) VALUES (?)", (value,))
    return value


class CoalescedTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.db = Database(os.path.join(os.path.abspath(self.mktemp()) + ".sqlite"), reactor, durable=False)
        yield self.db.start()
        self.addCleanup(self.db.stop)
        yield self.db.run(insert, {}, 0)

    def count_batches(self):
        batches = []
        real = self.db._next_batch

        def counting():
            batches.append(len(self.db._batch))
            real()

        self.patch(self.db, "_next_batch", counting)
        return batches

    @defer.inlineCallbacks
    def test_calls_close_together_share_a_transaction_and_fail_alone(self):
        batches = self.count_batches()
        ds = [self.db.run_coalesced(insert, v) for v in (1, 2, 2, 3)]
        self.assertEqual(batches, [])  # waiting for company
        results = yield defer.DeferredList(ds, consumeErrors=True)  # the delay is up
        self.assertEqual([ok for ok, _ in results], [True, True, False, True])
        self.assertEqual([r for ok, r in results if ok], [1, 2, 3])
        self.assertIn("UNIQUE", str(results[2][1].value))
        self.assertEqual(batches, [4])  # one transaction for four calls
        rows = yield self.db.run(lambda conn: [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v")])
        self.assertEqual(rows, [0, 1, 2, 3])  # the failed call rolled back only itself

    @defer.inlineCallbacks
    def test_calls_of_a_batch_share_a_dict_unless_one_fails(self):
        dicts = []

        def noting(conn, shared, value):
            dicts.append(shared)
            shared[value] = True
            return insert(conn, shared, value)

        yield defer.gatherResults([self.db.run_coalesced(noting, v) for v in (1, 2)])
        self.assertIs(dicts[0], dicts[1])
        self.assertEqual(dicts[0], {1: True, 2: True})
        # 4 fails (a duplicate): the batch is undone and each call runs again alone.
        del dicts[:]
        results = yield defer.DeferredList([self.db.run_coalesced(noting, v) for v in (3, 4, 4, 5)],
                                           consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, True, False, True])
        self.assertEqual(len(dicts), 3 + 4)  # up to the failure, then one each
        self.assertEqual(len({id(d) for d in dicts[3:]}), 4)
        self.assertEqual([d for d in dicts[3:]], [{3: True}, {4: True}, {4: True}, {5: True}])
        rows = yield self.db.run(lambda conn: [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v")])
        self.assertEqual(rows, [0, 1, 2, 3, 4, 5])

    @defer.inlineCallbacks
    def test_flush_and_a_full_batch_go_at_once_and_later_calls_follow(self):
        from gateway.store import index

        batches = self.count_batches()
        first = self.db.run_coalesced(insert, 10)
        self.db.flush()
        self.assertEqual(batches, [1])
        # While that batch commits, calls gather; they go as soon as it is done.
        later = [self.db.run_coalesced(insert, v) for v in (11, 12)]
        yield first
        yield defer.gatherResults(later)
        self.assertEqual(batches, [1, 2])
        self.patch(index, "COALESCE_MAX", 3)
        full = [self.db.run_coalesced(insert, v) for v in (13, 14, 15)]
        self.assertEqual(batches, [1, 2, 3])
        yield defer.gatherResults(full)
        self.assertIsNone(self.db._batch_timer)


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


class ReadHeaderTests(unittest.TestCase):
    def test_the_writers_figures_with_attributes_given_or_read(self):
        from gateway.store.index import read_header
        from tests import dicomfiles

        path = dicomfiles.ct_image(self.mktemp(), rows=8, cols=8, patient_id="P7")
        known = {"sha256": "ab" * 32, "size": 123, "inode": 456}
        got = read_header(path, known, {"patient_id": "given"})
        self.assertEqual(got, {"patient_id": "given", **known})
        # Without attributes from the writer, the file's header is read.
        got = read_header(path, known)
        self.assertEqual((got["patient_id"], got["sha256"], got["size"], got["inode"]),
                         ("P7", "ab" * 32, 123, 456))
