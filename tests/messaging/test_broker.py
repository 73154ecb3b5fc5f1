"""The broker connection's own logic with a Clock: confirm timeouts, backoff,
state changes logged once.  (Connections to the real broker: the
integration tests.)"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from gateway.messaging import monai
from gateway.messaging.broker import Broker, BrokerUnavailable
from gateway.config import Messaging

MESSAGE = monai.Message("k", b"{}", "id-1", "c-1", "WorkflowRequestEvent", 0.0)


class _Transport:
    def __init__(self):
        self.lost = 0

    def loseConnection(self):
        self.lost += 1


class _Connection:
    def __init__(self):
        self.transport = _Transport()


class _Channel:
    def __init__(self):
        self.sent = []

    def basic_publish(self, exchange, routing_key, body, properties):
        d = defer.Deferred()
        self.sent.append((exchange, routing_key, body, properties, d))
        return d


class BrokerTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.broker = Broker(Messaging(url="amqp://u:secret@127.0.0.1:1/%2F", exchange="ex"), self.clock)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def connect(self):
        self.broker.connected = True
        self.broker.connection = _Connection()
        self.broker.publisher = _Channel()
        return self.broker.publisher

    def test_publish_sets_monai_properties_and_fires_on_confirm(self):
        channel = self.connect()
        d = self.broker.publish(MESSAGE)
        [(exchange, key, body, props, confirm)] = channel.sent
        self.assertEqual((exchange, key, body), ("ex", "k", b"{}"))
        self.assertEqual((props.content_type, props.delivery_mode, props.message_id, props.correlation_id,
                          props.app_id, props.type), ("application/json", 2, "id-1", "c-1", "dicomgw",
                                                      "WorkflowRequestEvent"))
        self.assertNoResult(d)
        confirm.callback("ack")
        self.assertEqual(self.successResultOf(d), "ack")

    def test_no_confirm_in_time_fails_and_drops_the_connection(self):
        channel = self.connect()
        d = self.broker.publish(MESSAGE)
        self.clock.advance(self.broker.confirm_timeout)
        self.failureResultOf(d, defer.TimeoutError)
        self.assertEqual(self.broker.connection.transport.lost, 1)
        self.assertIn("publisher confirm", self.broker._dropping)
        channel.sent[0][4].callback("late")  # a confirmation after all: ignored, no error

    def test_refused_while_disconnected(self):
        self.failureResultOf(self.broker.publish(MESSAGE), BrokerUnavailable)

    def test_backoff_doubles_to_the_limit_and_each_state_is_logged_once(self):
        self.broker.running = True  # no real connection attempts: _connect is replaced
        attempts = []
        self.broker._connect = lambda: attempts.append(self.clock.seconds())
        delays = []
        for _ in range(7):
            self.broker._down("connection refused")
            delays.append(self.broker._retry.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])
        self.assertEqual(len(attempts), 7)
        states = [e for e in self.events if e.get("event") == "messaging.broker"]
        self.assertEqual([e["state"] for e in states], ["disconnected"])
        self.assertNotIn("secret", states[0]["url"])
        self.broker._change("connected", None)
        self.broker._down("connection lost")
        self.assertEqual([e["state"] for e in self.events if e.get("event") == "messaging.broker"],
                         ["disconnected", "connected", "disconnected"])
