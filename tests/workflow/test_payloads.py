"""Payload grouping and timers with a Clock; header decoding per character set."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import pydicom
from pydicom.uid import generate_uid
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from gateway.config import config_from_string
from gateway.store.header import header_attributes
from gateway.store.index import open_index
from gateway.workflow import payload_db
from gateway.workflow import payloads as payloads_module
from gateway.workflow.payloads import PayloadService
from gateway.ingest.scp import AssociationInfo
from gateway.part10 import dataset_offset
from gateway.store.writer import HEAD_BYTES, Storage, StoredInstance
from gateway.threads import WorkerPool
from tests import dicomfiles
from tests.pgtest import Backend, on_postgres


class ClockReactor(task.Clock):
    """Timers and time from a Clock; thread results come back through the real reactor."""

    def callFromThread(self, f, *args, **kw):
        reactor.callFromThread(f, *args, **kw)

    def spawnProcess(self, *args, **kw):
        return reactor.spawnProcess(*args, **kw)


class RecordingRunner:
    def __init__(self):
        self.submitted = []

    def submit(self, job_ids):
        self.submitted.extend(job_ids)

    def recover(self):
        return defer.succeed(None)

    def reconfigure(self, config):
        self.config = config


def config(grouping, timeout=5, titles=("DICOMGW",), command='["true"]', pipelines=True):
    aes = "".join(f'[[ae]]\ntitle = "{t}"\ngrouping = "{grouping}"\ntimeout = {timeout}\n'
                  + ('pipelines = ["p"]\n' if pipelines else "") for t in titles)
    return config_from_string(f'[pipeline.p]\ncommand = {command}\n{aes}')


class PayloadCase(Backend, unittest.TestCase):
    """A PayloadService on a Clock, with a real database and disk pool."""

    timeout = 60

    @defer.inlineCallbacks
    def make(self, grouping, timeout=5, titles=("DICOMGW",), pipelines=True, participants=()):
        self.clock = ClockReactor()
        self.clock.advance(1_000_000)
        root = os.path.abspath(self.mktemp())
        pool = WorkerPool(2, "test-disk")
        pool.start()
        self.addCleanup(pool.stop)
        self.storage = Storage(root, self.clock, pool, fsync=False)
        self.storage.prepare()
        self.db = open_index(root, self.clock, durable=False, **self.index_options())
        yield self.db.start()
        self.addCleanup(self.db.stop)
        self.runner = RecordingRunner()
        self.service = PayloadService(config(grouping, timeout, titles, pipelines=pipelines), self.storage, self.db,
                                      self.clock, self.runner, participants)
        self.source = self.mktemp()
        os.makedirs(self.source)
        self.n = 0

    @defer.inlineCallbacks
    def store(self, association, patient, study, series, ae="DICOMGW", turn=True, sop_instance_uid=None):
        """Put an instance in the inbox as the SCP would, and tell the service
        with the record the writer makes.

        Without ``turn`` the reactor does not turn after the SCP's call: the
        examination has not started (the caller advances the clock).  With
        ``sop_instance_uid``, the instance is that one received again (its
        new file replaces the old one, as the writer's rename does).
        """
        self.n += 1
        src = dicomfiles.ct_image(os.path.join(self.source, f"{self.n}.dcm"), study_uid=study,
                                  series_uid=series, number=self.n, rows=8, cols=8, patient_id=patient)
        if sop_instance_uid is not None:
            ds = pydicom.dcmread(src)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
            ds.save_as(src, enforce_file_format=True)
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        directory = os.path.join(self.storage.instances_dir, ae)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, ds.SOPInstanceUID + ".dcm")
        if sop_instance_uid is not None and os.path.exists(path):
            os.unlink(path)
        os.link(src, path)
        with open(path, "rb") as f:  # as the writer digests and keeps what it writes
            data = f.read()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        dataset = data[dataset_offset(data):]
        st = os.stat(path)
        stored = StoredInstance(path, ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID,
                                st.st_size, len(dataset), False, digest, st.st_ino, dataset[:HEAD_BYTES])
        self.assertIsNone(self.service.instance_stored(stored, association))
        if turn:
            yield self.service._settled(association.id)  # indexed (in the background)
        return digest

    def association(self, ae="DICOMGW"):
        self.n += 1
        return AssociationInfo(f"a{self.n}", "MODALITY", ae, "127.0.0.1:1234", self.clock.seconds())

    @defer.inlineCallbacks
    def states(self, expected_closed=None):
        """Payload (state, instances) pairs, once ``expected_closed`` of them are closed."""
        deadline = time.monotonic() + 10
        while True:
            rows = yield self.service.payloads()
            closed = [r for r in rows if r["state"] in ("closed", "done")]
            handed = len(self.runner.submitted) >= len(closed)  # the hand-off follows the commit
            if expected_closed is None or (len(closed) >= expected_closed and handed) \
                    or time.monotonic() > deadline:
                return sorted((r["state"], r["instances"]) for r in rows)
            yield task.deferLater(reactor, 0.02, lambda: None)



class GroupingTests(PayloadCase):
    @defer.inlineCallbacks
    def two_associations(self, grouping):
        """P1: study A (series 1: 2 instances, series 2: 1); then study B; P2: study C."""
        yield self.make(grouping)
        a1, a2 = self.association(), self.association()
        study_a, study_b, study_c = generate_uid(), generate_uid(), generate_uid()
        s1, s2, s3, s4 = (generate_uid() for _ in range(4))
        yield self.store(a1, "P1", study_a, s1)
        yield self.store(a1, "P1", study_a, s1)
        yield self.store(a1, "P1", study_a, s2)
        yield self.service.association_released(a1)
        yield self.store(a2, "P1", study_b, s3)
        yield self.store(a2, "P2", study_c, s4)
        yield self.service.association_released(a2)
        open_ = yield self.states()
        self.assertTrue(all(state == "open" for state, _ in open_))
        self.clock.advance(4.9)
        self.assertEqual((yield self.states()), open_)  # not quiet long enough
        self.clock.advance(0.2)
        closed = yield self.states(expected_closed=len(open_))
        self.assertTrue(all(state == "closed" for state, _ in closed), closed)
        self.assertEqual(len(self.runner.submitted), len(closed))  # one job per payload (one pipeline)
        self.assertEqual((self.service.last_seen, self.service.open_keys, self.service.timers), ({}, {}, {}))
        return sorted(n for _, n in closed)

    @defer.inlineCallbacks
    def test_grouping_by_association(self):
        self.assertEqual((yield self.two_associations("association")), [2, 3])

    @defer.inlineCallbacks
    def test_grouping_by_patient(self):
        self.assertEqual((yield self.two_associations("patient")), [1, 4])

    @defer.inlineCallbacks
    def test_grouping_by_study(self):
        self.assertEqual((yield self.two_associations("study")), [1, 1, 3])

    @defer.inlineCallbacks
    def test_grouping_by_series(self):
        self.assertEqual((yield self.two_associations("series")), [1, 1, 1, 2])

    @defer.inlineCallbacks
    def test_an_instance_received_again_is_in_its_payload_once_as_its_latest_copy(self):
        yield self.make("study")
        study, series, again = generate_uid(), generate_uid(), generate_uid()
        a1, a2 = self.association(), self.association()
        yield self.store(a1, "P1", study, series, sop_instance_uid=again)
        yield self.store(a1, "P1", study, series)
        yield self.store(a1, "P1", study, series, sop_instance_uid=again)
        yield self.service.association_released(a1)
        yield self.store(a2, "P1", study, series, sop_instance_uid=again)
        yield self.store(a2, "P1", study, series)
        yield self.service.association_released(a2)
        rows = yield self.db.run(lambda conn: [tuple(r) for r in conn.execute(
            "SELECT association, state FROM instances WHERE sop_instance_uid = ? ORDER BY id", (again,))])
        self.assertEqual(rows, [("a1", "replaced"), ("a1", "replaced"), ("a2", "payload")])
        self.clock.advance(5.1)
        self.assertEqual((yield self.states(expected_closed=1)), [("closed", 3)])
        [payload] = yield self.service.payloads()
        with open(os.path.join(self.storage.payloads_dir, payload["id"], "manifest.json")) as f:
            manifest = json.load(f)
        self.assertEqual(sum(i["sop_instance_uid"] == again for i in manifest["instances"]), 1)
        self.assertEqual(len(manifest["instances"]), 3)

    @defer.inlineCallbacks
    def test_key_is_scoped_by_ae_title(self):
        yield self.make("study", titles=("ONE", "TWO"))
        study, series = generate_uid(), generate_uid()
        a1, a2 = self.association("ONE"), self.association("TWO")
        yield self.store(a1, "P1", study, series, ae="ONE")
        yield self.store(a2, "P1", study, series, ae="TWO")
        yield self.service.association_released(a1)
        yield self.service.association_released(a2)
        self.clock.advance(6)
        rows = yield self.states(expected_closed=2)
        self.assertEqual(rows, [("closed", 1), ("closed", 1)])
        [row, _] = yield self.service.payloads(state="closed")
        self.assertEqual(set(row), {"id", "ae", "key", "state", "instances", "created", "closed", "pipelines"})
        self.assertEqual((row["key"], row["state"]), (study, "closed"))
        self.assertEqual(row["pipelines"], {"p": {"state": "pending", "attempts": 0, "reason": None}})

    def test_provides_its_interfaces(self):
        from zope.interface.verify import verifyObject

        from gateway.interfaces import IInstanceStoredObserver, IPayloadQuery
        from gateway.testing import RecordingObserver

        from types import SimpleNamespace

        storage = SimpleNamespace(root=os.path.abspath(self.mktemp()))
        service = PayloadService(config("study"), storage, None, task.Clock())
        self.assertTrue(verifyObject(IInstanceStoredObserver, service))
        self.assertTrue(verifyObject(IPayloadQuery, service))
        self.assertTrue(verifyObject(IInstanceStoredObserver, RecordingObserver()))

    @defer.inlineCallbacks
    def test_open_association_keeps_the_payload_open_and_quiet_restarts(self):
        yield self.make("study")
        study, series = generate_uid(), generate_uid()
        a1, a2 = self.association(), self.association()
        yield self.store(a1, "P1", study, series)
        yield self.service.association_released(a1)
        self.clock.advance(3)
        yield self.store(a2, "P1", study, series)  # a2 is still open
        self.clock.advance(3)  # 6 s after a1's instance, 3 s after a2's: not quiet yet
        self.assertEqual((yield self.states()), [("open", 1)])
        self.clock.advance(10)  # quiet, but a2 has not released
        self.assertEqual((yield self.states()), [("open", 1)])
        yield self.service.association_released(a2)
        self.assertEqual((yield self.states(expected_closed=1)), [("closed", 2)])

    @defer.inlineCallbacks
    def test_rows_wait_for_company_and_the_release_waits_for_them(self):
        yield self.make("study")
        a1 = self.association()
        jobs = []
        real = self.db.run
        self.patch(self.db, "run", lambda f, *a: jobs.append(f) or real(f, *a))
        digests = [(yield self.store(a1, "P1", generate_uid(), generate_uid()))]
        self.assertEqual(jobs, [payload_db.record_batch])  # an association's first row goes at once
        for _ in range(3):
            digests.append((yield self.store(a1, "P1", generate_uid(), generate_uid(), turn=False)))
        self.assertEqual(len(jobs), 1)  # the SCP answers at once; the rows wait for company
        yield self.service.association_released(a1)  # the peer released at once: they go now
        self.assertEqual(jobs.count(payload_db.record_batch), 2)  # one job for the three
        rows = yield self.db.run(lambda c: c.execute("SELECT digest, patient_id FROM instances").fetchall())
        self.assertEqual(sorted(tuple(r) for r in rows), sorted((d, "P1") for d in digests))

    @defer.inlineCallbacks
    def test_rows_go_after_a_short_wait_or_as_soon_as_a_batch_is_full(self):
        yield self.make("study")
        a1 = self.association()
        yield self.store(a1, "P1", generate_uid(), generate_uid())
        yield self.store(a1, "P1", generate_uid(), generate_uid(), turn=False)
        self.assertEqual(len(self.service._arrived), 1)  # examined on the reactor's next turn
        self.clock.advance(0)
        self.assertEqual(len(self.service._rows), 1)  # ... and then waits for company
        self.clock.advance(payloads_module.INDEX_DELAY)
        self.assertEqual(self.service._rows, [])
        yield self.service._settled(a1.id)
        self.assertEqual((yield _sql(self.db, "SELECT COUNT(*) FROM instances")), [(2,)])
        self.patch(payloads_module, "INDEX_BATCH", 3)
        for _ in range(3):
            yield self.store(a1, "P1", generate_uid(), generate_uid(), turn=False)
        self.clock.advance(0)
        self.assertEqual(self.service._rows, [])  # gone without the timer
        yield self.service._settled(a1.id)
        self.assertEqual((yield _sql(self.db, "SELECT COUNT(*) FROM instances")), [(5,)])

    @defer.inlineCallbacks
    def test_aborted_association_joins_nothing(self):
        yield self.make("study")
        study, series = generate_uid(), generate_uid()
        a1 = self.association()
        yield self.store(a1, "P1", study, series)
        yield self.store(a1, "P1", study, series)
        yield self.service.association_ended(a1, "aborted")
        self.clock.advance(10)
        self.assertEqual((yield self.states()), [])
        self.assertEqual(os.listdir(os.path.join(self.storage.instances_dir, "DICOMGW")), [])


class ParticipantTests(PayloadCase):
    """Close participants (the message broker's outbox): payloads on AE
    titles without pipelines, a part in the closing transaction."""

    @defer.inlineCallbacks
    def close_one(self, participant=None):
        yield self.make("study", pipelines=False, participants=[participant] if participant else [])
        a1 = self.association()
        yield self.store(a1, "P1", generate_uid(), generate_uid())
        yield self.service.association_released(a1)
        self.clock.advance(6)
        for _ in range(500):  # told once the closing transaction committed
            if participant is None or participant.closed:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        rows = yield self.db.run(lambda c: [tuple(r) for r in c.execute("SELECT id, state FROM payloads")])
        states = yield self.db.run(lambda c: [r[0] for r in c.execute("SELECT state FROM instances")])
        return rows, states

    @defer.inlineCallbacks
    def test_a_participant_makes_an_ae_without_pipelines_form_payloads_and_may_hold_them(self):
        from gateway.testing import RecordingParticipant

        participant = RecordingParticipant(hold=True)
        [(pid, state)], instances = yield self.close_one(participant)
        self.assertEqual((state, instances), ("closed", ["payload"]))  # held: not done, no jobs
        self.assertEqual(participant.in_transaction, [(pid, "closed")])  # inside the closing transaction
        self.assertEqual(participant.closed, [pid])
        self.assertEqual(self.runner.submitted, [])

    @defer.inlineCallbacks
    def test_a_payload_no_participant_holds_is_done_at_once(self):
        from gateway.testing import RecordingParticipant

        participant = RecordingParticipant(hold=False)
        [(pid, state)], _ = yield self.close_one(participant)
        self.assertEqual((state, participant.closed), ("done", [pid]))

    @defer.inlineCallbacks
    def test_without_participants_an_ae_without_pipelines_keeps_its_instances(self):
        rows, instances = yield self.close_one()
        self.assertEqual((rows, instances), ([], ["kept"]))


class ReconfigureTests(PayloadCase):
    @defer.inlineCallbacks
    def test_new_grouping_and_timeout_apply_to_new_instances(self):
        from gateway.interfaces import IReconfigurable

        yield self.make("study", timeout=5)
        self.assertTrue(IReconfigurable.providedBy(self.service))
        self.service.reconfigure(config("series", timeout=1))
        study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
        a1 = self.association()
        yield self.store(a1, "P1", study, s1)
        yield self.store(a1, "P1", study, s2)
        yield self.service.association_released(a1)
        self.clock.advance(1.1)
        self.assertEqual((yield self.states(expected_closed=2)), [("closed", 1), ("closed", 1)])


class IndexFailureTests(PayloadCase):
    @defer.inlineCallbacks
    def test_the_release_fails_when_rows_cannot_be_written(self):
        import sqlite3

        from gateway.store import index

        def broken(*args):
            raise sqlite3.OperationalError("disk I/O error")

        yield self.make("study")
        self.patch(index, "record_instances", broken)
        a1 = self.association()
        yield self.store(a1, "P1", generate_uid(), generate_uid())
        with self.assertRaises(RuntimeError):
            yield self.service.association_released(a1)
        self.flushLoggedErrors(sqlite3.OperationalError)
        self.clock.advance(10)
        self.assertEqual((yield self.states()), [])  # no payload: nothing handed off

    @defer.inlineCallbacks
    def test_attributes_the_first_bytes_do_not_settle_are_read_from_the_file(self):
        yield self.make("study")
        self.patch(payloads_module, "quick_attributes", lambda *a: None)
        a1 = self.association()
        study = generate_uid()
        yield self.store(a1, "P1", study, generate_uid())
        yield self.store(a1, "P2", generate_uid(), generate_uid())
        yield self.service.association_released(a1)
        rows = yield _sql(self.db, "SELECT patient_id, study_uid, group_key FROM instances ORDER BY id")
        self.assertEqual(rows[0], ("P1", study, study))
        self.assertEqual(rows[1][0], "P2")


class CharacterSetTests(unittest.TestCase):
    """PatientName decoded with the dataset's Specific Character Set (PS3.5 6.1)."""

    def write(self, charset, name):
        path = dicomfiles.ct_image(self.mktemp(), rows=8, cols=8)
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.save_as(path, enforce_file_format=True)
        with open(path, "rb") as f:
            return path, f.read()

    def check(self, charset, name, encoded):
        path, raw = self.write(charset, name)
        self.assertIn(encoded, raw)  # the name really is in that encoding on disk
        self.assertEqual(header_attributes(path)["patient_name"], name)
        # The same from the data set's first bytes, as the writer hands them over.
        head = dicomfiles.dataset_bytes(path)
        self.assertEqual(header_attributes(path, head, pydicom.dcmread(path).file_meta.TransferSyntaxUID,
                                           True)["patient_name"], name)

    def test_default_repertoire(self):
        self.check(None, "Test^Patient", b"Test^Patient")

    def test_iso_ir_100(self):
        self.check("ISO_IR 100", "Buc^Jérôme", "Buc^Jérôme".encode("latin-1"))

    def test_iso_2022_ir_87(self):
        self.check(["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", b"\x1b$B")

    def test_iso_ir_192(self):
        self.check("ISO_IR 192", "Wang^XiaoDong=王^小東", "王^小東".encode("utf-8"))


def _sql(db, sql, *args):
    return db.run(lambda conn: [tuple(r) for r in conn.execute(sql, args).fetchall()])


class RecoveryTests(PayloadCase):
    """What a restart finds in the database, simulated state by state."""

    def restarted(self, runner=None):
        return PayloadService(self.service.config, self.storage, self.db, self.clock,
                              runner or RecordingRunner())

    @defer.inlineCallbacks
    def test_open_association_is_broken_by_the_restart(self):
        yield self.make("study")
        a1 = self.association()
        yield self.store(a1, "P1", generate_uid(), generate_uid())
        service = self.restarted()
        yield service.recover()
        self.assertEqual((yield _sql(self.db, "SELECT state FROM associations")), [("broken",)])
        self.assertEqual((yield _sql(self.db, "SELECT state FROM instances")), [("removed",)])
        self.assertEqual(os.listdir(os.path.join(self.storage.instances_dir, "DICOMGW")), [])

    @defer.inlineCallbacks
    def test_payload_caught_closing_is_closed_and_handed_off_once(self):
        yield self.make("study")
        a1 = self.association()
        yield self.store(a1, "P1", generate_uid(), generate_uid())
        yield self.service.association_released(a1)
        yield _sql(self.db, "UPDATE payloads SET state = 'closing'")
        runner = RecordingRunner()
        yield self.restarted(runner).recover()
        self.assertEqual((yield _sql(self.db, "SELECT state FROM payloads")), [("closed",)])
        self.assertEqual(len(runner.submitted), 1)
        self.assertEqual((yield _sql(self.db, "SELECT COUNT(*) FROM jobs")), [(1,)])
        # Recovering again (another crash) creates no second job.
        yield _sql(self.db, "UPDATE payloads SET state = 'closing'")
        runner2 = RecordingRunner()
        yield self.restarted(runner2).recover()
        self.assertEqual(runner2.submitted, [])
        self.assertEqual((yield _sql(self.db, "SELECT COUNT(*) FROM jobs")), [(1,)])

    @defer.inlineCallbacks
    def test_interrupted_job_runs_again_as_a_recorded_attempt(self):
        from gateway.workflow.pipelines import PipelineRunner

        marker = os.path.abspath(self.mktemp())
        yield self.make("study")
        self.service.config = config("study", command=f'["{sys.executable}", "-c", '
                                     f'"open({marker!r}, \'a\').write(\'run\\\\n\')"]')
        a1 = self.association()
        yield self.store(a1, "P1", generate_uid(), generate_uid())
        yield self.service.association_released(a1)
        self.clock.advance(6)
        yield self.states(expected_closed=1)
        # The crash came while attempt 1 was running.
        yield _sql(self.db, "UPDATE jobs SET state = 'running', attempts = 1")
        runner = PipelineRunner(self.service.config, self.db, self.storage, self.clock)
        yield self.restarted(runner).recover()
        self.assertEqual((yield _sql(self.db, "SELECT state, reason FROM jobs")),
                         [("pending", "interrupted by a restart")])
        self.clock.advance(0)
        deadline = time.monotonic() + 10
        while (yield _sql(self.db, "SELECT state FROM jobs")) != [("done",)] and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((yield _sql(self.db, "SELECT state, attempts FROM jobs")), [("done", 2)])
        with open(marker) as f:
            self.assertEqual(f.read(), "run\n")


class StorageOnlyTests(PayloadCase):
    """An AE title without pipelines keeps what the SCP acknowledged, whatever happens."""

    @defer.inlineCallbacks
    def test_aborted_and_broken_associations_keep_their_instances(self):
        yield self.make("study")
        self.service.reconfigure(config_from_string('[[ae]]\ntitle = "DICOMGW"\n'))
        a1, a2 = self.association(), self.association()
        yield self.store(a1, "P1", generate_uid(), generate_uid())
        yield self.service.association_ended(a1, "aborted")
        yield self.store(a2, "P1", generate_uid(), generate_uid())
        # a never-indexed file, as a crash (or an older version) leaves it
        src = dicomfiles.ct_image(os.path.join(self.source, "orphan.dcm"), rows=8, cols=8)
        os.link(src, os.path.join(self.storage.instances_dir, "DICOMGW", "1.2.3.dcm"))
        os.utime(src, (0, 0))
        restarted = PayloadService(self.service.config, self.storage, self.db, self.clock, RecordingRunner())
        yield restarted.recover()
        self.assertEqual((yield _sql(self.db, "SELECT state FROM instances ORDER BY id")),
                         [("kept",), ("kept",), ("kept",)])
        self.assertEqual(len(os.listdir(os.path.join(self.storage.instances_dir, "DICOMGW"))), 3)


GroupingTestsOnPostgres = on_postgres(GroupingTests)
ParticipantTestsOnPostgres = on_postgres(ParticipantTests)
ReconfigureTestsOnPostgres = on_postgres(ReconfigureTests)
IndexFailureTestsOnPostgres = on_postgres(IndexFailureTests)
RecoveryTestsOnPostgres = on_postgres(RecoveryTests)
StorageOnlyTestsOnPostgres = on_postgres(StorageOnlyTests)
