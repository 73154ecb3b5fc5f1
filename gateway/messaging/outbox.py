"""The outbox: messages recorded in the index database, then published.

A workflow request is written into the ``outbox`` table by the transaction
that closes its payload (:func:`db_record`, called on the database thread
inside that transaction), so a payload is never closed without its request
nor the request sent for a payload that did not close.  Export completes are
recorded the same way, in the transaction that settles their export request.

:class:`Outbox` publishes the ``waiting`` rows in the order they were
recorded (``seq``), up to :data:`WINDOW` at a time on the broker's confirmed
channel, and marks each ``sent`` only once the broker confirmed it.  What was
not confirmed (the broker went away, the process was killed) stays waiting
and is published again, with the same ``message_id``, when the broker is
back or at the next start; consumers de-duplicate on it.

The ``outbox`` table is in the index database; its schema, with the
index's, is in :mod:`gateway.store.index`.
"""

from __future__ import annotations

from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.logger import Logger

from gateway.messaging.monai import Message
from gateway.store import dialect

#: Messages published ahead of their confirmations.
WINDOW = 64
#: Seconds before messages the broker refused (nack) are tried again.
RETRY_DELAY = 5.0


# ---- transactions (database thread) ---------------------------------------------


def db_record(conn, message: Message, now: float, payload: str | None = None) -> bool:
    """Record ``message`` as waiting, once: True when it is new."""
    cur = conn.execute(
        "INSERT OR IGNORE INTO outbox (message_id, routing_key, type, correlation_id, timestamp, body, "
        "payload, state, created) VALUES (?, ?, ?, ?, ?, ?, ?, 'waiting', ?)",
        (message.message_id, message.routing_key, message.type, message.correlation_id, message.timestamp,
         message.body, payload, now))
    return cur.rowcount == 1


def db_waiting(conn, after: int, limit: int) -> list[tuple]:
    return [tuple(r) for r in conn.execute(
        "SELECT seq, message_id, routing_key, type, correlation_id, timestamp, body, payload FROM outbox "
        "WHERE state = 'waiting' AND seq > ? ORDER BY seq LIMIT ?", (after, limit))]


def db_claim_waiting(conn, after: int, limit: int, node: str, lease: float) -> list[tuple]:
    """Like :func:`db_waiting`, for one node of several: the rows no other
    node holds (or whose holder let its lease expire) become this node's
    for ``lease`` seconds (renewed by its heartbeat, gateway.workflow.cluster),
    so that each message is published by one node."""
    db_now = dialect.db_now(conn)
    rows = conn.execute(
        "UPDATE outbox SET node = ?, lease_until = ? WHERE seq IN (SELECT seq FROM outbox WHERE state = 'waiting' "
        "AND seq > ? AND (node IS NULL OR node = ? OR lease_until IS NULL OR lease_until < ?) ORDER BY seq LIMIT ?"
        f"{dialect.skip_locked(conn)}) RETURNING seq, message_id, routing_key, type, correlation_id, timestamp, "
        "body, payload", (node, db_now + lease, after, node, db_now, limit)).fetchall()
    return sorted(tuple(r) for r in rows)


def db_sent(conn, seqs, failed, now: float) -> list[str]:
    """Mark confirmed rows sent and count an attempt on the others; a payload
    with no pipeline job whose request is confirmed is done (its retention
    starts).  Returns the payload ids that became done."""
    conn.executemany("UPDATE outbox SET state = 'sent', sent = ?, attempts = attempts + 1 WHERE seq = ?",
                     [(now, s) for s in seqs])
    conn.executemany("UPDATE outbox SET attempts = attempts + 1 WHERE seq = ?", [(s,) for s in failed])
    done = []
    if seqs:
        marks = ", ".join("?" * len(seqs))
        for (pid,) in conn.execute(f"SELECT payload FROM outbox WHERE seq IN ({marks}) AND payload IS NOT NULL",
                                   list(seqs)).fetchall():
            cur = conn.execute("UPDATE payloads SET state = 'done', finished = ? WHERE id = ? AND state = 'closed' "
                               "AND NOT EXISTS (SELECT 1 FROM jobs WHERE payload = ?)", (now, pid, pid))
            if cur.rowcount:
                done.append(pid)
    return done


