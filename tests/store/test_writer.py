"""The streaming writer: order, durability, where the work runs, failure leaves nothing behind."""

from __future__ import annotations

import errno
import hashlib
import os
import threading

import blake3
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from gateway.part10 import dataset_offset
from gateway.store import files
from gateway.store import spares as SP
from gateway.store import writer as S
from gateway.testing import finished, partial_files
from gateway.threads import WorkerPool


def _tick():
    return task.deferLater(reactor, 0.01, lambda: None)


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


class StorageCase(unittest.TestCase):
    """A Storage under a scratch root, with a real two-thread disk pool whose jobs are counted."""

    fsync = True
    digest = "blake3"

    def setUp(self):
        self.pool = WorkerPool(2, "test-disk")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.storage = S.Storage(self.mktemp(), reactor, self.pool, fsync=self.fsync, digest=self.digest)
        self.storage.prepare()
        self.jobs = []
        real = self.pool.callInThread
        self.patch(self.pool, "callInThread", lambda f, *a: self.jobs.append(f) or real(f, *a))

    def begin(self, uid="1.2.3.4", pooled=False):
        """A writer; ``pooled`` makes it write in the disk pool (as when the disk is slow)."""
        if pooled:
            self.storage.slow_until = reactor.seconds() + 3600
        try:
            return self.storage.begin(called_ae="AE1", calling_ae="PEER",
                                      sop_class_uid="1.2.840.10008.5.1.4.1.1.7", sop_instance_uid=uid,
                                      transfer_syntax_uid="1.2.840.10008.1.2")
        finally:
            self.storage.slow_until = 0.0

    @defer.inlineCallbacks
    def spares_ready(self, count=SP.SPARES):
        """Wait until ``count`` spares are made: the next writer is direct,
        and its taking one starts no job."""
        self.storage.spares.fill()
        for _ in range(500):
            if len(self.storage.spares._ready) >= count:
                self.jobs.clear()
                return
            yield _tick()
        self.fail("the spares were never made")

    def writer_jobs(self):
        return list(self.jobs)


