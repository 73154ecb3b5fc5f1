"""Export and echo against in-process gateways over loopback TCP.

The receiving gateway is the real SCP (its own upper layer, the other side of
the state machine); the bytes it stores are compared with the files sent.
"""

from __future__ import annotations

import os
import textwrap

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest, TestCase

from gateway.config import config_from_string
from gateway.export.jobs import ExportService, read_meta
from gateway.export.store import ExportStore, job_outcome
from gateway.threads import WorkerPool
from tests.dicomfiles import ct_image, dataset_bytes, make_series, small_instance
from tests.integration.harness import free_port, start_gateway
from tests.pgtest import Backend, on_postgres




def scu_config(storage, destinations, *, max_associations=2, retries=3, retry_delay=0.1, artim=5,
               dimse=10, extra=""):
    tables = []
    for name, port, ae in destinations:
        tables.append(f'[[destination]]\nname = "{name}"\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {port}\n')
    text = textwrap.dedent(f"""
    [gateway]
    storage = "{storage}"

    [timeouts]
    artim = {artim}
    dimse = {dimse}

    [scu]
    ae_title = "EXPORTER"
    max_associations = {max_associations}
    retries = {retries}
    retry_delay = {retry_delay}
    connect_timeout = 2

    [[ae]]
    title = "DICOMGW"
    """) + extra + "\n" + "\n".join(tables)
    return config_from_string(text)


class ExportCase(Backend, TestCase):
    timeout = 60

    def start_export(self, config, **kw):
        pool = WorkerPool(2, "test-export-read")
        pool.start()
        self.addCleanup(pool.stop)
        service = ExportService(self.with_index(config), reactor, pool, **kw)
        service.startService()
        self.addCleanup(service.stopService)
        return service


class HeaderTests(TestCase):
    def test_reads_uids_offset_and_size(self):
        path = ct_image(self.mktemp() + ".dcm", rows=16, cols=16)
        sop_class, sop_instance, ts, offset, size = read_meta(path)
        with open(path, "rb") as f:
            data = f.read()
        self.assertEqual(data[offset:], dataset_bytes(path))
        self.assertEqual(offset + size, len(data))
        self.assertEqual(sop_class, "1.2.840.10008.5.1.4.1.1.2")
        self.assertEqual(ts, "1.2.840.10008.1.2.1")
        self.assertTrue(sop_instance.startswith("1.2.826.0.1.3680043.10.543."))

    def test_not_part10(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"\x00" * 300)
        self.assertRaises(ValueError, read_meta, path)

    def test_outcome_rule(self):
        self.assertEqual(job_outcome(4, 0), "done")
        self.assertEqual(job_outcome(4, 2), "partially_failed")  # half is not more than half
        self.assertEqual(job_outcome(4, 3), "failed")
        self.assertEqual(job_outcome(1, 1), "failed")


class EchoTests(ExportCase):
    @defer.inlineCallbacks
    def test_echo_success_and_rejection_and_refusal(self):
        gw = yield start_gateway(self)
        config = scu_config(os.path.abspath(self.mktemp()),
                            [("gw", gw.port, "DICOMGW"), ("wrongae", gw.port, "NOSUCHAE"),
                             ("down", free_port(), "X")])
        export = self.start_export(config)
        ok = yield export.destinations.echo("gw")
        self.assertTrue(ok["ok"], ok)
        self.assertIsNone(ok["reason"])
        self.assertGreater(ok["rtt_ms"], 0)

        rejected = yield export.destinations.echo("wrongae")
        self.assertFalse(rejected["ok"])
        self.assertIn("result 1 (permanent), source 1 (service-user), reason 7 (called AE title not recognized)",
                      rejected["reason"])

        refused = yield export.destinations.echo("down")
        self.assertFalse(refused["ok"])
        self.assertEqual(refused["reason"], "connection refused")
        self.assertRaises(KeyError, export.destinations.echo, "nosuch")

    @defer.inlineCallbacks
    def test_echo_timeout_when_peer_never_answers(self):
        # A listener that accepts the connection and says nothing: the
        # A-ASSOCIATE response timeout (ARTIM, 1 s here) must end it.
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        config = scu_config(os.path.abspath(self.mktemp()), [("mute", silent.getHost().port, "MUTE")], artim=1)
        export = self.start_export(config)
        started = reactor.seconds()
        result = yield export.destinations.echo("mute")
        self.assertFalse(result["ok"])
        self.assertIn("timeout: no A-ASSOCIATE response within 1 s", result["reason"])
        self.assertLess(reactor.seconds() - started, 5)


