"""The reclaimer's LoopingCall survives a failing pass."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer, task
from twisted.trial import unittest

from gateway.config import config_from_string
from gateway.ops.reclaimer import Reclaimer


class FlakyDatabase:
    """Fails the first query, then finds nothing to free."""

    def __init__(self):
        self.calls = 0

    def run(self, f, *args):
        self.calls += 1
        if self.calls == 1:
            return defer.fail(RuntimeError("database is locked"))
        return defer.succeed(([], []))


class ReclaimerTests(unittest.TestCase):
    def test_a_failing_pass_is_logged_and_the_next_one_runs(self):
        clock = task.Clock()
        config = config_from_string('[reclaimer]\ninterval = 10\n[[ae]]\ntitle = "X"\n')
        db = FlakyDatabase()
        storage = SimpleNamespace(root=self.mktemp(), pool=None)
        reclaimer = Reclaimer(config, storage, db, clock)
        reclaimer.startService()
        self.addCleanup(reclaimer.stopService)
        self.assertEqual(db.calls, 1)  # the first pass runs at start, and fails
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        clock.advance(10)
        clock.advance(10)
        self.assertEqual(db.calls, 3)
        self.assertTrue(reclaimer.running)
