"""The streaming writer: order, durability, failure leaves nothing behind."""

from __future__ import annotations

import errno
import hashlib
import os

from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThreadPool
from twisted.trial import unittest

from gateway.part10 import dataset_offset
from gateway.store import writer as S
from gateway.testing import partial_files
from gateway.threads import WorkerPool


class StorageCase(unittest.TestCase):
    """A Storage under a scratch root, with a real two-thread disk pool."""

    fsync = True

    def setUp(self):
        self.pool = WorkerPool(2, "test-disk")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.storage = S.Storage(self.mktemp(), reactor, self.pool, fsync=self.fsync)
        self.storage.prepare()

    def begin(self, uid="1.2.3.4"):
        return self.storage.begin(called_ae="AE1", calling_ae="PEER", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                                  sop_instance_uid=uid, transfer_syntax_uid="1.2.840.10008.1.2")


class StorageTests(StorageCase):

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
        self.assertEqual(stored.inode, os.stat(stored.path).st_ino)  # for the index
        self.assertEqual(stored.path, os.path.join(self.storage.instances_dir, "AE1", "1.2.3.4.dcm"))
        self.assertEqual(w.pending, 0)
        self.assertEqual(partial_files(self.storage.tmp_dir), [])

    @defer.inlineCallbacks
    def test_hash_from_memory(self):
        # SHA-256 of the whole file, from the bytes as they were written:
        # small, and over several writer jobs.
        def sha256(path):
            with open(path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()

        w = self.begin("1.1")
        w.write(b"a" * 1000)
        stored = yield w.finish()
        self.assertEqual(stored.sha256, sha256(stored.path))

        w = self.begin("1.2")
        for i in range(20):
            w.write(bytes([i]) * 100_000)
            yield task.deferLater(reactor, 0, lambda: None)
        stored = yield w.finish()
        self.assertEqual(stored.sha256, sha256(stored.path))

    @defer.inlineCallbacks
    def test_small_instance_is_written_by_one_job_at_finish(self):
        # Write-behind: below WRITE_BEHIND nothing goes to the pool until
        # finish(), which then writes, closes and renames in one job.
        w = self.begin()
        w.write(b"a" * 1000)
        w.write(b"b" * 1000)
        self.assertFalse(w._running)
        self.assertEqual(partial_files(self.storage.tmp_dir), [])
        jobs = []
        real = self.pool.callInThread
        self.patch(self.pool, "callInThread", lambda *a: jobs.append(a) or real(*a))
        stored = yield w.finish()
        self.assertEqual(len(jobs), 1)
        with open(stored.path, "rb") as f:
            data = f.read()
        self.assertEqual(data[dataset_offset(data):], b"a" * 1000 + b"b" * 1000)
        self.assertEqual(w.pending, 0)

    @defer.inlineCallbacks
    def test_large_instance_is_written_before_finish(self):
        # Memory stays bounded: once WRITE_BEHIND bytes wait, a job starts
        # without waiting for the end of the instance.
        w = self.begin()
        chunk = b"z" * 65536
        n = S.WRITE_BEHIND // len(chunk) + 1
        for _ in range(n):
            w.write(chunk)
        self.assertTrue(w._running)
        for _ in range(200):
            if w.pending < S.WRITE_BEHIND:
                break
            yield _tick()
        self.assertLess(w.pending, S.WRITE_BEHIND)
        self.assertEqual(len(partial_files(self.storage.tmp_dir)), 1)
        stored = yield w.finish()
        self.assertEqual(stored.dataset_size, n * len(chunk))
        self.assertEqual(w.pending, 0)

    @defer.inlineCallbacks
    def test_the_running_job_takes_what_is_queued_meanwhile(self):
        # The last fragments and the finish, queued while a job writes, are
        # handled by that job: no second trip through the pool.
        import threading

        started, release = threading.Event(), threading.Event()
        real_write = S._write

        def slow_write(fd, data):
            started.set()
            release.wait(10)
            return real_write(fd, data)

        self.patch(S, "_write", slow_write)
        w = self.begin()
        jobs = []
        real = self.pool.callInThread
        self.patch(self.pool, "callInThread", lambda *a: jobs.append(a) or real(*a))
        w.write(b"x" * S.WRITE_BEHIND)
        self.assertTrue(started.wait(10))  # the job is writing
        w.write(b"y" * 100)
        finished = w.finish()
        release.set()
        stored = yield finished
        self.assertEqual(len(jobs), 1)
        with open(stored.path, "rb") as f:
            data = f.read()
        self.assertEqual(data[dataset_offset(data):], b"x" * S.WRITE_BEHIND + b"y" * 100)

    @defer.inlineCallbacks
    def test_a_job_that_raises_ends_the_instance_without_retrying(self):
        jobs = []

        def broken(writer):
            jobs.append(writer)
            raise RuntimeError("bug")

        w = self.begin()
        self.patch(S.InstanceWriter, "_drain", broken)
        drained = []
        w.on_drained = drained.append
        w.write(b"x" * S.WRITE_BEHIND)
        for _ in range(50):
            if drained:
                break
            yield _tick()
        self.assertEqual((len(jobs), w.pending), (1, 0))  # a paused peer is resumed
        w.write(b"y" * 10)  # dropped
        with self.assertRaises(RuntimeError):
            yield w.finish()
        self.assertEqual(len(jobs), 2)

    def test_refuses_non_uids(self):
        for bad in ("../x", "1.2/3", "", "1..2", "a.b", "1." * 40):
            self.assertRaises(ValueError, self.begin, bad)

    def test_refuses_an_ae_directory_outside_the_root(self):
        for ae in ("..", "../elsewhere", "/abs"):
            self.assertRaises(ValueError, self.storage.path_for, ae, "1.2.3")
        # Checked once per AE title, and the answer does not change.
        inside = os.path.join(self.storage.instances_dir, "AE1", "1.2.3.dcm")
        self.assertEqual(self.storage.path_for("AE1", "1.2.3"), inside)
        self.assertEqual(self.storage.path_for("AE1", "1.2.3"), inside)
        self.assertRaises(ValueError, self.storage.path_for, "..", "1.2.3")

    @defer.inlineCallbacks
    def test_disk_full_is_reported_and_cleaned(self):
        w = self.begin()

        def full(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(S, "_write", full)
        w.write(b"x" * 100)
        with self.assertRaises(S.StorageFull):
            yield w.finish()
        self.assertEqual(partial_files(self.storage.tmp_dir), [])
        self.assertFalse(os.path.exists(os.path.join(self.storage.instances_dir, "AE1", "1.2.3.4.dcm")))

    @defer.inlineCallbacks
    def test_discard_removes_temporary_file(self):
        w = self.begin()
        w.write(b"y" * 5000)
        w.discard()
        # let the pool run
        for _ in range(100):
            if not w._running and not partial_files(self.storage.tmp_dir):
                break
            yield _tick()
        self.assertEqual(partial_files(self.storage.tmp_dir), [])
        self.assertFalse(os.path.exists(w._final))

    def test_prepare_removes_leftovers(self):
        with open(os.path.join(self.storage.tmp_dir, "abc.part"), "wb") as f:
            f.write(b"half an instance")
        self.assertEqual(self.storage.prepare(), 1)
        self.assertEqual(os.listdir(self.storage.tmp_dir), [S.RESERVE_FILE])  # and the databases' reserve
        self.assertEqual(os.path.getsize(os.path.join(self.storage.tmp_dir, S.RESERVE_FILE)),
                         self.storage.reserve.size)


def _tick():
    from twisted.internet import task

    return task.deferLater(reactor, 0.01, lambda: None)


class RecordTests(StorageCase):
    """finish() fires with the complete record: digest and header attributes included."""

    fsync = False

    @defer.inlineCallbacks
    def test_the_header_is_picked_out_of_the_first_bytes_in_the_pool(self):
        import threading

        from gateway.store import header

        seen = []
        real = header.header_attributes

        def recording(path, head, transfer_syntax, complete):
            seen.append((path, bytes(head), transfer_syntax, complete, threading.current_thread().name))
            return real(path, head, transfer_syntax, complete)

        self.patch(S, "header_attributes", recording)
        w = self.begin()
        w.write(b"\x10\x00\x20\x00\x04\x00\x00\x00PAT1")  # (0010,0020) Patient ID, implicit VR
        stored = yield w.finish()
        self.assertEqual((stored.attributes["patient_id"], stored.attributes["header_error"]), ("PAT1", ""))
        [(path, head, transfer_syntax, complete, thread)] = seen
        self.assertEqual(path, stored.path)
        # The data set's first bytes, without our meta header: all of them here.
        self.assertEqual((head, transfer_syntax, complete),
                         (b"\x10\x00\x20\x00\x04\x00\x00\x00PAT1", "1.2.840.10008.1.2", True))
        self.assertNotEqual(thread, threading.current_thread().name)  # in the pool, not the reactor

    @defer.inlineCallbacks
    def test_only_the_first_bytes_of_a_big_data_set_are_kept(self):
        seen = []
        self.patch(S, "header_attributes", lambda path, head, ts, complete: seen.append((bytes(head), complete)))
        w = self.begin()
        for i in range(3):  # three writer jobs' worth
            w.write(bytes([65 + i]) * S.WRITE_BEHIND)
        yield w.finish()
        [(head, complete)] = seen
        self.assertEqual(head, b"A" * S.HEAD_BYTES)
        self.assertFalse(complete)


def tmp_names(storage):
    """What is in tmp/ but the databases' reserve."""
    return sorted(n for n in os.listdir(storage.tmp_dir) if n != S.RESERVE_FILE)


class SpareTests(StorageCase):
    """Temporary files made ahead of need, so that a writer does not wait to create one."""

    fsync = False

    @defer.inlineCallbacks
    def settled(self):
        """Wait for the job that stored an instance to make the spares."""
        for _ in range(500):
            if len(self.storage.spares._ready) == S.SPARES:
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail("the spares were never made")

    @defer.inlineCallbacks
    def test_writers_take_spares_and_storing_tops_them_up(self):
        self.assertEqual(len(self.storage.spares._ready), 0)
        w = self.begin("1.2.3.1")  # the first instance finds none ready and makes its own file
        w.write(b"a" * 10)
        yield w.finish()
        yield self.settled()  # ... and then the spares
        ready = [path for path, _fd in self.storage.spares._ready]
        self.assertEqual(tmp_names(self.storage), sorted(os.path.basename(p) for p in ready))
        self.assertEqual(partial_files(self.storage.tmp_dir), [])  # empty spares are not partial files

        w = self.begin("1.2.3.2")
        w.write(b"b" * 10)
        stored = yield w.finish()
        with open(stored.path, "rb") as f:
            self.assertTrue(f.read().endswith(b"b" * 10))
        yield self.settled()  # topped up again
        left = set(tmp_names(self.storage))
        self.assertEqual(len(left & {os.path.basename(p) for p in ready}), len(ready) - 1)  # one was used

        # A discarded instance removes the spare it took, data and all.
        w = self.begin("1.2.3.3")
        w.write(b"c" * (S.WRITE_BEHIND + 1))
        while w._running or w.pending:
            yield _tick()
        self.assertEqual(len(partial_files(self.storage.tmp_dir)), 1)
        w.discard()
        while w._running:
            yield _tick()
        self.assertEqual(partial_files(self.storage.tmp_dir), [])

        yield self.storage.spares.close()
        self.assertEqual(tmp_names(self.storage), [])
        w = self.begin("1.2.3.4")
        w.write(b"d")
        yield w.finish()
        for _ in range(10):
            yield _tick()
        self.assertEqual(tmp_names(self.storage), [])  # none made once closed
        self.assertEqual(len(self.storage.spares._ready), 0)

    @defer.inlineCallbacks
    def test_a_spare_made_while_closing_is_not_kept(self):
        spares = self.storage.spares
        real = S._create

        def create_then_close(path):
            fd = real(path)
            spares._closed = True  # close() ran while this file was being made
            return fd

        self.patch(S, "_create", create_then_close)
        yield deferToThreadPool(reactor, self.pool, spares.top_up)
        self.assertEqual(len(spares._ready), 0)
        self.assertEqual(tmp_names(self.storage), [])

    @defer.inlineCallbacks
    def test_a_spare_that_cannot_be_made_is_not_an_error(self):
        def refuse(path):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(S, "_create", refuse)
        w = self.begin("1.2.3.5")
        w.write(b"x")
        with self.assertRaises(S.StorageFull):
            yield w.finish()
        self.assertEqual(len(self.storage.spares._ready), 0)


class DirectoryTests(StorageCase):
    @defer.inlineCallbacks
    def test_an_ae_directory_is_made_when_missing_even_after_it_was_removed(self):
        import shutil

        calls = []
        real = S.fsync_dir
        self.patch(S, "fsync_dir", lambda path: calls.append(path) or real(path))
        w = self.begin("1.2.3.1")
        w.write(b"a")
        stored = yield w.finish()
        ae_dir = os.path.dirname(stored.path)
        # fsync: the new AE directory's entry in instances/, then the file's in it.
        self.assertEqual(calls, [self.storage.instances_dir, ae_dir])
        shutil.rmtree(ae_dir)  # by hand, say
        w = self.begin("1.2.3.2")
        w.write(b"b")
        stored = yield w.finish()
        self.assertTrue(os.path.exists(stored.path))
        self.assertEqual(partial_files(self.storage.tmp_dir), [])
