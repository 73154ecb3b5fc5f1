"""Writes on a real loopback TCP connection: sent at once when nothing is queued, in order always."""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from gateway.net.protocol import DirectWriter


class Collect(Protocol):
    def __init__(self):
        self.data = bytearray()

    def dataReceived(self, data):
        self.data += data


class WriteTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_sent_at_once_when_nothing_is_queued_and_in_order_otherwise(self):
        accepted = defer.Deferred()

        class Server(Protocol):
            def connectionMade(self):
                accepted.callback(self)

        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Server))
        self.addCleanup(port.stopListening)
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(Collect))
        self.addCleanup(client.transport.loseConnection)
        server = yield accepted
        transport = server.transport
        self.addCleanup(transport.loseConnection)
        _write = DirectWriter(transport).write

        _write(b"a" * 100)
        # On the socket already: Twisted did not have to watch for writability.
        self.assertNotIn(transport, reactor.getWriters())

        # More than the socket takes: the rest is queued, and what follows
        # waits behind it.
        big = bytes(range(256)) * 100_000
        _write(big)
        self.assertIn(transport, reactor.getWriters())
        _write(b"z" * 10)

        expected = b"a" * 100 + big + b"z" * 10
        for _ in range(1000):
            if len(client.data) >= len(expected):
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(bytes(client.data), expected)
