"""A recording TCP relay: put it between a real peer and the gateway to see
the exact bytes the gateway sent (e.g. the A-ASSOCIATE-RJ PDU)."""

from __future__ import annotations

import struct

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint


class _ToGateway(protocol.Protocol):
    def __init__(self, front):
        self.front = front

    def dataReceived(self, data):
        self.front.record.from_gateway += data
        self.front.transport.write(data)

    def connectionLost(self, reason):
        self.front.transport.loseConnection()


class _FromPeer(protocol.Protocol):
    def __init__(self, relay):
        self.relay = relay
        self.back = None
        self.pending = []
        self.record = Connection()

    def connectionMade(self):
        self.relay.connections.append(self.record)
        self.transport.pauseProducing()
        d = TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.target).connect(
            protocol.Factory.forProtocol(lambda: _ToGateway(self)))
        d.addCallbacks(self._connected, lambda _f: self.transport.loseConnection())

    def _connected(self, back):
        self.back = back
        self.transport.resumeProducing()

    def dataReceived(self, data):
        self.record.from_peer += data
        self.back.transport.write(data)

    def connectionLost(self, reason):
        if self.back is not None:
            self.back.transport.loseConnection()


class Connection:
    def __init__(self):
        self.from_gateway = bytearray()
        self.from_peer = bytearray()

    def first_pdu(self) -> tuple[int, bytes]:
        """(PDU type, whole PDU bytes) of the first PDU the gateway sent."""
        pdu_type, length = struct.unpack_from(">BxL", self.from_gateway)
        return pdu_type, bytes(self.from_gateway[:6 + length])


class RecordingRelay:
    def __init__(self, target: int):
        self.target = target
        self.connections: list[Connection] = []
        self.port = None

    @classmethod
    @defer.inlineCallbacks
    def start(cls, testcase, target: int):
        relay = cls(target)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(lambda: _FromPeer(relay)))
        relay.port = port.getHost().port
        testcase.addCleanup(port.stopListening)
        return relay


def rj_bytes(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU as PS3.8 9.3.4 lays it out."""
    return bytes([0x03, 0, 0, 0, 0, 4, 0, result, source, reason])
