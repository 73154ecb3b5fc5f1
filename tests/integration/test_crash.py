"""kill -9 of the real daemon (``twistd -n dicomgw``) and restart.

After a crash: acknowledged instances of released associations are still on
disk, indexed and in their payload, which closes and is handed off once;
the association the crash broke contributes nothing; temporary files go.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pydicom
from twisted.internet import defer, reactor, task

from gateway.testing import partial_files
from tests import dicomfiles
from tests.integration import test_twistd as tw
from tests.integration.harness import in_thread, require_pynetdicom, run
from tests.integration.test_payloads import PY, toml_list

# Appends "<payload id> <instances>" to handoff.log in the gateway's directory.
HANDOFF = ("import json, os\n"
           "m = json.load(open(os.environ['DICOMGW_MANIFEST']))\n"
           "with open('handoff.log', 'a') as f:\n"
           "    f.write(f\"{m['payload']} {len(m['instances'])}\\n\")\n")


class CrashTests(tw.DaemonCase):
    def start(self, timeout, command=HANDOFF, storage_keys=""):
        text = self.daemon_config().replace("[storage]\n", "[storage]\n" + storage_keys + "\n", 1)
        text += (f'\n[pipeline.handoff]\ncommand = {toml_list([PY, "-c", command])}\n'
                 f'[[ae]]\ntitle = "DICOMGW"\ngrouping = "study"\ntimeout = {timeout}\n'
                 'pipelines = ["handoff"]\n')
        return self.launch(text)

    def handoffs(self):
        try:
            with open(self.path("handoff.log")) as f:
                return [line.split() for line in f.read().splitlines()]
        except FileNotFoundError:
            return []

    @defer.inlineCallbacks
    def wait_for(self, predicate, what, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            yield task.deferLater(reactor, 0.1, lambda: None)
        raise AssertionError(f"timed out waiting for {what}")

    def check_payload(self, files, pid):
        """The payload holds exactly ``files``, byte for byte, indexed and hashed."""
        [(path, state)] = self.query("SELECT path, state FROM payloads WHERE id = ?", pid)
        self.assertEqual(state, "done")
        rows = self.query("SELECT sop_instance_uid, path, digest, state FROM instances WHERE payload = ?", pid)
        sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in files}
        self.assertEqual({r[0] for r in rows}, set(sent))
        for uid, stored, digest, state in rows:
            self.assertEqual(state, "payload")
            self.assertTrue(digest.startswith("blake3:"), digest)
            self.assertEqual(os.path.dirname(stored), path)
            self.assertEqual(dicomfiles.dataset_bytes(stored), dicomfiles.dataset_bytes(sent[uid]))
        self.assertEqual(self.query("SELECT attempts, state FROM jobs WHERE payload = ?", pid), [(1, "done")])

    @defer.inlineCallbacks
    def test_kill_just_after_release(self):
        files = dicomfiles.make_series(self.mktemp(), 3, rows=32, cols=32)
        proc = yield self.start(timeout=3)
        out, err, code = yield run("storescu", "-aec", "DICOMGW", "127.0.0.1", str(self.port), *files)
        self.assertEqual(code, 0, err)
        self.kill(proc)  # the A-RELEASE-RP is out; the payload is still open
        self.assertEqual(self.handoffs(), [])
        os.makedirs(self.path("var", "dicomgw", "tmp"), exist_ok=True)
        with open(self.path("var", "dicomgw", "tmp", "leftover.part"), "wb") as f:
            f.write(b"half an instance")

        yield self.start(timeout=0.5)
        yield self.wait_for(lambda: self.handoffs(), "the payload to be handed off")
        yield task.deferLater(reactor, 1.0, lambda: None)  # nothing is handed off twice
        [(pid, count)] = self.handoffs()
        self.assertEqual(count, "3")
        yield self.wait_for(lambda: self.query("SELECT state FROM payloads") == [("done",)], "payload done")
        self.check_payload(files, pid)
        self.assertEqual(partial_files(self.path("var", "dicomgw", "tmp")), [])
        self.assertEqual(self.query("SELECT state FROM associations"), [("released",)])

    def test_kill_mid_association(self):
        return self.kill_mid_association(retention=0)

    def test_kill_mid_association_with_aborted_retention(self):
        return self.kill_mid_association(retention=600)

    @defer.inlineCallbacks
    def kill_mid_association(self, retention):
        pynetdicom = require_pynetdicom()
        study_a = dicomfiles.make_series(self.mktemp(), 2, rows=32, cols=32)
        study_b = dicomfiles.make_series(self.mktemp(), 5, rows=32, cols=32)
        proc = yield self.start(timeout=5)
        out, err, code = yield run("storescu", "-aec", "DICOMGW", "127.0.0.1", str(self.port), *study_a)
        self.assertEqual(code, 0, err)

        two_stored, killed = threading.Event(), threading.Event()

        def send():
            ae = pynetdicom.AE(ae_title="PYNETDICOM")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
            ae.add_requested_context(pydicom.uid.CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", self.port, ae_title="DICOMGW")
            assert assoc.is_established
            statuses = []
            for i, path in enumerate(study_b):
                if i == 2:
                    two_stored.set()
                    killed.wait(20)
                try:
                    status = assoc.send_c_store(path)
                    statuses.append(status.Status if "Status" in status else None)
                except Exception:
                    statuses.append(None)
            assoc.abort()
            return statuses

        d = in_thread(send)
        yield self.wait_for(two_stored.is_set, "two instances acknowledged")
        self.kill(proc)
        killed.set()
        statuses = yield d
        self.assertEqual(statuses[:2], [0, 0])
        self.assertEqual(statuses[2:], [None, None, None])
        uids_b = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study_b}
        self.assertEqual(self.handoffs(), [])

        yield self.start(timeout=0.5, storage_keys=f"aborted_retention = {retention}")
        yield self.wait_for(lambda: self.handoffs(), "study A to be handed off")
        yield self.wait_for(lambda: self.query("SELECT state FROM payloads") == [("done",)], "payload done")
        yield task.deferLater(reactor, 1.0, lambda: None)
        [(pid, count)] = self.handoffs()  # study A only, once
        self.assertEqual(count, "2")
        self.check_payload(study_a, pid)
        # The broken association's instances were acknowledged but never
        # released: removed, in no payload, and not on disk.
        self.assertEqual(sorted(self.query("SELECT state FROM associations")), [("broken",), ("released",)])
        rows = self.query("SELECT sop_instance_uid, state, payload FROM instances WHERE sop_instance_uid IN "
                          f"({', '.join('?' * len(uids_b))})", *uids_b)
        self.assertEqual(len(rows), 2)
        inbox = self.path("var", "dicomgw", "instances", "DICOMGW")
        left = sorted(os.listdir(inbox)) if os.path.isdir(inbox) else []
        if retention:  # kept for inspection, in no payload, until the retention is over
            self.assertEqual({(r[1], r[2]) for r in rows}, {("aborted", None)})
            self.assertEqual(left, sorted(f"{r[0]}.dcm" for r in rows))
        else:
            self.assertEqual({(r[1], r[2]) for r in rows}, {("removed", None)})
            self.assertEqual(left, [])

    @defer.inlineCallbacks
    def test_kill_while_the_pipeline_runs(self):
        """The job runs again after the restart, recorded as attempt 2."""
        # Records its attempt and pid, then waits (at most 20 s) for the test's go-ahead.
        command = ("import os, sys, time\n"
                   "open('attempts.log', 'a').write(os.environ['DICOMGW_ATTEMPT'] + ' ' + str(os.getpid()) + '\\n')\n"
                   "for _ in range(400):\n"
                   "    if os.path.exists('go'): sys.exit(0)\n"
                   "    time.sleep(0.05)\n"
                   "sys.exit(1)\n")
        files = dicomfiles.make_series(self.mktemp(), 2, rows=16, cols=16)
        proc = yield self.start(timeout=0.3, command=command)
        out, err, code = yield run("storescu", "-aec", "DICOMGW", "127.0.0.1", str(self.port), *files)
        self.assertEqual(code, 0, err)

        def attempts():
            try:
                with open(self.path("attempts.log")) as f:
                    return [line.split() for line in f.read().splitlines()]
            except FileNotFoundError:
                return []

        yield self.wait_for(attempts, "the pipeline to start")
        self.kill(proc)
        [(attempt, pid)] = attempts()
        self.assertEqual(attempt, "1")
        os.kill(int(pid), signal.SIGKILL)  # the orphaned pipeline process of the killed gateway
        yield self.start(timeout=0.3, command=command)
        yield self.wait_for(lambda: len(attempts()) == 2, "the job to run again")
        open(self.path("go"), "w").close()
        yield self.wait_for(lambda: self.query("SELECT state FROM jobs") == [("done",)], "job done")
        self.assertEqual([a for a, _ in attempts()], ["1", "2"])
        self.assertEqual(self.query("SELECT attempts, reason FROM jobs"), [(2, None)])
        self.assertEqual(self.query("SELECT state, COUNT(*) FROM payloads"), [("done", 1)])
