"""Heartbeats and take-over between nodes sharing one index (both back ends)."""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from gateway.store.index import open_index
from gateway.workflow import cluster, pipelines
from tests.pgtest import Backend, on_postgres


def _setup(conn):
    # "dead" was last seen an hour ago; it had an association open, a payload
    # open, a job running and one pending, all under leases long expired.
    conn.execute("INSERT INTO nodes (name, started, seen) VALUES ('dead', 0, "
                 "(SELECT MAX(seen) FROM nodes) - 3600)")
    conn.execute("INSERT INTO associations (id, state, node, started) VALUES ('x1', 'open', 'dead', 1)")
    conn.execute("INSERT INTO instances (association, ae, group_key, state, node, path) "
                 "VALUES ('x1', 'AE', 'k', 'received', 'dead', '/nowhere')")
    conn.execute("INSERT INTO payloads (id, ae, grouping, key, state, node, touches, updated) "
                 "VALUES ('p1', 'AE', 'study', 'k', 'open', 'dead', 2, 5)")
    conn.execute("INSERT INTO payloads (id, ae, grouping, key, state, node, touches) "
                 "VALUES ('p2', 'AE', 'study', 'k2', 'closed', 'dead', 1)")
    conn.execute("INSERT INTO jobs (payload, pipeline, state, attempts, node, lease_until) "
                 "VALUES ('p2', 'x', 'running', 1, 'dead', 0)")
    conn.execute("INSERT INTO jobs (payload, pipeline, state, attempts, node, lease_until) "
                 "VALUES ('p2', 'y', 'pending', 0, 'dead', 0)")


class TakeOverTests(Backend, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        self.db = open_index(root, reactor, durable=False, **self.index_options())
        self.addCleanup(self.db.stop)
        yield self.db.start()

    def rows(self, sql):
        return self.db.run(lambda conn: [tuple(r) for r in conn.execute(sql)])

    @defer.inlineCallbacks
    def test_a_node_not_seen_for_a_lease_loses_its_work_to_a_live_one(self):
        yield self.db.run(cluster._db_beat, "live", 30.0, 100.0, 1, 200.0, 0.0, ())
        yield self.db.run(_setup)
        broken, adopted, taken = yield self.db.run(cluster._db_beat, "live", 30.0, 100.0, 1, 200.0, 0.0, ())
        self.assertEqual(broken, ["x1"])
        self.assertEqual(adopted, [("p1", "AE", "k", 5.0, 2, "open")])
        self.assertEqual(sorted((job, node) for job, _next, node in taken), [(1, "live"), (2, "live")])
        self.assertEqual((yield self.rows("SELECT state FROM associations")), [("broken",)])
        self.assertEqual((yield self.rows("SELECT state FROM instances")), [("aborted",)])
        jobs = yield self.rows("SELECT id, state, node, attempts, reason FROM jobs ORDER BY id")
        self.assertEqual(jobs[0][:4], (1, "pending", "live", 1))
        self.assertIn("dead", jobs[0][4])  # the reason names the node that stopped
        self.assertEqual(jobs[1][:4], (2, "pending", "live", 0))
        # The next attempt is the live node's, counted; the dead one's outcome is refused.
        self.assertEqual((yield self.db.run(pipelines._db_start, 1, 300.0, "live", 30.0)), 2)
        self.assertIsNone((yield self.db.run(pipelines._db_start, 1, 300.0, "other", 30.0)))
        self.assertFalse((yield self.db.run(pipelines._db_end, 1, "done", None, 301.0, None, 0, [], "dead", 1)))
        self.assertTrue((yield self.db.run(pipelines._db_end, 1, "done", None, 302.0, None, 0, [], "live", 2)))
        # A second beat finds nothing more to take; both nodes are listed.
        self.assertEqual((yield self.db.run(cluster._db_beat, "live", 30.0, 100.0, 1, 400.0, 0.0, ())),
                         ([], [], []))
        nodes = yield self.db.run(cluster._db_nodes, 30.0)
        self.assertEqual([(n["node"], n["alive"]) for n in nodes], [("live", True)])  # dead: an hour ago


TakeOverTestsOnPostgres = on_postgres(TakeOverTests)
