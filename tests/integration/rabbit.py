"""A real RabbitMQ for tests: a throwaway exchange and queues per test, and a
TCP relay a test can cut to take the broker away from the gateway.

The broker is the one on 127.0.0.1:5672 (guest/guest, vhost /); names are
unique per test so runs never share a queue.  Where no broker answers the
tests are skipped, except in CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import json
import time
import uuid

from twisted.internet import defer, reactor
from twisted.protocols import portforward
from twisted.trial.unittest import SkipTest

from tests.integration.harness import IN_CI, in_thread

HOST, PORT = "127.0.0.1", 5672
URL = f"amqp://guest:guest@{HOST}:{PORT}/%2F"


def _blocking():
    import pika

    return pika.BlockingConnection(pika.URLParameters(URL + "?connection_attempts=1&socket_timeout=5"))


def require_rabbitmq():
    try:
        import pika  # noqa: F401

        _blocking().close()
    except Exception as e:
        if IN_CI:
            raise AssertionError(f"RabbitMQ is required in CI on {HOST}:{PORT} ({e}); .ci/run starts one")
        raise SkipTest(f"no RabbitMQ on {HOST}:{PORT}: {e}")


class ThrowawayBroker:
    """An exchange of the test's own, queues bound to it, read from a thread."""

    def __init__(self, testcase, keys=("md.workflow.request", "md.export.complete")):
        require_rabbitmq()
        tag = uuid.uuid4().hex[:10]
        self.exchange = f"dicomgw-test-{tag}"
        self.agent = f"agent{tag}"
        self.queues = {}
        conn = _blocking()
        try:
            ch = conn.channel()
            ch.exchange_declare(self.exchange, "topic", durable=True)
            for key in keys:
                name = f"{self.exchange}.{key}"
                ch.queue_declare(name, durable=False, auto_delete=False)
                ch.queue_bind(name, self.exchange, key)
                self.queues[key] = name
        finally:
            conn.close()
        testcase.addCleanup(in_thread, self.delete)

    def settings(self, url=URL, **extra) -> str:
        lines = [f'url = "{url}"', f'exchange = "{self.exchange}"', f'export_agents = ["{self.agent}"]']
        lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
        return "[messaging]\n" + "\n".join(lines) + "\n"

    @property
    def export_queue(self):
        return f"md.export.request.{self.agent}"

    def delete(self):
        conn = _blocking()
        try:
            ch = conn.channel()
            for name in [*self.queues.values(), self.export_queue]:
                ch.queue_delete(name)
            ch.exchange_delete(self.exchange)
        finally:
            conn.close()

    # -- blocking, run in a thread -------------------------------------------------

    def _drain(self, key):
        conn = _blocking()
        out = []
        try:
            ch = conn.channel()
            for _ in range(100_000):
                method, props, body = ch.basic_get(self.queues[key], auto_ack=True)
                if method is None:
                    break
                out.append((props, body))
        finally:
            conn.close()
        return out

    def _publish(self, routing_key, body, message_id):
        import pika

        conn = _blocking()
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish(self.exchange, routing_key, body,
                             pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                                  message_id=message_id), mandatory=True)
        finally:
            conn.close()

    def _depth(self, queue):
        conn = _blocking()
        try:
            ok = conn.channel().queue_declare(queue, passive=True)
            return ok.method.message_count, ok.method.consumer_count
        finally:
            conn.close()

    # -- for tests -------------------------------------------------------------------

    def publish_export_request(self, body, message_id=None):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        return in_thread(self._publish, self.export_queue, body, message_id or str(uuid.uuid4()))

    def depth(self, queue=None):
        """(messages ready, consumers) of a queue (default: the export queue)."""
        return in_thread(self._depth, queue or self.export_queue)

    @defer.inlineCallbacks
    def collect(self, key, count, timeout=30.0, settle=0.0):
        """Messages on ``key``'s queue until there are ``count`` of them (then
        ``settle`` seconds more, to catch extras): [(properties, body dict)]."""
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got += yield in_thread(self._drain, key)
            if len(got) >= count:
                break
            yield sleep(0.1)
        if settle:
            yield sleep(settle)
            got += yield in_thread(self._drain, key)
        return [(p, json.loads(b)) for p, b in got]


def sleep(seconds):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


class _RelayServer(portforward.ProxyServer):
    def connectionMade(self):
        self.factory.relay.open_connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason):
        self.factory.relay.open_connections.discard(self)
        super().connectionLost(reason)


class Relay:
    """127.0.0.1:<port> -> the broker; :meth:`cut` drops every connection and
    stops listening, :meth:`restore` listens on the same port again."""

    def __init__(self, target_port=PORT):
        self.target_port = target_port
        self.open_connections = set()
        self.port = None
        self.listening = None

    def _factory(self):
        factory = portforward.ProxyFactory(HOST, self.target_port)
        factory.protocol = _RelayServer
        factory.relay = self
        return factory

    def start(self, port=0):
        self.listening = reactor.listenTCP(port, self._factory(), interface=HOST)
        self.port = self.listening.getHost().port
        return self.port

    @property
    def url(self):
        return f"amqp://guest:guest@{HOST}:{self.port}/%2F"

    @defer.inlineCallbacks
    def cut(self):
        if self.listening is not None:
            yield self.listening.stopListening()
            self.listening = None
        for server in list(self.open_connections):
            server.transport.abortConnection()
            if server.peer is not None and server.peer.transport is not None:
                server.peer.transport.abortConnection()

    def restore(self):
        return self.start(self.port)


class TLSRelay(Relay):
    """The same relay with TLS in front: amqps:// to it, plain AMQP behind it."""

    def __init__(self, cert_dir, target_port=PORT):
        super().__init__(target_port)
        self.cert_dir = cert_dir

    def _factory(self):
        from twisted.internet import ssl
        from twisted.protocols.tls import TLSMemoryBIOFactory

        with open(f"{self.cert_dir}/server.pem") as f:
            cert = f.read()
        with open(f"{self.cert_dir}/server.key") as f:
            key = f.read()
        options = ssl.PrivateCertificate.loadPEM(cert + key).options()
        return TLSMemoryBIOFactory(options, False, super()._factory())

    @property
    def url(self):
        return f"amqps://guest:guest@{HOST}:{self.port}/%2F"
