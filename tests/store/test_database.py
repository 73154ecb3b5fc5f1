"""The database's coalesced writes: one transaction per batch, each call isolated."""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from gateway.store.database import Database
from tests.pgtest import Backend, on_postgres


def insert(conn, shared, value):
    conn.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER UNIQUE)")
    conn.execute("INSERT INTO t (v) VALUES (?)", (value,))
    return value


class CoalescedTests(Backend, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        options = self.index_options()
        path = options.get("url") or os.path.join(os.path.abspath(self.mktemp()) + ".sqlite")
        self.db = Database(path, reactor, namespace=options.get("namespace", "dicomgw"),
                           name="test", durable=False)
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
        self.assertIn("unique", str(results[2][1].value).lower())
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
        from gateway.store import database as index

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


CoalescedTestsOnPostgres = on_postgres(CoalescedTests)
