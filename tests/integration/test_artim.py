"""ARTIM on a real socket: a connection that never associates is closed."""

from __future__ import annotations

import socket
import time

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.integration.harness import start_gateway


class ArtimTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_silent_connection_closed_after_artim(self):
        gw = yield start_gateway(self, artim=1)

        def wait_for_close():
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            start = time.monotonic()
            try:
                data = s.recv(100)  # blocks until the gateway closes
            except ConnectionResetError:
                data = b""
            finally:
                s.close()
            return data, time.monotonic() - start

        data, elapsed = yield deferToThread(wait_for_close)
        self.assertEqual(data, b"")
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 5)
        self.assertEqual(gw.scp.active, set())
