"""The index database's coalesced writes: one transaction per batch, each call isolated."""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from gateway.services.index import Database


def insert(conn, value):
    conn.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER UNIQUE)")
    conn.execute("INSERT INTO t (v) VALUES (?)", (value,))
    return value


class CoalescedTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.db = Database(os.path.join(os.path.abspath(self.mktemp()) + ".sqlite"), reactor, durable=False)
        yield self.db.start()
        self.addCleanup(self.db.stop)
        yield self.db.run(insert, 0)

    @defer.inlineCallbacks
    def test_calls_while_busy_share_a_transaction_and_fail_alone(self):
        batches = []
        real = self.db._next_batch

        def counting():
            batches.append(len(self.db._batch))
            real()

        self.patch(self.db, "_next_batch", counting)
        # The first call starts a batch at once; the rest queue behind it.
        ds = [self.db.run_coalesced(insert, v) for v in (1, 2, 2, 3)]
        results = yield defer.DeferredList(ds, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, True, False, True])
        self.assertEqual([r for ok, r in results if ok], [1, 2, 3])
        self.assertIn("UNIQUE", str(results[2][1].value))
        self.assertEqual(batches, [1, 3])  # two transactions for four calls
        rows = yield self.db.run(lambda conn: [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v")])
        self.assertEqual(rows, [0, 1, 2, 3])  # the failed call rolled back only itself