class SendTests(ExportCase):
    @defer.inlineCallbacks
    def test_job_arrives_byte_for_byte_over_one_association(self):
        gw = yield start_gateway(self, max_pdu_length=16384)
        src = self.mktemp()
        os.makedirs(src)
        paths = make_series(src, 4, rows=64, cols=64)
        paths.append(small_instance(os.path.join(src, "implicit.dcm"), size=70000))
        config = scu_config(os.path.abspath(self.mktemp()), [("gw", gw.port, "DICOMGW")])
        export = self.start_export(config)
        [job_id] = yield export.submit(["gw"], paths, "test")
        state = yield export.wait(job_id)
        self.assertEqual(state, "done")

        job = yield export.job(job_id)
        self.assertEqual((job["files"], job["done"], job["failed"], job["origin"]), (5, 5, 0, "test"))
        self.assertEqual({(f["state"], f["status"], f["attempts"]) for f in job["file_statuses"]},
                         {("sent", 0, 1)})
        stored = {os.path.basename(p)[:-4]: p for p in gw.stored_files()}
        for path in paths:
            uid = read_meta(path)[1]
            self.assertEqual(dataset_bytes(stored[uid]), dataset_bytes(path))
        listing = yield export.jobs()
        self.assertEqual([j["id"] for j in listing], [job_id])
        self.assertEqual(listing[0]["state"], "done")

    @defer.inlineCallbacks
    def test_unreadable_files_fail_and_decide_the_outcome(self):
        gw = yield start_gateway(self)
        src = self.mktemp()
        os.makedirs(src)
        good = ct_image(os.path.join(src, "good.dcm"), rows=16, cols=16)
        bad = []
        for i in range(2):
            bad.append(os.path.join(src, f"bad{i}.dcm"))
            with open(bad[-1], "wb") as f:
                f.write(b"not dicom")
        config = scu_config(os.path.abspath(self.mktemp()), [("gw", gw.port, "DICOMGW")])
        export = self.start_export(config)
        one_bad = yield export.submit(["gw", "gw"], [good, bad[0]], "test")
        two_bad = yield export.submit(["gw"], [good] + bad, "test")
        self.assertEqual((yield export.wait(one_bad[0])), "partially_failed")
        self.assertEqual((yield export.wait(one_bad[1])), "partially_failed")
        self.assertEqual((yield export.wait(two_bad[0])), "failed")
        job = yield export.job(two_bad[0])
        states = [(f["state"], f["attempts"]) for f in job["file_statuses"]]
        self.assertEqual(states, [("sent", 1), ("failed", 1), ("failed", 1)])  # never retried
        self.assertIn("not a DICOM Part 10 file", job["file_statuses"][1]["reason"])

    def test_unusable_database_fails_submit_with_the_reason(self):
        if self.backend != "sqlite":
            raise SkipTest("a storage root that cannot hold the SQLite file")
        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "w") as f:
            f.write("a file where the storage directory should be")
        config = scu_config(os.path.join(blocker, "storage"), [("gw", 1, "GW")])
        export = self.start_export(config)
        return self.assertFailure(export.submit(["gw"], [], "test"), NotADirectoryError)

    def test_unknown_destination(self):
        config = scu_config(os.path.abspath(self.mktemp()), [])
        export = self.start_export(config)
        self.assertRaises(KeyError, export.submit, ["nosuch"], [], "test")


