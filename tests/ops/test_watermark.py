"""The storage watermark: thresholds, and a probe loop that survives its errors."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from gateway.config import config_from_string
from gateway.ops.watermark import GIB, Watermark, congestion, usage


class St:
    def __init__(self, blocks, free, frsize=1 << 20):
        self.f_frsize, self.f_blocks, self.f_bfree, self.f_bavail = frsize, blocks, free, free


class ThresholdTests(unittest.TestCase):
    def test_usage_and_congestion(self):
        percent, free = usage(St(1000, 250))
        self.assertEqual((percent, free), (75.0, 250 << 20))
        self.assertIn("watermark 75%", congestion(percent, free, 75, 0))
        self.assertIsNone(congestion(74.9, 10 * GIB, 75, 5))
        self.assertIn("reserve 5 GiB", congestion(10, 4 * GIB, 75, 5))
        self.assertIsNone(congestion(10, 5 * GIB, 75, 5))


class SCP:
    def __init__(self):
        self.congestion = None
        self.disk_full = False
        self.config = config_from_string('[storage]\nwatermark_percent = 75\nreserved_gb = 0\n'
                                         'check_interval = 10\n[[ae]]\ntitle = "A"\n')


class ProbeTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_probe_errors_are_logged_and_the_state_kept(self):
        from twisted.internet import reactor
        from gateway.threads import WorkerPool

        pool = WorkerPool(1, "test-disk")
        pool.start()
        self.addCleanup(pool.stop)
        scp = SCP()
        answers = [St(100, 10), OSError("statvfs failed"), St(100, 90)]

        def statvfs(path):
            a = answers.pop(0)
            if isinstance(a, Exception):
                raise a
            return a

        w = Watermark(scp, "/nonexistent", reactor, pool, statvfs=statvfs)
        yield w.probe()
        self.assertIn("90.0% used", scp.congestion)
        # GET /health reports it (IHealthCheck)
        self.assertEqual(w.health_problems(), ["storage over the watermark: " + scp.congestion])
        yield w.probe()  # fails: logged, not raised, state kept
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertIn("90.0% used", scp.congestion)
        yield w.probe()
        self.assertIsNone(scp.congestion)
        self.assertEqual(w.health_problems(), [])