def db_counts(conn) -> dict:
    counts = {"waiting": 0, "sent": 0}
    for state, n in conn.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state"):
        counts[state] = n
    return counts


def db_held(conn, payload_ids) -> set[str]:
    """The payloads among ``payload_ids`` whose workflow request is not
    confirmed yet: the reclaimer keeps their files."""
    ids = list(payload_ids)
    if not ids:
        return set()
    marks = ", ".join("?" * len(ids))
    return {r[0] for r in conn.execute(
        f"SELECT DISTINCT payload FROM outbox WHERE state = 'waiting' AND payload IN ({marks})", ids)}


# ---- publishing (reactor thread) --------------------------------------------------


class Outbox:
    """Publishes waiting rows through ``broker`` (an IMessageBroker)."""

    log = Logger()

    def __init__(self, db, broker, reactor, node: str = "", lease: float = 0.0):
        # With a node name, several nodes share the outbox: each publishes the rows it claimed.
        self.node = node
        self.lease = lease
        self.db = db
        self.broker = broker
        self.reactor = reactor
        self.running = False
        self.again = False
        self.published = 0
        self.confirmed = 0
        self.stopped = False
        self._retry = None

    def stop(self):
        self.stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()

    def kick(self):
        """Publish what waits, now (a payload closed, the broker came back)."""
        if self.stopped:
            return
        if self.running:
            self.again = True
            return
        self.running = True
        d = self._drain()
        d.addErrback(lambda f: self.log.failure("outbox: publishing failed; trying again when the broker "
                                                "reconnects or the next message is recorded", f))
        d.addBoth(self._drained)

    def _drained(self, _):
        self.running = False
        if self.again and not self.stopped:
            self.again = False
            self.kick()

    def counts(self):
        return self.db.run(db_counts)

    @inlineCallbacks
    def _drain(self):
        after = 0
        while not self.stopped and self.broker.connected:
            self.again = False
            if self.node:
                rows = yield self.db.run(db_claim_waiting, after, WINDOW, self.node, self.lease)
            else:
                rows = yield self.db.run(db_waiting, after, WINDOW)
            if not rows:
                return
            sends = []
            for seq, message_id, routing_key, kind, correlation_id, timestamp, body, _payload in rows:
                message = Message(routing_key, bytes(body), message_id, correlation_id, kind, timestamp)
                sends.append(self.broker.publish(message))
                self.published += 1
                self.log.debug("published {type} {message_id} to {routing_key}", event="messaging.published",
                               type=kind, message_id=message_id, routing_key=routing_key)
            results = yield DeferredList(sends, consumeErrors=True)
            ok = [row[0] for row, (success, _r) in zip(rows, results) if success]
            failed = [row[0] for row, (success, _r) in zip(rows, results) if not success]
            done = yield self.db.run(db_sent, ok, failed, self.reactor.seconds())
            for row, (success, _r) in zip(rows, results):
                if success:
                    self.confirmed += 1
                    self.log.info("{type} {message_id} confirmed by the broker ({routing_key}{about})",
                                  event="messaging.confirmed", type=row[3], message_id=row[1],
                                  routing_key=row[2], payload=row[7],
                                  about=f", payload {row[7]}" if row[7] else "")
            if done:
                self.log.debug("payloads {payloads} done: their requests are out", payloads=done)
            if failed:
                first = next(r for s, r in results if not s)
                self.log.info("outbox: {count} message(s) not confirmed ({why}); they wait for the broker",
                              count=len(failed), why=first.getErrorMessage())
                if self.broker.connected and (self._retry is None or not self._retry.active()):
                    # Refused while connected: try again a little later.
                    self._retry = self.reactor.callLater(RETRY_DELAY, self.kick)
                return  # otherwise the broker's reconnection kicks us again
            after = rows[-1][0]
