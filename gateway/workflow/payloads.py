"""Payloads: received instances gathered per AE title and handed to pipelines.

:class:`PayloadService` is an :class:`IInstanceStoredObserver` of the SCP:

- ``instance_stored``: the writer's record of the instance is indexed
  (state ``received``) after the C-STORE is answered: on the reactor's next
  turn its indexed attributes are read from its first bytes and its group
  key (per ``[[ae]] grouping``: the association id, Patient ID, Study or
  Series Instance UID) found; the rows then wait, at most
  :data:`INDEX_DELAY` seconds or :data:`INDEX_BATCH` rows, to be written
  together by one database job (:mod:`gateway.workflow.payload_db`).
  Nothing of it costs the association a Deferred, a thread hand-off or a
  commit per instance.
- ``association_released``: once all its instances are indexed, the
  association's instances join the open payload of their (AE, key), or a
  new one, in one durable transaction, before the A-RELEASE-RP goes out.
  An AE without pipelines keeps its instances (state ``kept``) and forms no
  payloads, unless a close participant (the message broker's outbox) is
  there: then every AE title forms payloads.
- ``association_ended`` (aborted or lost): its instances never reach a
  payload; they are removed at once, or after ``[storage] aborted_retention``.

A payload closes when ``timeout`` seconds passed since the last instance of
its group arrived and no open association has instances for the group.
Closing links its files into ``payloads/<id>/``, writes ``manifest.json``
(atomically), records one job per pipeline (and, in the same transaction,
whatever each :class:`~gateway.interfaces.IPayloadCloseParticipant`
records) and only then removes the inbox links; the jobs go to the
:class:`~gateway.workflow.pipelines.PipelineRunner`.

At start (:meth:`recover`): associations a crash broke are treated as
aborted, files in ``instances/`` that were never indexed (never
acknowledged) likewise, payloads caught closing are closed again (every step
is idempotent), open payloads get their timers, and unfinished jobs run.
"""

from __future__ import annotations

import json

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.interfaces import IInstanceStoredObserver, IPayloadQuery, IReconfigurable
from gateway.store import index
from gateway.store.files import remove_all
from gateway.store.header import quick_attributes
from gateway.workflow import payload_db

#: Index rows wait at most this long (seconds) for company, and go at once
#: when this many wait (see instance_stored).
INDEX_DELAY = 0.25
INDEX_BATCH = 256
#: An association the index could not record ended is tried again this often, this many times.
DISCARD_RETRY = 2.0
DISCARD_TRIES = 300
#: The states a payload goes through (gateway.store.index says what each means).
PAYLOAD_STATES = ("open", "closing", "closed", "done", "failed", "removed")


