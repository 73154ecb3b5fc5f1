"""The worker pool: jobs run off the reactor thread, in order, and stop cleanly."""

from __future__ import annotations

import threading

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from gateway.threads import WorkerPool


class WorkerPoolTests(unittest.TestCase):
    def pool(self, threads=2):
        pool = WorkerPool(threads, "test-pool")
        pool.start()
        self.addCleanup(pool.stop)
        return pool

    @inlineCallbacks
    def test_defer_to_thread_pool_gets_the_value_from_a_worker_thread(self):
        pool = self.pool()
        name = yield deferToThreadPool(reactor, pool, lambda: threading.current_thread().name)
        self.assertRegex(name, r"^test-pool-[01]$")
        self.assertNotEqual(name, threading.current_thread().name)

    @inlineCallbacks
    def test_defer_to_thread_pool_gets_the_exception(self):
        pool = self.pool()

        def boom():
            raise OSError(28, "No space left on device")

        with self.assertRaises(OSError) as caught:
            yield deferToThreadPool(reactor, pool, boom)
        self.assertEqual(caught.exception.errno, 28)

    def test_one_thread_runs_jobs_in_submission_order(self):
        pool = WorkerPool(1, "test-pool")
        seen = []
        for n in range(200):
            pool.callInThread(seen.append, n)  # queued before start: run at start
        pool.start()
        pool.stop()  # waits for every job submitted before it
        self.assertEqual(seen, list(range(200)))

    def test_a_job_that_raises_is_logged_and_the_thread_goes_on(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        pool = WorkerPool(1, "test-pool")
        pool.start()
        done = []

        def broken():
            raise ValueError("broken job")

        pool.callInThread(broken)
        pool.callInThread(done.append, "after")
        pool.stop()
        self.assertEqual(done, ["after"])
        failures = [e for e in events if e.get("log_failure") is not None and e.get("pool") == "test-pool"]
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0]["log_failure"].value, ValueError)
        self.flushLoggedErrors(ValueError)

    def test_after_stop_nothing_runs_and_no_thread_is_left(self):
        pool = WorkerPool(3, "test-pool")
        pool.start()
        names = {t.name for t in threading.enumerate()}
        self.assertTrue({"test-pool-0", "test-pool-1", "test-pool-2"} <= names)
        pool.stop()
        ran = []
        pool.callInThread(ran.append, 1)
        pool.start()  # a stopped pool stays stopped
        self.assertEqual(ran, [])
        self.assertFalse([t for t in threading.enumerate() if t.name.startswith("test-pool-")])
        self.assertEqual(pool.queued(), 0)

    def test_queued_counts_jobs_waiting_for_a_thread(self):
        pool = self.pool(1)
        gate = threading.Event()
        started = threading.Event()

        def hold():
            started.set()
            gate.wait(10)

        pool.callInThread(hold)
        started.wait(10)
        pool.callInThread(lambda: None)
        pool.callInThread(lambda: None)
        self.assertEqual(pool.queued(), 2)
        gate.set()

    def test_busy_threads_leave_jobs_in_the_backlog_in_order(self):
        pool = self.pool(2)
        gate = threading.Event()
        running = []
        both = threading.Barrier(3)

        def hold(n):
            running.append(n)
            both.wait(10)  # both threads are busy at once
            gate.wait(10)

        pool.callInThread(hold, 0)
        pool.callInThread(hold, 1)
        both.wait(10)
        self.assertEqual(sorted(running), [0, 1])
        order = []
        done = threading.Event()
        for n in range(5):
            pool.callInThread(order.append, n)
        pool.callInThread(done.set)
        self.assertEqual(pool.queued(), 6)
        gate.set()
        self.assertTrue(done.wait(10))
        self.assertEqual(sorted(order), list(range(5)))
        self.assertEqual(pool.queued(), 0)

    def test_a_job_may_stop_its_own_pool(self):
        pool = WorkerPool(2, "test-pool")
        pool.start()
        stopped = threading.Event()

        def stop_it():
            pool.stop()
            stopped.set()

        pool.callInThread(stop_it)
        self.assertTrue(stopped.wait(10))
        for t in threading.enumerate():
            if t.name.startswith("test-pool-") and t is not threading.current_thread():
                t.join(10)
        self.assertFalse([t for t in threading.enumerate() if t.name.startswith("test-pool-")])

    def test_at_least_one_thread(self):
        with self.assertRaises(ValueError):
            WorkerPool(0, "test-pool")

    def test_a_finished_job_is_not_kept_alive_by_a_waiting_thread(self):
        import gc
        import weakref

        class Payload:
            pass

        pool = self.pool(1)
        payload = Payload()
        ref = weakref.ref(payload)
        done = threading.Event()
        pool.callInThread(lambda p: done.set(), payload)
        self.assertTrue(done.wait(10))
        del payload
        for _ in range(100):  # the thread drops it on its way back to waiting
            gc.collect()
            if ref() is None:
                break
            threading.Event().wait(0.01)
        self.assertIsNone(ref())