class RetryAndConcurrencyTests(ExportCase):
    @defer.inlineCallbacks
    def test_down_destination_retried_with_backoff_others_unaffected_limit_kept(self):
        gw = yield start_gateway(self)
        src = self.mktemp()
        os.makedirs(src)
        paths = make_series(src, 6, rows=256, cols=256)
        destinations = [("down", free_port(), "DOWN")] + [(n, gw.port, "DICOMGW") for n in ("a", "b", "c")]
        config = scu_config(os.path.abspath(self.mktemp()), destinations, max_associations=2, retries=2,
                            retry_delay=0.2)
        export = self.start_export(config)

        # Observe the associations the service really opens: each one counts
        # from its connection attempt until it is closed (or failed).
        attempts: dict[str, list[float]] = {}
        in_flight = [0]
        most = [0]
        real_connect = export.destinations.connect

        def counting_connect(name, contexts):
            attempts.setdefault(name, []).append(reactor.seconds())
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])

            def done(_):
                in_flight[0] -= 1

            def established(assoc):
                assoc.closed_d.addCallback(done)
                return assoc

            def failed(f):
                done(None)
                return f

            return real_connect(name, contexts).addCallbacks(established, failed)

        export.destinations.connect = counting_connect
        ids = yield export.submit(["down", "a", "b", "c"], paths, "test")
        states = yield defer.gatherResults([export.wait(i) for i in ids])
        self.assertEqual(states, ["failed", "done", "done", "done"])

        # Backoff: 3 attempts (1 + retries), 0.2 s then 0.4 s apart.
        tries = attempts["down"]
        self.assertEqual(len(tries), 3)
        self.assertGreaterEqual(tries[1] - tries[0], 0.2 - 0.02)
        self.assertGreaterEqual(tries[2] - tries[1], 0.4 - 0.02)
        down = yield export.job(ids[0])
        self.assertEqual(down["attempts"], 3)
        self.assertEqual({(f["state"], f["attempts"], f["reason"]) for f in down["file_statuses"]},
                         {("failed", 3, "connection refused")})
        # The others went through at the first attempt, every file.
        for job_id in ids[1:]:
            job = yield export.job(job_id)
            self.assertEqual((job["attempts"], job["done"]), (1, 6))
        self.assertEqual(len(gw.stored_files()), 6)  # same instances, latest wins
        # The limit: two associations at once, reached and never exceeded.
        self.assertEqual(most[0], 2)
        self.assertEqual(in_flight[0], 0)
        self.assertEqual(export.max_running, 2)

    @defer.inlineCallbacks
    def test_restart_resumes_unfinished_jobs(self):
        gw = yield start_gateway(self)
        src = self.mktemp()
        os.makedirs(src)
        paths = make_series(src, 3, rows=16, cols=16)
        storage = os.path.abspath(self.mktemp())
        config = scu_config(storage, [("gw", gw.port, "DICOMGW")])

        # A previous run queued a job and died while sending it.
        options = self.index_options()
        store = ExportStore(os.path.join(storage, "exports.sqlite"), reactor, url=options.get("url", ""),
                            namespace=options.get("namespace", "dicomgw"))
        yield store.start()
        [job_id] = yield store.add_jobs(["gw"], paths, "test", 1.0)
        yield store.set_job(job_id, 2.0, state="in_progress", attempts=1)
        yield store.set_file(job_id, 0, state="sent", status=0, attempts=1)
        yield store.stop()

        export = self.start_export(config)
        self.assertEqual((yield export.wait(job_id)), "done")
        job = yield export.job(job_id)
        self.assertEqual([f["attempts"] for f in job["file_statuses"]], [1, 1, 1])
        self.assertEqual(len(gw.stored_files()), 2)  # only what was not sent before
        self.assertEqual(job["attempts"], 2)


class StopTests(ExportCase):
    @defer.inlineCallbacks
    def test_stop_mid_job_then_start_again_finishes_it(self):
        from twisted.logger import globalLogPublisher

        gw = yield start_gateway(self)
        src = self.mktemp()
        os.makedirs(src)
        paths = make_series(src, 8, rows=256, cols=256)
        storage = os.path.abspath(self.mktemp())
        config = scu_config(storage, [("gw", gw.port, "DICOMGW")], retries=0)
        first = self.start_export(config)
        first_sent = defer.Deferred()

        def observe(event):
            if event.get("event") == "export.file.finished" and event.get("outcome") == "sent" \
                    and not first_sent.called:
                first_sent.callback(None)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        [job_id] = yield first.submit(["gw"], paths, "test")
        yield first_sent
        yield first.stopService()

        second = self.start_export(config)
        # retries = 0, yet nothing failed: the files our stop cut off were
        # left pending, not counted as a failed last attempt.
        self.assertEqual((yield second.wait(job_id)), "done")
        job = yield second.job(job_id)
        self.assertEqual((job["done"], job["failed"]), (8, 0))
        self.assertEqual(len(gw.stored_files()), 8)