class PooledTests(StorageCase):
    """Writers in the disk pool: no spare was ready, or the disk is slow."""

    @defer.inlineCallbacks
    def test_chunks_written_in_order(self):
        w = self.begin(pooled=True)
        chunks = [bytes([i]) * (1000 + i) for i in range(200)]
        for c in chunks:
            w.write(memoryview(c))
        stored = yield finished(w)
        data = file_bytes(stored.path)
        self.assertEqual(data[dataset_offset(data):], b"".join(chunks))
        self.assertEqual(stored.dataset_size, sum(map(len, chunks)))
        self.assertEqual(stored.inode, os.stat(stored.path).st_ino)  # for the index
        self.assertEqual(stored.path, os.path.join(self.storage.instances_dir, "AE1", "1.2.3.4.dcm"))
        self.assertEqual(w.pending, 0)
        self.assertEqual(partial_files(self.storage.tmp_dir), [])

    @defer.inlineCallbacks
    def test_small_instance_is_written_by_one_job_at_finish(self):
        # Write-behind: below WRITE_BEHIND nothing goes to the pool until
        # finish(), which then writes, closes and renames in one job.
        w = self.begin(pooled=True)
        w.write(b"a" * 1000)
        w.write(b"b" * 1000)
        self.assertFalse(w._running)
        self.assertEqual(partial_files(self.storage.tmp_dir), [])
        self.jobs.clear()
        stored = yield finished(w)
        self.assertEqual(len(self.writer_jobs()), 1)
        data = file_bytes(stored.path)
        self.assertEqual(data[dataset_offset(data):], b"a" * 1000 + b"b" * 1000)
        self.assertEqual(w.pending, 0)

    @defer.inlineCallbacks
    def test_large_instance_is_written_before_finish(self):
        # Memory stays bounded: once WRITE_BEHIND bytes wait, a job starts
        # without waiting for the end of the instance.
        w = self.begin(pooled=True)
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
        stored = yield finished(w)
        self.assertEqual(stored.dataset_size, n * len(chunk))
        self.assertEqual(w.pending, 0)

    @defer.inlineCallbacks
    def test_the_running_job_takes_what_is_queued_meanwhile(self):
        # The last fragments and the finish, queued while a job writes, are
        # handled by that job: no second trip through the pool.
        started, release = threading.Event(), threading.Event()
        real_write = S._write

        def slow_write(fd, data):
            started.set()
            release.wait(10)
            return real_write(fd, data)

        self.patch(S, "_write", slow_write)
        w = self.begin(pooled=True)
        self.jobs.clear()
        w.write(b"x" * S.WRITE_BEHIND)
        self.assertTrue(started.wait(10))  # the job is writing
        w.write(b"y" * 100)
        done = finished(w)
        release.set()
        stored = yield done
        self.assertEqual(len(self.writer_jobs()), 1)
        data = file_bytes(stored.path)
        self.assertEqual(data[dataset_offset(data):], b"x" * S.WRITE_BEHIND + b"y" * 100)

    @defer.inlineCallbacks
    def test_a_job_that_raises_ends_the_instance_without_retrying(self):
        calls = []

        def broken(writer):
            calls.append(writer)
            raise RuntimeError("bug")

        w = self.begin(pooled=True)
        self.patch(S.InstanceWriter, "_drain", broken)
        drained = []
        w.on_drained = drained.append
        w.write(b"x" * S.WRITE_BEHIND)
        for _ in range(50):
            if drained:
                break
            yield _tick()
        self.assertEqual((len(calls), w.pending), (1, 0))  # a paused peer is resumed
        w.write(b"y" * 10)  # dropped
        with self.assertRaises(RuntimeError):
            yield finished(w)
        self.assertEqual(len(calls), 2)

    @defer.inlineCallbacks
    def test_disk_full_is_reported_and_cleaned(self):
        w = self.begin(pooled=True)

        def full(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(S, "_write", full)
        self.patch(S, "_writev", full)
        w.write(b"x" * 100)
        with self.assertRaises(S.StorageFull):
            yield finished(w)
        self.assertEqual(partial_files(self.storage.tmp_dir), [])
        self.assertFalse(os.path.exists(os.path.join(self.storage.instances_dir, "AE1", "1.2.3.4.dcm")))

    @defer.inlineCallbacks
    def test_discard_removes_temporary_file(self):
        w = self.begin(pooled=True)
        w.write(b"y" * (S.WRITE_BEHIND + 5000))
        w.discard()
        for _ in range(100):
            if not w._running and not partial_files(self.storage.tmp_dir):
                break
            yield _tick()
        self.assertEqual(partial_files(self.storage.tmp_dir), [])
        self.assertFalse(os.path.exists(w._final))

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

    def test_prepare_removes_leftovers(self):
        with open(os.path.join(self.storage.tmp_dir, "abc.part"), "wb") as f:
            f.write(b"half an instance")
        self.assertEqual(self.storage.prepare(), 1)
        self.assertEqual(os.listdir(self.storage.tmp_dir), [S.RESERVE_FILE])  # and the databases' reserve
        self.assertEqual(os.path.getsize(os.path.join(self.storage.tmp_dir, S.RESERVE_FILE)),
                         self.storage.reserve.size)


class DirectTests(StorageCase):
    """With a spare ready and fsync off, everything runs on the reactor as the data come."""

    fsync = False

    @defer.inlineCallbacks
    def test_writes_and_the_rename_happen_at_once_with_no_pool_job(self):
        yield self.spares_ready()
        w = self.begin()
        self.assertTrue(w._direct)
        w.write(b"a" * 1000)
        w.write(memoryview(b"b" * 70000))
        # On disk already, in the spare the writer took (the header went with the first bytes).
        self.assertEqual(os.path.getsize(w._tmp) - w._header_len, 71000)
        self.assertEqual(os.stat(w._tmp).st_ino, w._inode)
        outcome = []
        w.finish(outcome.append)
        [stored] = outcome  # before finish() returned
        data = file_bytes(stored.path)
        self.assertEqual(data[dataset_offset(data):], b"a" * 1000 + b"b" * 70000)
        self.assertEqual(self.writer_jobs(), [])
        self.assertEqual(partial_files(self.storage.tmp_dir), [])
        self.assertEqual(w.pending, 0)

    @defer.inlineCallbacks
    def test_a_slow_write_sends_the_next_writers_to_the_pool_for_a_while(self):
        yield self.spares_ready()
        clock = iter([0.0, S.SLOW * 3] + [100.0] * 10)
        self.patch(S, "_clock", lambda: next(clock))
        events = []
        from twisted.logger import globalLogPublisher

        observer = events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        w = self.storage.begin(called_ae="AE1", calling_ae="PEER", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                               sop_instance_uid="1.2.3.1", transfer_syntax_uid="1.2.840.10008.1.2")
        self.assertTrue(w._direct)
        w.write(b"x")  # written with the header: the slow one
        self.assertGreater(self.storage.slow_until, reactor.seconds())
        [slow] = [e for e in events if e.get("event") == "storage.slow"]
        self.assertIn("writing took", slow["why"])
        later = self.storage.begin(called_ae="AE1", calling_ae="PEER", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                                   sop_instance_uid="1.2.3.2", transfer_syntax_uid="1.2.840.10008.1.2")
        self.assertFalse(later._direct)
        self.storage.slow_until = 0.0
        self.assertTrue(self.begin("1.2.3.3")._direct)  # and back once the disk is quick again
        for x in (w, later):
            x.discard()

    def test_disk_work_adding_up_within_a_second_counts_as_slow_and_a_hiccup_does_not(self):
        self.storage.timed(S.SLOW / 2, "writing")  # a hiccup
        self.storage.timed(0.0005, "writing")
        self.assertEqual(self.storage.slow_until, 0.0)
        for _ in range(int(S.BUSY / 0.01) + 1):  # 10 ms after 10 ms, in the same second
            self.storage.timed(0.01, "writing")
        self.assertGreater(self.storage.slow_until, reactor.seconds())

    @defer.inlineCallbacks
    def test_disk_full_is_reported_and_cleaned(self):
        yield self.spares_ready()
        w = self.begin()

        def full(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(S, "_write", full)
        self.patch(S, "_writev", full)
        w.write(b"x" * 100)
        w.write(b"y" * 100)  # dropped
        outcome = []
        w.finish(outcome.append)
        self.assertIsInstance(outcome[0], S.StorageFull)
        self.assertEqual(partial_files(self.storage.tmp_dir), [])
        self.assertFalse(os.path.exists(w._final))

    @defer.inlineCallbacks
    def test_discard_removes_the_spare_it_wrote_to(self):
        yield self.spares_ready()
        w = self.begin()
        w.write(b"c" * 5000)
        self.assertEqual(len(partial_files(self.storage.tmp_dir)), 1)
        w.discard()
        while w._running:
            yield _tick()
        self.assertEqual(partial_files(self.storage.tmp_dir), [])


class FsyncTests(StorageCase):
    """fsync on: the writes are direct, one pool job fsyncs, renames and fsyncs the directory."""

    @defer.inlineCallbacks
    def test_one_job_puts_the_file_in_place_durably(self):
        yield self.spares_ready()
        synced = []
        real_fsync, real_dir = os.fsync, S.fsync_dir
        self.patch(S.os, "fsync", lambda fd: synced.append(("file", threading.current_thread().name))
                   or real_fsync(fd))
        self.patch(S, "fsync_dir", lambda path: synced.append(("dir", os.path.basename(path))) or real_dir(path))
        real_kept = self.storage.fsync_directory
        self.patch(self.storage, "fsync_directory",
                   lambda path: synced.append(("dir", os.path.basename(path))) or real_kept(path))
        w = self.begin()
        self.assertTrue(w._direct)
        w.write(b"z" * 300000)
        self.assertEqual(self.writer_jobs(), [])  # written from the reactor
        stored = yield finished(w)
        self.assertEqual(len(self.writer_jobs()), 1)
        # The file, then (its AE directory being new) instances/ and AE1; each
        # directory fsync is an os.fsync of its own.
        self.assertEqual([k for k, _ in synced], ["file", "dir", "file", "dir", "file"])
        self.assertEqual([name for k, name in synced if k == "dir"], ["instances", "AE1"])
        reactor_thread = threading.current_thread().name
        self.assertNotIn(reactor_thread, [name for k, name in synced if k == "file"])  # never on the reactor
        self.assertEqual(file_bytes(stored.path)[-300000:], b"z" * 300000)


class DigestTests(StorageCase):
    """Every file's digest, from the bytes as written, as "<algorithm>:<hex>"."""

    fsync = False

    @defer.inlineCallbacks
    def check(self, algorithm, pooled):
        self.storage.digest = algorithm
        if not pooled:
            yield self.spares_ready()
        w = self.begin(f"1.{len(algorithm)}.{int(pooled)}", pooled=pooled)
        for i in range(12):
            w.write(bytes([i]) * 100_000)
            if pooled:
                yield task.deferLater(reactor, 0, lambda: None)  # over several writer jobs
        stored = yield finished(w)
        data = file_bytes(stored.path)
        expected = {"blake3": lambda: "blake3:" + blake3.blake3(data).hexdigest(),
                    "sha256": lambda: "sha256:" + hashlib.sha256(data).hexdigest(),
                    "none": lambda: ""}[algorithm]()
        self.assertEqual(stored.digest, expected, (algorithm, pooled))

    @defer.inlineCallbacks
    def test_each_algorithm_direct_and_pooled(self):
        for algorithm in S.DIGESTS:
            for pooled in (False, True):
                yield self.check(algorithm, pooled)


class RecordTests(StorageCase):
    """The record keeps the first bytes of the data set, for the index."""

    fsync = False

    @defer.inlineCallbacks
    def test_the_first_bytes_of_the_data_set_without_our_meta_header(self):
        w = self.begin()
        w.write(b"\x10\x00\x20\x00\x04\x00\x00\x00PAT1")  # (0010,0020) Patient ID, implicit VR
        stored = yield finished(w)
        self.assertEqual(stored.head, b"\x10\x00\x20\x00\x04\x00\x00\x00PAT1")

    @defer.inlineCallbacks
    def test_only_the_first_bytes_of_a_big_data_set_are_kept(self):
        for pooled in (False, True):
            if not pooled:
                yield self.spares_ready()
            w = self.begin(f"1.2.{int(pooled)}", pooled=pooled)
            for i in range(3):
                w.write(bytes([65 + i]) * (S.HEAD_BYTES // 2 + 1))
            stored = yield finished(w)
            self.assertEqual(stored.head, b"A" * (S.HEAD_BYTES // 2 + 1) + b"B" * (S.HEAD_BYTES // 2 - 1))


def tmp_names(storage):
    """What is in tmp/ but the databases' reserve."""
    return sorted(n for n in os.listdir(storage.tmp_dir) if n != S.RESERVE_FILE)


class SpareTests(StorageCase):
    """Temporary files made ahead of need, a batch per disk pool job."""

    fsync = False

    @defer.inlineCallbacks
    def test_a_writer_takes_a_spare_and_a_pool_job_makes_the_next_batch(self):
        spares = self.storage.spares
        made_in = []
        real_create = files.create_exclusive
        self.patch(files, "create_exclusive", lambda path: made_in.append(threading.current_thread()) or real_create(path))
        self.assertEqual(len(spares._ready), 0)
        w = self.begin("1.2.3.1")  # none ready: pooled, and its taking starts a batch
        self.assertFalse(w._direct)
        w.write(b"a" * 10)
        yield finished(w)
        yield self.spares_ready(SP.SPARES)
        self.assertNotIn(threading.main_thread(), made_in)  # never on the reactor
        ready = [path for path, _fd, _inode in spares._ready]
        self.assertEqual(tmp_names(self.storage), sorted(os.path.basename(p) for p in ready))
        self.assertEqual(partial_files(self.storage.tmp_dir), [])  # empty spares are not partial files

        w = self.begin("1.2.5")
        self.assertTrue(w._direct)
        self.assertEqual(w._tmp, ready[0])
        w.write(b"b" * 10)
        outcome = []
        w.finish(outcome.append)
        self.assertTrue(file_bytes(outcome[0].path).endswith(b"b" * 10))
        self.assertEqual(len(spares._ready), SP.SPARES - 1)
        self.assertEqual(self.jobs, [])  # more than half are left: no batch yet
        taken = [spares.take() for _ in range(SP.SPARES // 2 - 1)]
        self.assertEqual(len(self.jobs), 1)  # half used: one job makes the batch
        SP._discard_spares(taken)
        yield self.spares_ready(SP.SPARES)

        yield spares.close()
        self.assertEqual(tmp_names(self.storage), [])
        w = self.begin("1.2.3.4")
        w.write(b"d")
        yield finished(w)
        for _ in range(3):
            yield _tick()
        self.assertEqual(tmp_names(self.storage), [])  # none made once closed
        self.assertEqual(len(spares._ready), 0)

    @defer.inlineCallbacks
    def test_a_batch_that_arrives_after_close_is_removed(self):
        spares = self.storage.spares
        spares.take()  # a batch is being made
        yield spares.close()
        for _ in range(50):
            if not spares._making and not tmp_names(self.storage):
                break
            yield _tick()
        self.assertEqual(tmp_names(self.storage), [])
        self.assertEqual(len(spares._ready), 0)

    @defer.inlineCallbacks
    def test_a_spare_that_cannot_be_made_is_not_an_error(self):
        def refuse(path):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(files, "create_exclusive", refuse)
        w = self.begin("1.2.3.5")
        w.write(b"x")
        with self.assertRaises(S.StorageFull):
            yield finished(w)
        self.assertEqual(len(self.storage.spares._ready), 0)


class DirectoryTests(StorageCase):
    @defer.inlineCallbacks
    def test_an_ae_directory_is_made_when_missing_even_after_it_was_removed(self):
        import shutil

        calls = []
        real = S.fsync_dir
        self.patch(S, "fsync_dir", lambda path: calls.append(path) or real(path))
        real_kept = self.storage.fsync_directory
        self.patch(self.storage, "fsync_directory", lambda path: calls.append(path) or real_kept(path))
        w = self.begin("1.2.3.1")
        w.write(b"a")
        stored = yield finished(w)
        ae_dir = os.path.dirname(stored.path)
        # fsync: the new AE directory's entry in instances/, then the file's in it.
        self.assertEqual(calls, [self.storage.instances_dir, ae_dir])
        shutil.rmtree(ae_dir)  # by hand, say
        yield self.spares_ready()
        w = self.begin("1.2.3.2")
        w.write(b"b")
        stored = yield finished(w)
        self.assertTrue(os.path.exists(stored.path))
        self.assertEqual(partial_files(self.storage.tmp_dir), [])
        # The directory kept open for fsync is the new one, not the removed one.
        self.assertEqual(os.fstat(self.storage._dir_fds[ae_dir]).st_ino, os.stat(ae_dir).st_ino)
