"""The reclaimer's LoopingCall survives a failing pass; what a hold keeps."""

from __future__ import annotations

from types import SimpleNamespace

import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from gateway.config import config_from_string
from gateway.ops.reclaimer import Reclaimer, _db_candidates
from gateway.store.index import open_index
from tests.pgtest import Backend, on_postgres
from gateway.testing import RecordingParticipant


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


class HoldTests(Backend, unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_held_payload_is_no_candidate_until_released(self):
        db = open_index(os.path.abspath(self.mktemp()), reactor, durable=False, **self.index_options())
        yield db.start()
        self.addCleanup(db.stop)
        yield db.run(lambda c: c.executemany(
            "INSERT INTO payloads (id, ae, grouping, key, state, created, finished) "
            "VALUES (?, 'X', 'study', ?, 'done', 1, 1)", [("p1", "k1"), ("p2", "k2")]))
        hold = RecordingParticipant()
        hold.held.add("p1")
        payloads, _aborted = yield db.run(_db_candidates, 100.0, 0.0, (hold,))
        self.assertEqual([p["id"] for p in payloads], ["p2"])
        hold.release("p1")
        payloads, _aborted = yield db.run(_db_candidates, 100.0, 0.0, (hold,))
        self.assertEqual(sorted(p["id"] for p in payloads), ["p1", "p2"])


HoldTestsOnPostgres = on_postgres(HoldTests)
