"""SIGHUP reload: merged repeats, valid and invalid files, a running association."""

from __future__ import annotations

import os
import signal

from twisted.application.service import MultiService, Service
from twisted.internet import defer, reactor, task
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from gateway.config import ConfigError, config_from_string, load_config
from gateway.interfaces import IReconfigurable
from gateway.ops.reload import ReloadService, changed_keys
from gateway.tap import makeService
from gateway.testing import finished, listening_port
from gateway.threads import run_with_callback
from tests import dicomfiles
from tests.integration.harness import gateway_config, in_thread, require_pynetdicom

BASE = '[[ae]]\ntitle = "A"\n'


class _ImmediateReactor:
    def callFromThread(self, f, *a, **kw):
        f(*a, **kw)


class _ManualPool:
    """A thread pool whose jobs the test runs by hand, one at a time."""

    def __init__(self):
        self.jobs = []

    def callInThreadWithCallback(self, on_result, f, *a, **kw):
        self.jobs.append((on_result, f, a, kw))

    def run_next(self):
        on_result, f, a, kw = self.jobs.pop(0)
        run_with_callback(on_result, f, a, kw)


@implementer(IReconfigurable)
class _Target(Service):
    def __init__(self):
        self.configs = []

    def reconfigure(self, config):
        self.configs.append(config)