class BackoffClockTests(TestCase):
    """The retry schedule, with every timer on a Clock and no threads."""

    def test_retry_delays_double_then_the_job_fails(self):
        from gateway.export.scu import ConnectFailed
        from gateway.testing import InlinePool, ThreadlessClock

        clock = ThreadlessClock()
        clock.advance(1_000_000)
        config = scu_config(os.path.abspath(self.mktemp()), [("down", 1, "DOWN")], retries=3, retry_delay=30)
        src = self.mktemp()
        os.makedirs(src)
        paths = make_series(src, 2, rows=8, cols=8)

        class Refusing:
            calls: list[float] = []

            def names(self):
                return ["down"]

            def get(self, name):
                return config.destination_named(name)

            def connect(self, name, contexts):
                self.calls.append(clock.seconds() - 1_000_000)
                return defer.fail(ConnectFailed("connection refused"))

        dests = Refusing()
        export = ExportService(config, clock, InlinePool(), destinations=dests, db_pool=InlinePool())
        export.startService()
        self.addCleanup(export.stopService)
        [job_id] = self.successResultOf(export.submit(["down"], paths, "test"))
        done = export.wait(job_id)
        self.assertEqual(dests.calls, [0])
        self.assertEqual(self.successResultOf(export.job(job_id))["state"], "retrying")
        clock.advance(29.9)
        self.assertEqual(dests.calls, [0])
        for step in (0.1, 60, 120):
            clock.advance(step)
        self.assertEqual(dests.calls, [0, 30, 90, 210])
        self.assertEqual(self.successResultOf(done), "failed")
        clock.advance(10_000)
        self.assertEqual(len(dests.calls), 4)
        job = self.successResultOf(export.job(job_id))
        self.assertEqual((job["state"], job["attempts"], job["failed"]), ("failed", 4, 2))
        self.assertEqual({(f["state"], f["attempts"]) for f in job["file_statuses"]}, {("failed", 4)})

    def test_more_contexts_than_one_association_carries(self):
        """130 SOP class/transfer syntax pairs: two associations (128 + 2),
        one after the other, in one attempt; every file sent."""
        from gateway import part10
        from gateway.dimse import commands as C
        from gateway.testing import InlinePool, ThreadlessClock

        clock = ThreadlessClock()
        config = scu_config(os.path.abspath(self.mktemp()), [("pacs", 1, "PACS")])
        src = self.mktemp()
        os.makedirs(src)
        paths = []
        for i in range(130):
            path = os.path.join(src, f"{i}.dcm")
            with open(path, "wb") as f:
                f.write(part10.file_meta(sop_class_uid=f"1.2.826.0.1.3680043.10.543.9.{i}",
                                         sop_instance_uid=f"1.2.3.{i}", transfer_syntax_uid="1.2.840.10008.1.2.1",
                                         implementation_class_uid="1.2.3", implementation_version_name="T",
                                         source_ae_title=None) + b"\x08\x00\x18\x00UI\x06\x001.2.3")
            paths.append(path)

        class Assoc:
            def __init__(self, contexts):
                self.contexts = set(contexts)
                self.stored = []

            def store(self, path, offset, size, sop_class, sop_instance, ts):
                assert (sop_class, ts) in self.contexts
                self.stored.append(sop_instance)
                return defer.succeed(C.Command(command_field=C.C_STORE_RSP, status=0))

            def release(self):
                return defer.succeed(None)

        class Recording:
            opened: list = []

            def names(self):
                return ["pacs"]

            def get(self, name):
                return config.destination_named(name)

            def connect(self, name, contexts):
                self.opened.append(Assoc(contexts))
                return defer.succeed(self.opened[-1])

        dests = Recording()
        export = ExportService(config, clock, InlinePool(), destinations=dests, db_pool=InlinePool())
        export.startService()
        self.addCleanup(export.stopService)
        [job_id] = self.successResultOf(export.submit(["pacs"], paths, "test"))
        self.assertEqual(self.successResultOf(export.wait(job_id)), "done")
        self.assertEqual([len(a.contexts) for a in dests.opened], [128, 2])
        self.assertEqual(sum(len(a.stored) for a in dests.opened), 130)
        job = self.successResultOf(export.job(job_id))
        self.assertEqual((job["attempts"], job["done"]), (1, 130))


SendTestsOnPostgres = on_postgres(SendTests)
RetryAndConcurrencyTestsOnPostgres = on_postgres(RetryAndConcurrencyTests)
StopTestsOnPostgres = on_postgres(StopTests)