@implementer(IInstanceStoredObserver, IPayloadQuery, IReconfigurable)
class PayloadService(Service):
    """The service "payloads"; see the module docstring."""

    log = Logger()
    name = "payloads"

    def __init__(self, config, storage, db, reactor, runner=None, participants=()):
        self.config = config
        self.storage = storage
        self.db = db
        self.reactor = reactor
        self.runner = runner
        # IPayloadCloseParticipant providers; with one, every AE title forms
        # payloads, with or without pipelines.
        self.participants = tuple(participants)
        self.aes = {ae.title: ae for ae in config.ae}
        self.node = config.gateway.node
        self.open_keys: dict[str, set] = {}      # association id -> {(ae, key)}
        self.last_seen: dict[tuple, float] = {}  # (ae, key) -> time of the last instance
        self.open_payloads: dict[tuple, list] = {}  # (ae, key) -> [payload id, updated]
        self.timers: dict[str, object] = {}
        self._arrived: list = []  # (instance, association, received) not examined yet
        # For the next index job, in order: (association id, JSON row), or
        # (association id, None, (instance, association, received)) for the
        # job to read (_examine).
        self._rows: list = []
        self._associations: dict = {}  # the JSON rows of their associations, by id
        self._rows_timer = None
        self._indexing = False  # an index job is under way
        self._urgent = False  # the next rows go without waiting for company
        # association id -> [rows not yet committed, AE title], and who waits for them
        self.unindexed: dict[str, list] = {}
        self._settling: dict[str, list] = {}
        self.failed: set[str] = set()  # associations with an instance that could not be indexed
        self.recorded: set[str] = set()  # open associations whose first row has gone to the database
        self.started_at = None
        self.recovered = None

    def reconfigure(self, config):
        """New instances use the new grouping and timeout; payloads closing from
        now on get the new pipelines.  An open payload keeps its group key."""
        self.config = config
        self.aes = {ae.title: ae for ae in config.ae}
        if self.runner is not None:
            self.runner.reconfigure(config)

    # ---- service -------------------------------------------------------------

    def startService(self):
        super().startService()
        self.started_at = self.reactor.seconds()
        self.recovered = self.recover()
        self.recovered.addErrback(lambda f: self.log.failure("payload recovery failed", f))

    def stopService(self):
        super().stopService()
        for t in list(self.timers.values()):
            if t.active():
                t.cancel()
        self.timers.clear()

    def _disk(self, f, *args):
        return deferToThreadPool(self.reactor, self.storage.pool, f, *args)

    # ---- observer ------------------------------------------------------------

    def instance_stored(self, instance, association):
        """Index the instance in the background; the C-STORE is answered at once.

        ``instance`` is the writer's record (path, size, digest, first
        bytes).  On the reactor's next turn, once the response has gone
        (:meth:`_examine`), its indexed attributes are picked out of its
        first bytes and its row goes to the database with others
        (:meth:`_index`).  None of it is needed before the association
        releases, and the release waits for them (and makes them durable)
        before the A-RELEASE-RP.  An acknowledged instance whose row a crash
        prevented belongs to an association that never released: at restart
        its file is adopted as such (aborted, or kept on an AE title without
        pipelines).
        """
        if not self._arrived:
            self.reactor.callLater(0, self._examine)
        self._arrived.append((instance, association, self.reactor.seconds()))
        pending = self.unindexed.get(association.id)
        if pending is None:
            self.unindexed[association.id] = [1, association.called_ae]
        else:
            pending[0] += 1

    def _examine(self):
        """The attributes and group key of the instances that arrived, then
        their rows; the database job reads those the first bytes do not settle."""
        arrived, self._arrived = self._arrived, []
        first = False
        for instance, association, received in arrived:
            aid = association.id
            if aid not in self.recorded:
                # A new association's first row goes at once, so that a crash
                # finds its record (and calls it broken); the rest may wait.
                self.recorded.add(aid)
                first = True
                self._associations[aid] = [aid, association.calling_ae, association.called_ae, association.peer,
                                           association.started, self.node]
            try:
                attrs = quick_attributes(instance.head, instance.transfer_syntax_uid,
                                         instance.dataset_size <= len(instance.head))
            except Exception:  # pure and total, but no bug of it stops a row: the job reads the file
                attrs = None
            if attrs is None:
                self._rows.append((aid, None, (instance, association, received)))
                continue
            ae = self.aes.get(association.called_ae)
            key = payload_db.group_key(ae.grouping if ae else "study", aid, attrs)
            self._seen(association, key, received)
            self._rows.append((aid, json.dumps(payload_db.instance_row(instance, association, received, attrs, key, self.node)), None))
        if first:
            self._urgent = True
        self._index_soon()

    def _index_soon(self):
        """Index now when someone waits or a batch is full, else within INDEX_DELAY."""
        if self._urgent or len(self._rows) >= INDEX_BATCH:
            self._index()
        elif self._rows_timer is None and self._rows:
            self._rows_timer = self.reactor.callLater(INDEX_DELAY, self._index)

    def _seen(self, association, key, received):
        k = (association.called_ae, key)
        self.open_keys.setdefault(association.id, set()).add(k)
        self.last_seen[k] = max(self.last_seen.get(k, 0), received)

    def _index(self):
        """Write the rows waiting now in one database job (one at a time)."""
        timer, self._rows_timer = self._rows_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._indexing or not self._rows:
            return
        self._urgent = False
        rows, self._rows = self._rows, []
        associations, self._associations = self._associations, {}
        segments: list = []  # consecutive JSON rows make one JSON array; rows to read, a list
        texts: list = []
        for _aid, text, unread in rows:
            if text is not None:
                texts.append(text)
                continue
            if texts:
                segments.append("[" + ",".join(texts) + "]")
                texts = []
            if not segments or isinstance(segments[-1], str):
                segments.append([])
            segments[-1].append(unread)
        if texts:
            segments.append("[" + ",".join(texts) + "]")
        self._indexing = True
        groupings = {title: ae.grouping for title, ae in self.aes.items()}
        d = self.db.run(payload_db.record_batch, json.dumps(list(associations.values())), segments, groupings, self.node)
        d.addBoth(self._indexed, rows)

    def _indexed(self, result, rows):
        self._indexing = False
        if isinstance(result, Failure):
            # Their associations will not hand off: their releases fail.
            self.log.failure("could not index {count} instance(s); their associations count as aborted and the "
                             "next start adopts their files", result, count=len(rows))
            self.failed.update(aid for aid, _text, _unread in rows)
        else:
            read = [unread for _aid, text, unread in rows if text is None]
            for (instance, association, received), (key, header_error) in zip(read, result):
                if header_error:
                    self.log.warn("{path}: header not readable ({error}); indexed without attributes",
                                  path=instance.path, error=header_error)
                self._seen(association, key, received)
        for aid, _text, _unread in rows:
            self._row_done(aid)
        self._index_soon()

    def _row_done(self, association_id):
        pending = self.unindexed[association_id]
        pending[0] -= 1
        if not pending[0]:
            del self.unindexed[association_id]
            for d in self._settling.pop(association_id, ()):
                d.callback(None)

    def _settled(self, association_id):
        """Fire once every row of the association is committed (or failed)."""
        if association_id not in self.unindexed:
            return succeed(None)
        d = Deferred()
        self._settling.setdefault(association_id, []).append(d)
        self._urgent = True  # someone waits for these rows now: no waiting for company
        if self._arrived:
            self._examine()
        else:
            self._index_soon()
        return d

    @inlineCallbacks
    def association_released(self, association):
        yield self._settled(association.id)
        self.recorded.discard(association.id)
        if association.id in self.failed:
            # Not every instance is indexed: the release fails (the SCP aborts)
            # and the association counts as aborted.
            self.failed.discard(association.id)
            self.open_keys.pop(association.id, None)
            yield self._discard_or_later(association.id, "aborted")
            raise RuntimeError(f"association {association.id}: instances could not be indexed")
        now = self.reactor.seconds()
        try:
            touched = yield self.db.run_durable(payload_db.release, association, now, self._handoff_aes(), self.node)
        except Exception:
            # Not released (the SCP aborts): the association ends aborted,
            # now or, should the index be unreachable, once it answers again.
            self.open_keys.pop(association.id, None)
            self._discard_or_later(association.id, "aborted")
            raise
        keys = self.open_keys.pop(association.id, set())
        keys.update((ae, key) for ae, key, _u, _t in touched.values())
        for pid, (ae, key, updated, touches) in touched.items():
            self.open_payloads[(ae, key)] = [pid, updated, touches]
        for k in keys:
            self._check_key(k)

    @inlineCallbacks
    def association_ended(self, association, result):
        yield self._settled(association.id)
        self.recorded.discard(association.id)
        self.failed.discard(association.id)
        keys = self.open_keys.pop(association.id, set())
        yield self._discard_or_later(association.id, result)
        for k in keys:
            self._check_key(k)

    def _discard_or_later(self, association_id, result, tries=DISCARD_TRIES):
        """End the association (:meth:`_discard`); while the index cannot be
        reached, try again every DISCARD_RETRY seconds (an association left
        open in the index would hold its groups' payloads open)."""
        d = self._discard(association_id, result)

        def failed(failure):
            if tries <= 1 or not self.running:
                self.log.failure("association {association}: could not be recorded {result}; the next start "
                                 "ends it", failure, association=association_id, result=result)
                return None
            self.log.warn("association {association}: could not be recorded {result} ({why}); trying again",
                          association=association_id, result=result, why=failure.getErrorMessage())
            self.reactor.callLater(DISCARD_RETRY, self._discard_or_later, association_id, result, tries - 1)
            return None

        return d.addErrback(failed)

    @inlineCallbacks
    def _discard(self, association_id, result):
        retention = self.config.storage.aborted_retention
        count, due = yield self.db.run(index.end_association, association_id, result, self.reactor.seconds(),
                                       retention, self._keep_aes())
        freed = yield self._disk(remove_all, due)
        if due:
            yield self.db.run(index.mark_removed, [i for i, _p, _n in due])
        if count or due:
            self.log.info("association {association} ended {result}: {count} instance(s) discarded "
                          "({what})", event="instances.discarded", association=association_id,
                          result=result, count=max(count, len(due)), freed=freed, retained=retention,
                          what=f"kept for {retention:g} s" if retention else f"{freed} bytes freed")

    def _handoff_aes(self) -> dict:
        """The AE titles whose instances form payloads."""
        return {title: ae for title, ae in self.aes.items() if ae.pipelines or self.participants}

    def keep_aes(self):
        """The AE titles whose instances are kept, never handed off."""
        return self._keep_aes()

    def _keep_aes(self):
        handoff = self._handoff_aes()
        return tuple(title for title in self.aes if title not in handoff)

    # ---- timers --------------------------------------------------------------

    def _check_key(self, k):
        entry = self.open_payloads.get(k)
        if entry is None:
            if not any(k in keys for keys in self.open_keys.values()):
                self.last_seen.pop(k, None)  # nothing waits for this group
            return
        pid, updated, touches = entry
        ae = self.aes.get(k[0])
        timeout = ae.timeout if ae else 5.0
        last = max(updated or 0, self.last_seen.get(k, 0))
        delay = last + timeout - self.reactor.seconds()
        old = self.timers.pop(pid, None)
        if old is not None and old.active():
            old.cancel()
        if delay > 0:
            self.timers[pid] = self.reactor.callLater(delay, self._check_key, k)
            return
        if any(k in keys for keys in self.open_keys.values()):
            return  # an open association still brings instances; checked again when it ends
        if any(ae == k[0] for _n, ae in self.unindexed.values()):
            # Instances of this AE title whose group is not known yet: look
            # again once their rows are in.
            self._index()
            self.timers[pid] = self.reactor.callLater(INDEX_DELAY, self._check_key, k)
            return
        del self.open_payloads[k]
        self.last_seen.pop(k, None)
        d = self.close(pid, touches)
        d.addCallback(self._closed_or_not, k, entry)
        d.addErrback(self._close_failed, pid)

    def _closed_or_not(self, outcome, k, entry):
        """A payload another node's open association still feeds waits one
        more timeout (that association's release joins it and restarts the
        timer; its end lets it close)."""
        if outcome == payload_db.BUSY and k not in self.open_payloads:
            self.open_payloads[k] = entry
            ae = self.aes.get(k[0])
            self.timers[entry[0]] = self.reactor.callLater(ae.timeout if ae else 5.0, self._check_key, k)

    def _close_failed(self, failure, pid):
        self.log.failure("payload {payload}: closing failed; trying again in 30 s", failure, payload=pid)
        self.timers[pid] = self.reactor.callLater(30, self._retry_close, pid)

    def _retry_close(self, pid):
        self.timers.pop(pid, None)
        self.close(pid).addErrback(self._close_failed, pid)

    @inlineCallbacks
    def close(self, pid, touches=None):
        """Close payload ``pid``: directory, manifest, jobs; hand it off.

        ``touches``: how many joins this node saw; should another node have
        joined it since, that node closes it.  Returns its directory, or
        None, NOT_MINE or BUSY when it is not closed (payload_db.begin_close)."""
        self.timers.pop(pid, None)
        found = yield self.db.run(payload_db.begin_close, pid, self.node, touches)
        if found in (None, payload_db.NOT_MINE, payload_db.BUSY):
            return found
        payload, instances, associations = found
        ae = self.aes.get(payload["ae"])
        pipelines = ae.pipelines if ae else ()
        directory, moved, missing = yield self._disk(payload_db.build_payload_dir, self.storage.payloads_dir, payload,
                                                     instances, associations, pipelines, self.storage.fsync)
        if missing:
            self.log.warn("payload {payload}: {count} instance file(s) were no longer on disk; "
                          "left out of the payload", payload=pid, count=len(missing))
        job_ids = yield self.db.run_durable(payload_db.finish_close, pid, directory,
                                    [(i, target) for i, target, _src, _ino in moved], missing,
                                    pipelines, self.reactor.seconds(), self.participants, self.node,
                                    self.config.cluster.lease)
        # The payload directory holds its own links now: drop the inbox ones
        # (only if no later copy of the same instance replaced them).
        yield self._disk(remove_all, [(i, src, ino) for i, _t, src, ino in moved])
        self.log.info("payload {payload} of {ae} ({key}) closed: {instances} instance(s) to {pipelines}",
                      event="payload.closed", payload=pid, ae=payload["ae"], key=payload["key"],
                      instances=len(instances) - len(missing), pipelines=list(pipelines), path=directory)
        if self.runner is not None and job_ids:
            self.runner.submit(job_ids)
        for participant in self.participants:
            participant.payload_closed(pid)
        return directory

    # ---- recovery ------------------------------------------------------------

    @inlineCallbacks
    def recover(self):
        now = self.reactor.seconds()
        retention = self.config.storage.aborted_retention
        broken, orphans, kept, due, opened, closing = yield self.db.run(
            payload_db.recover, now, retention, self.storage.instances_dir, now, self._keep_aes(),
            tuple(self._handoff_aes()), self.node, self.config.cluster.lease if self.config.index.shared else 0.0)
        if kept:
            self.log.info("recovery: {kept} file(s) not in the index were indexed as kept", kept=kept)
        if broken or orphans:
            self.log.info("recovery: {associations} association(s) broken by a restart and {orphans} "
                          "file(s) the index had no row for (received on associations that never released) "
                          "are treated as aborted",
                          event="instances.discarded", association=None, count=len(broken) + orphans,
                          associations=len(broken), orphans=orphans, retained=retention)
        if due:
            yield self._disk(remove_all, due)
            yield self.db.run(index.mark_removed, [i for i, _p, _n in due])
        for pid, ae, key, updated, touches in opened:
            self.adopt(pid, ae, key, updated, touches)
        for pid in closing:
            try:
                yield self.close(pid)
            except Exception:
                self.log.failure("payload {payload}: closing after restart failed", payload=pid)
        if self.runner is not None:
            yield self.runner.recover()

    def adopt(self, pid, ae, key, updated, touches):
        """Run the quiet timer of an open payload (found at start, or taken
        over from a node that stopped)."""
        self.open_payloads[(ae, key)] = [pid, updated, touches]
        self._check_key((ae, key))

    # ---- IPayloadQuery -------------------------------------------------------

    def payloads(self, limit=100, offset=0, state=None):
        return self.db.run(payload_db.list_payloads, limit, offset, state)

    def count(self, state=None):
        return self.db.run(payload_db.count_payloads, state)