class ReloadUnitTests(unittest.TestCase):
    def setUp(self):
        self.root = MultiService()
        self.target = _Target()
        self.target.setServiceParent(self.root)
        self.pool = _ManualPool()
        self.loads = 0
        self.texts = [BASE.replace('"A"', '"B"'), BASE.replace('"A"', '"C"')]

        def loader(path):
            self.loads += 1
            return config_from_string(self.texts.pop(0), path)

        self.reload = ReloadService("cfg.toml", config_from_string(BASE), self.root, _ImmediateReactor(),
                                    self.pool, loader=loader, install_signal=False)
        self.reload.setServiceParent(self.root)

    def test_repeats_while_running_are_merged_into_one_more(self):
        done = []
        self.reload.reload().addCallback(done.append)
        self.reload.reload()
        self.reload.reload()
        self.assertEqual(len(self.pool.jobs), 1)  # one at a time
        self.pool.run_next()
        self.assertEqual(len(self.pool.jobs), 1)  # the merged repeats: exactly one more
        self.assertEqual(done, [])
        self.pool.run_next()
        self.assertEqual(self.pool.jobs, [])
        self.assertEqual(self.loads, 2)
        self.assertEqual(done, [None])
        self.assertEqual([c.ae[0].title for c in self.target.configs], ["B", "C"])
        self.assertEqual(self.reload.config.ae[0].title, "C")

    def test_extra_targets_and_failing_target(self):
        @implementer(IReconfigurable)
        class Broken:
            def reconfigure(self, config):
                raise RuntimeError("nope")

        extra = _Target()
        self.reload.add(Broken())
        self.reload.add(extra)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.reload.reload()
        self.pool.run_next()
        self.assertEqual(len(extra.configs), 1)
        self.assertEqual(len(self.target.configs), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(any(e.get("event") == "config.reloaded" for e in logged))

    def test_changed_keys_and_what_needs_a_restart(self):
        a = config_from_string(BASE)
        b = config_from_string('[listen]\ndicom = "tcp:104"\n[timeouts]\nartim = 5\n'
                               '[storage]\nfsync = false\ncheck_interval = 3\n' + BASE.replace('"A"', '"Z"'))
        self.assertEqual(changed_keys(a, b), (
            ["listen.dicom", "timeouts.artim", "storage.fsync", "storage.check_interval", "ae"],
            ["listen.dicom", "storage.check_interval"]))
        self.assertEqual(changed_keys(a, config_from_string(BASE, "elsewhere.toml")), ([], []))


class ReloadGatewayTests(unittest.TestCase):
    timeout = 60

    def write(self, text):
        with open(self.path, "w") as f:
            f.write(text)

    @defer.inlineCallbacks
    def start(self, text):
        self.path = os.path.abspath(self.mktemp())
        self.write(text)
        service = makeService({"config": self.path, "config_object": load_config(self.path)}, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = yield listening_port(service)
        return service, port.getHost().port

    @defer.inlineCallbacks
    def sighup_and_wait(self, service):
        before = service.getServiceNamed("reload").reloads
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):
            if service.getServiceNamed("reload").reloads > before and service.getServiceNamed("reload")._running is None:
                return
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.fail("the reload did not finish")

    @defer.inlineCallbacks
    def test_storage_fsync_follows_a_reload_in_the_files_and_both_databases(self):
        storage = os.path.abspath(self.mktemp())
        service, _port = yield self.start(gateway_config(storage, fsync=True))

        def synchronous(conn):  # inside a durable commit: 2 = FULL (fsync), 1 = NORMAL
            return conn.execute("PRAGMA synchronous").fetchone()[0]

        index = service.getServiceNamed("payloads").db
        exports = service.getServiceNamed("export").store.db
        scp_storage = service.getServiceNamed("scp").storage
        self.assertEqual(((yield index.run_durable(synchronous)), (yield exports.run_durable(synchronous)),
                          scp_storage.fsync), (2, 2, True))
        self.write(gateway_config(storage, fsync=False))
        yield self.sighup_and_wait(service)
        self.assertEqual(((yield index.run_durable(synchronous)), (yield exports.run_durable(synchronous)),
                          scp_storage.fsync), (1, 1, False))
        # And the instance files: no fsync now.
        fsyncs = []
        real = os.fsync
        self.patch(os, "fsync", lambda fd: (fsyncs.append(fd), real(fd))[1])
        writer = scp_storage.begin(called_ae="DICOMGW", calling_ae="T", sop_class_uid="1.2.3",
                                   sop_instance_uid="1.2.3.4", transfer_syntax_uid="1.2.840.10008.1.2")
        writer.write(b"\x00" * 100)
        yield finished(writer)
        self.assertEqual(fsyncs, [])

    @defer.inlineCallbacks
    def test_sighup_under_a_running_association(self):
        pynetdicom = require_pynetdicom()
        storage = os.path.abspath(self.mktemp())
        text = gateway_config(storage, aes=("DICOMGW",))
        service, port = yield self.start(text)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        src = self.mktemp()
        os.makedirs(src)
        files = [dicomfiles.small_instance(os.path.join(src, f"{i}.dcm"), number=i) for i in range(2)]

        ae = pynetdicom.AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        assoc = yield in_thread(ae.associate, "127.0.0.1", port, ae_title="DICOMGW")
        self.assertTrue(assoc.is_established)
        try:
            status = yield in_thread(lambda: assoc.send_c_store(files[0]).Status)
            self.assertEqual(status, 0)
            # The new file serves NEWAE only and moves the port (restart needed).
            self.write(gateway_config(storage, aes=("NEWAE",), artim=7, dimse=9).replace(
                "tcp:0:interface=127.0.0.1", "tcp:1:interface=127.0.0.1"))
            yield self.sighup_and_wait(service)
            self.assertEqual([a.title for a in service.getServiceNamed("scp").config.ae], ["NEWAE"])
            new_protocol = service.getServiceNamed("scp").factory().buildProtocol(None)
            self.assertEqual((new_protocol.artim_timeout, new_protocol.dimse_timeout), (7, 9))
            # The association in progress finishes under the rules it started with.
            status = yield in_thread(lambda: assoc.send_c_store(files[1]).Status)
            self.assertEqual(status, 0)
        finally:
            yield in_thread(assoc.release)
        self.assertEqual(len(os.listdir(os.path.join(storage, "instances", "DICOMGW"))), 2)

        # New associations get the new rules; the listener was not rebound.
        rejected = yield in_thread(ae.associate, "127.0.0.1", port, ae_title="DICOMGW")
        self.assertTrue(rejected.is_rejected)
        accepted = yield in_thread(ae.associate, "127.0.0.1", port, ae_title="NEWAE")
        self.assertTrue(accepted.is_established)
        yield in_thread(accepted.release)

        reloaded = [e for e in logged if e.get("event") == "config.reloaded"]
        self.assertEqual(len(reloaded), 1)
        self.assertEqual(reloaded[0]["restart_needed"], ["listen.dicom"])
        self.assertIn("ae", reloaded[0]["changes"])
        warnings = [e for e in logged if e.get("event") == "config.restart_needed"]
        self.assertEqual(len(warnings), 1)
        self.assertIn("restart needed: listen.dicom changed", _text(warnings[0]))

    @defer.inlineCallbacks
    def test_invalid_file_keeps_the_old_config_and_lists_every_problem(self):
        storage = os.path.abspath(self.mktemp())
        service, port = yield self.start(gateway_config(storage))
        old = service.getServiceNamed("scp").config
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.write('[timeouts]\nartim = -1\n[gateway]\nmax_pdu_length = "big"\n[[ae]]\ntitle = "X"\n')
        yield self.sighup_and_wait(service)
        self.assertIs(service.getServiceNamed("scp").config, old)
        self.assertIs(service.getServiceNamed("reload").config, old)
        failed = [e for e in logged if e.get("event") == "config.reload_failed"]
        self.assertEqual(len(failed), 1)
        problems = failed[0]["problems"]
        self.assertEqual(len(problems), 2, problems)
        self.assertTrue(any(p.startswith("timeouts.artim") for p in problems))
        self.assertTrue(any(p.startswith("gateway.max_pdu_length") for p in problems))
        text = _text(failed[0])
        self.assertIn(self.path, text)
        self.assertIn("timeouts.artim", text)
        self.assertIn("NOT reloaded", text)
        # Still serving under the old config.
        from tests.integration.harness import run

        out, err, code = yield run("echoscu", "-aec", "DICOMGW", "127.0.0.1", str(port))
        self.assertEqual(code, 0, err)

    def test_unreadable_file_is_a_config_error(self):
        with self.assertRaises(ConfigError):
            load_config(self.mktemp())


def _text(event):
    from twisted.logger import formatEvent

    return formatEvent(event)
