"""The streaming writer: order, durability, failure leaves nothing behind."""

from __future__ import annotations

import errno
import os

from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from gateway.part10 import dataset_offset
from gateway.services import storage as S


class StorageTests(unittest.TestCase):
    def setUp(self):
        self.pool = ThreadPool(1, 2, name="test-disk")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.storage = S.Storage(self.mktemp(), reactor, self.pool, fsync=True)
        self.storage.prepare()

    def begin(self, uid="1.2.3.4"):
        return self.storage.begin(called_ae="AE1", calling_ae="PEER", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                                  sop_instance_uid=uid, transfer_syntax_uid="1.2.840.10008.1.2")

    @defer.inlineCallbacks
    def test_chunks_written_in_order(self):
        w = self.begin()
        chunks = [bytes([i]) * (1000 + i) for i in range(200)]
        for c in chunks:
            w.write(memoryview(c))
        stored = yield w.finish()
        with open(stored.path, "rb") as f:
            data = f.read()
        self.assertEqual(data[dataset_offset(data):], b"".join(chunks))
        self.assertEqual(stored.dataset_size, sum(map(len, chunks)))
        self.assertEqual(stored.path, os.path.join(self.storage.instances_dir, "AE1", "1.2.3.4.dcm"))
        self.assertEqual(w.pending, 0)
        self.assertEqual(os.listdir(self.storage.tmp_dir), [])

    def test_refuses_non_uids(self):
        for bad in ("../x", "1.2/3", "", "1..2", "a.b", "1." * 40):
            self.assertRaises(ValueError, self.begin, bad)

    @defer.inlineCallbacks
    def test_disk_full_is_reported_and_cleaned(self):
        w = self.begin()

        def full(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(S, "_write", full)
        w.write(b"x" * 100)
        with self.assertRaises(S.StorageFull):
            yield w.finish()
        self.assertEqual(os.listdir(self.storage.tmp_dir), [])
        self.assertFalse(os.path.exists(os.path.join(self.storage.instances_dir, "AE1", "1.2.3.4.dcm")))

    @defer.inlineCallbacks
    def test_discard_removes_temporary_file(self):
        w = self.begin()
        w.write(b"y" * 5000)
        w.discard()
        # let the pool run
        for _ in range(100):
            if not w._running and not os.listdir(self.storage.tmp_dir):
                break
            yield _tick()
        self.assertEqual(os.listdir(self.storage.tmp_dir), [])
        self.assertFalse(os.path.exists(w._final))

    def test_prepare_removes_leftovers(self):
        with open(os.path.join(self.storage.tmp_dir, "abc.part"), "wb") as f:
            f.write(b"half an instance")
        self.assertEqual(self.storage.prepare(), 1)
        self.assertEqual(os.listdir(self.storage.tmp_dir), [])


def _tick():
    from twisted.internet import task

    return task.deferLater(reactor, 0.01, lambda: None)
