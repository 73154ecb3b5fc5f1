"""The real daemon: ``twistd -n dicomgw`` finds the plugin, serves, logs, stops."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import sys
import time

from twisted.internet import defer, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.integration.harness import free_port, gateway_config, require_program, run

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class DaemonCase(unittest.TestCase):
    """Tests that run ``twistd -n dicomgw`` in a directory of their own
    (storage ``var/dicomgw``, fsync on), kill it and start it again."""

    timeout = 120

    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.procs = []

    def tearDown(self):
        for proc in self.procs:
            if proc.poll() is None:
                _stop(proc)

    def path(self, *parts):
        return os.path.join(self.workdir, *parts)

    def daemon_config(self) -> str:
        """The test config with the DICOM port on ``self.port``, a fresh one; no [[ae]]."""
        self.port = free_port()
        return gateway_config("var/dicomgw", aes=(), fsync=True).replace(
            "tcp:0:interface=127.0.0.1", f"tcp:{self.port}:interface=127.0.0.1")

    @defer.inlineCallbacks
    def launch(self, text):
        """Start the daemon with config ``text``; fires once it listens."""
        with open(self.path("dicomgw.toml"), "w") as f:
            f.write(text)
        proc = _spawn(self.workdir, self.path(f"twistd{len(self.procs)}.log"))
        self.procs.append(proc)
        yield _wait_for_port(self.port)
        return proc

    def kill(self, proc):
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def query(self, sql, *args):
        conn = sqlite3.connect(self.path("var", "dicomgw", "dicomgw.sqlite"))
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()


class TwistdTests(unittest.TestCase):
    timeout = 60

    def test_plugin_listed(self):
        d = getProcessOutputAndValue(TWISTD, ["--help"], env=dict(os.environ))

        def check(result):
            out, err, code = result
            self.assertEqual(code, 0, err)
            self.assertIn(b"dicomgw", out)

        return d.addCallback(check)

    def test_bad_config_names_the_key(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[timeouts]\nartim = -1\n[[ae]]\ntitle = "X"\n')
        d = getProcessOutputAndValue(TWISTD, ["-n", "--pidfile=", "dicomgw", "--config", path],
                                     env=dict(os.environ))

        def check(result):
            out, err, code = result
            self.assertNotEqual(code, 0)
            self.assertIn(b"timeouts.artim", out + err)
            self.assertIn(path.encode(), out + err)

        return d.addCallback(check)

    @defer.inlineCallbacks
    def test_serves_echo_and_logs_the_association(self):
        require_program("echoscu")
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        port = free_port()
        config = gateway_config("var/dicomgw").replace("tcp:0:interface=127.0.0.1",
                                                       f"tcp:{port}:interface=127.0.0.1")
        with open(os.path.join(workdir, "dicomgw.toml"), "w") as f:
            f.write(config)
        log = os.path.join(workdir, "twistd.log")
        proc = _spawn(workdir, log)
        self.addCleanup(_stop, proc)
        yield _wait_for_port(port)
        out, err, code = yield run("echoscu", "-aec", "DICOMGW", "127.0.0.1", str(port))
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.isdir(os.path.join(workdir, "var", "dicomgw", "instances")))
        for _ in range(50):
            with open(log) as f:
                text = f.read()
            if "ECHOSCU -> DICOMGW" in text:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertIn("ECHOSCU -> DICOMGW from 127.0.0.1", text)
        self.assertIn("released", text)


def _spawn(workdir, log):
    import subprocess

    return subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "--logfile", log, "dicomgw", "--config", "dicomgw.toml"],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except Exception:
        proc.kill()
        proc.wait()


@defer.inlineCallbacks
def _wait_for_port(port, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            yield task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"gateway did not listen on {port}")
