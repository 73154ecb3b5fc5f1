"""Operations pieces without a network: [http] config rules, JSON logs, audit, metrics text."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from gateway import IMPLEMENTATION_CLASS_UID, __version__
from gateway.config import ConfigError, config_from_string
from gateway.ingest.scp import AssociationInfo
from gateway.store.writer import StoredInstance
from gateway.logs import JSONLinesObserver
from gateway.ops.audit import AuditTrail, RecentAssociations
from gateway.ops.metrics import MAX_SERIES, Metrics

AE = '[[ae]]\ntitle = "A"\n'


class HttpConfigTests(unittest.TestCase):
    def problems(self, text):
        with self.assertRaises(ConfigError) as cm:
            config_from_string(text, "t.toml")
        return cm.exception.problems

    def token_file(self, token="0123456789abcdef-token"):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(token + "\n")
        return path

    def test_off_by_default_and_loopback_needs_no_token(self):
        self.assertEqual(config_from_string(AE).listen.http, "")
        for desc in ("tcp:8080:interface=127.0.0.1", "tcp:0:interface=127.0.0.5",
                     "tcp6:8080:interface=\\:\\:1", "unix:/run/dicomgw/api.sock"):
            c = config_from_string(f"[listen]\nhttp = '{desc}'\n" + AE)  # literal: keeps the \\
            self.assertEqual((c.listen.http, c.http.token), (desc, ""))

    def test_not_loopback_without_token_is_a_config_error(self):
        for desc in ("tcp:8080", "tcp:8080:interface=0.0.0.0", "tcp:8080:interface=10.1.2.3",
                     "systemd:domain=INET:name=http", "tcp6:8080:interface=\\:\\:", "tcp6:8080"):
            problems = self.problems(f"[listen]\nhttp = '{desc}'\n" + AE)
            self.assertEqual(len(problems), 1, problems)
            self.assertIn("listen.http", problems[0])
            self.assertIn("http.token_file", problems[0])

    def test_token_file_read_and_checked(self):
        path = self.token_file()
        c = config_from_string(f'[listen]\nhttp = "tcp:8080"\n[http]\ntoken_file = "{path}"\n' + AE)
        self.assertEqual(c.http.token, "0123456789abcdef-token")
        self.assertNotIn("0123456789abcdef-token", repr(c))
        problems = self.problems(f'[http]\ntoken_file = "{self.mktemp()}"\n' + AE)
        self.assertIn("http.token_file: cannot read", problems[0])
        short = self.token_file("short")
        problems = self.problems(f'[http]\ntoken_file = "{short}"\nbogus = 1\n' + AE)
        self.assertEqual(len(problems), 2, problems)
        self.assertIn("shorter than 16", " ".join(problems))
        self.assertIn("http.bogus: unknown key", problems)


class EndpointConfigTests(unittest.TestCase):
    def test_listen_descriptions_are_parsed_like_the_daemon_would(self):
        for good in ("tcp:104", "tcp:0:interface=127.0.0.1", "systemd:domain=INET:name=dicom",
                     "systemd:domain=INET6:index=0", "unix:/run/dicomgw.sock"):
            self.assertEqual(config_from_string(f'[listen]\ndicom = "{good}"\n' + AE).listen.dicom, good)
        for bad, why in (("tcpp:104", "Unknown endpoint type"), ("tcp:104:bogus=1", "bogus"),
                         ("tcp:abc", "invalid literal"), ("systemd:domain=INET", "systemd endpoint"),
                         ("systemd:domain=IPX:name=dicom", "systemd endpoint"),
                         ("systemd:domain=INET:name=a:index=0", "systemd endpoint")):
            with self.assertRaises(ConfigError) as cm:
                config_from_string(f'[listen]\ndicom = "{bad}"\n' + AE, "t.toml")
            (problem,) = cm.exception.problems
            self.assertTrue(problem.startswith(f"listen.dicom: {bad!r}"), problem)
            self.assertIn(why, problem)


class JSONLogTests(unittest.TestCase):
    def test_events_become_json_lines_with_named_fields(self):
        stream = io.StringIO()
        publisher = LogPublisher(JSONLinesObserver(stream))
        log = Logger(namespace="gateway.test", observer=publisher)
        log.info("association {association} from {peer}", event="association.closed",
                 association="1-abc", peer="127.0.0.1:4000", instances=3, obj=object())
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("it broke: {what}", Failure(), what="division")
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual(first["message"], "association 1-abc from 127.0.0.1:4000")
        self.assertEqual((first["level"], first["namespace"]), ("info", "gateway.test"))
        self.assertEqual((first["event"], first["instances"]), ("association.closed", 3))
        self.assertNotIn("obj", first)  # not JSON data: left out, not mangled
        self.assertTrue(first["time"].endswith("Z"))
        self.assertEqual(second["level"], "critical")
        self.assertIn("ZeroDivisionError", second["failure"])

    def test_twistd_logger_option_accepts_the_factory(self):
        # twistd --logger imports the name and calls it with no arguments.
        code = ("from twisted.python.reflect import namedAny; o = namedAny('gateway.logs.json_observer')(); "
                "from twisted.logger import Logger; l = Logger(observer=o); l.debug('no'); l.info('hi {x}', x=1)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(json.loads(out.stdout)["message"], "hi 1")


def _closed(association="1-a", **kw):
    event = {"event": "association.closed", "association": association, "calling_ae": "MOD",
             "called_ae": "DICOMGW", "peer": "10.0.0.9:1234", "result": "released", "outcome": "released",
             "instances": 1, "bytes": 10, "failures": 1, "duration": 0.5, "log_time": 1.0e9}
    event.update(kw)
    return event


class HeldPool:
    """A disk pool whose jobs run when the test says; once stopped, it drops
    new jobs as WorkerPool does."""

    def __init__(self):
        self.jobs, self.stopped = [], False

    def callInThreadWithCallback(self, on_result, f, *args, **kw):
        if not self.stopped:
            self.jobs.append((on_result, f, args, kw))

    def run_next(self):
        on_result, f, args, kw = self.jobs.pop(0)
        on_result(True, f(*args, **kw))


class AuditTests(unittest.TestCase):
    def test_close_while_a_write_runs_and_the_pool_stops_still_writes_every_line(self):
        from twisted.internet import reactor, task

        path = os.path.join(self.mktemp(), "audit.jsonl")
        pool = HeldPool()
        audit = AuditTrail(path, reactor, pool)
        audit.open()
        audit(_closed("1-a"))  # its write job is in the pool
        closed = audit.close()
        audit(_closed("2-b"))  # came while closing
        pool.stopped = True  # the disk pool stops with the gateway
        pool.run_next()  # the first write ends; nothing more may go to the pool
        d = task.deferLater(reactor, 0.05, lambda: None)  # the thread's result reaches the reactor
        d.addCallback(lambda _: self.assertTrue(closed.called, "close() waited for a job the pool dropped"))

        def check(_):
            with open(path) as f:
                self.assertEqual([json.loads(line)["association"] for line in f], ["1-a", "2-b"])

        return d.addCallback(check)

    def test_one_line_per_association_with_what_was_stored_and_refused(self):
        path = os.path.join(self.mktemp(), "audit.jsonl")
        audit = AuditTrail(path)
        audit.open()
        self.addCleanup(audit.close)
        def stored(association, sop_class_uid, sop_instance_uid, size):
            audit.instance_stored(StoredInstance("x", sop_class_uid, sop_instance_uid, "1.2.840.10008.1.2", size,
                                                 size, False),
                                  AssociationInfo(association, "MOD", "DICOMGW", "10.0.0.9:1234", 0.0))

        stored("1-a", "1.2", "1.2.3", 10)
        audit({"event": "instance.failed", "association": "1-a", "sop_instance_uid": "1.2.4", "status": 0xA700})
        stored("2-b", "1.2", "9", 0)
        audit(_closed(tls_subject="CN=modality"))
        audit(_closed("3-c", result="rejected", outcome="rejected: called AE title 'X' is not configured",
                      reject_result=1, reject_source=1, reject_reason=7, instances=0, failures=0))
        audit.close()
        with open(path) as f:
            records = [json.loads(line) for line in f]
        self.assertEqual(len(records), 2)
        a, r = records
        self.assertEqual((a["calling_ae"], a["called_ae"], a["peer"], a["tls_subject"]),
                         ("MOD", "DICOMGW", "10.0.0.9:1234", "CN=modality"))
        self.assertEqual(a["stored"], [{"sop_class_uid": "1.2", "sop_instance_uid": "1.2.3", "bytes": 10}])
        self.assertEqual(a["failed"], [{"sop_instance_uid": "1.2.4", "status": "0xA700"}])
        self.assertEqual((r["result"], r["reject_reason"], r["stored"]), ("rejected", 7, []))
        self.assertIn("not configured", r["outcome"])
        self.assertEqual(list(audit._open), ["2-b"])  # the open association is kept until it closes

    def test_reopen_after_logrotate(self):
        path = os.path.join(self.mktemp(), "audit.jsonl")
        audit = AuditTrail(path)
        audit.open()
        self.addCleanup(audit.close)
        audit(_closed("1"))
        os.rename(path, path + ".1")  # logrotate
        audit(_closed("2"))  # still goes to the open (renamed) file
        audit.reopen()
        audit(_closed("3"))
        audit.close()
        with open(path + ".1") as f:
            self.assertEqual([json.loads(line)["association"] for line in f], ["1", "2"])
        with open(path) as f:
            self.assertEqual([json.loads(line)["association"] for line in f], ["3"])

    def test_recent_ring_is_bounded(self):
        ring = RecentAssociations(size=3)
        for i in range(5):
            ring(_closed(f"{i}"))
        ring({"event": "instance.stored"})
        total, items = ring.page(2, 0)
        self.assertEqual((total, [i["association"] for i in items]), (3, ["4", "3"]))


class MetricsTests(unittest.TestCase):
    def test_text_format_and_bounded_series(self):
        from prometheus_client.parser import text_string_to_metric_families

        m = Metrics()
        m.instance_stored('A"B\\', 5, 0.02)
        m.instance_stored('A"B\\', 7, 100.0)
        m({"event": "pipeline.run", "pipeline": "seg", "outcome": "done"})
        m({"event": "export.job.finished", "destination": "pacs"})
        for i in range(MAX_SERIES + 10):
            m({"event": "instance.failed", "called_ae": f"AE{i}", "status": 0xA700})
        m({"event": "association.closed", "result": "rejected", "reject_result": 2, "reject_source": 3,
           "reject_reason": 2})
        m({"no": "event", "log_level": LogLevel.info})
        content_type, text = m.render([("dicomgw_x", "A gauge.", [({"k": "v"}, 1.5)])])
        self.assertTrue(content_type.startswith("text/plain; version="), content_type)
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        self.assertEqual(samples[("dicomgw_received_bytes_total", (("called_ae", 'A"B\\'),))], 12)
        self.assertEqual(samples[("dicomgw_store_latency_seconds_bucket", (("le", "0.025"),))], 1)
        self.assertEqual(samples[("dicomgw_store_latency_seconds_bucket", (("le", "30.0"),))], 1)
        self.assertEqual(samples[("dicomgw_store_latency_seconds_bucket", (("le", "+Inf"),))], 2)
        self.assertAlmostEqual(samples[("dicomgw_store_latency_seconds_sum", ())], 100.02)
        self.assertEqual(samples[("dicomgw_pipeline_runs_total", (("outcome", "done"), ("pipeline", "seg")))], 1)
        self.assertEqual(samples[("dicomgw_export_jobs_total", (("destination", "pacs"), ("outcome", "unknown")))], 1)
        self.assertEqual(samples[("dicomgw_instances_failed_total", (("called_ae", "other"), ("status", "other")))], 10)
        self.assertEqual(samples[("dicomgw_associations_rejected_total",
                                  (("reason", "local-limit-exceeded"), ("result", "transient"),
                                   ("source", "service-provider-presentation")))], 1)
        self.assertEqual(samples[("dicomgw_x", (("k", "v"),))], 1.5)
        self.assertEqual(samples[("dicomgw_config_reloads_total", ())], 0)
        # Ours start with dicomgw_; beside them the standard process and
        # platform collectors.
        for name, _ in samples:
            self.assertTrue(name.startswith(("dicomgw_", "process_", "python_")), name)
        for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total",
                     "process_start_time_seconds"):
            self.assertGreater(samples[(name, ())], 0, name)
        self.assertIn("python_info", {n for n, _ in samples})
        self.assertEqual(samples[("dicomgw_build_info", (("implementation_class_uid", IMPLEMENTATION_CLASS_UID),
                                                         ("version", __version__)))], 1)
        self.assertNotIn("_created", text)

    def test_exposition_is_prometheus_clients(self):
        # The text is what prometheus_client writes for the registry, byte for
        # byte, in the format the scraper asks for.
        from prometheus_client.exposition import generate_latest
        from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

        def steady(text):
            # The process collector reads /proc anew each time: its CPU seconds
            # (and the like) may move between the two renderings.
            return re.sub(r"^(process_\S+) \S+$", r"\1 <value>", text, flags=re.MULTILINE)

        m = Metrics()
        m.instance_stored("CT", 100, 0.5)
        content_type, text = m.render()
        self.assertIn("process_cpu_seconds_total ", text)
        self.assertEqual(steady(text), steady(generate_latest(m.registry).decode()))
        content_type, text = m.render(accept="application/openmetrics-text; version=1.0.0")
        self.assertTrue(content_type.startswith("application/openmetrics-text"), content_type)
        self.assertEqual(steady(text), steady(openmetrics_latest(m.registry).decode()))
        self.assertTrue(text.endswith("# EOF\n"))

    def test_hot_path_reuses_one_child_per_ae_title(self):
        m = Metrics()
        for _ in range(3):
            m.instance_stored("CT", 10, 0.001)
        self.assertEqual(list(m._per_ae), ["CT"])
        self.assertEqual(m.registry.get_sample_value("dicomgw_instances_received_total", {"called_ae": "CT"}), 3)
        self.assertEqual(m.registry.get_sample_value("dicomgw_received_bytes_total", {"called_ae": "CT"}), 30)
        self.assertEqual(m.registry.get_sample_value("dicomgw_store_latency_seconds_count"), 3)
