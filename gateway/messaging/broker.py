"""The broker connection: pika's Twisted adapter, reconnection, confirms.

:class:`Broker` keeps one AMQP connection to ``[messaging] url`` with two
channels: one in publisher-confirm mode for what the gateway publishes, one
for the export request consumers (manual acknowledgements, ``prefetch``
unacknowledged messages at most).  At every connection it declares the
exchange (topic, durable) and each consumer's queue (durable) and binding.

When the connection cannot be made or is lost, it tries again after 1 s,
then 2, 4, ... up to :data:`MAX_DELAY` s, and logs only the changes of state
(connected, disconnected), not every attempt.  A channel the broker closes
(a declaration it refused, say) ends the connection the same way.  DICOM
never waits for any of it: what is to be published waits in the outbox.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pika
from pika.adapters.twisted_connection import TwistedProtocolConnection
from pika.exceptions import AMQPConnectionError
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.interfaces import IMessageBroker

MIN_DELAY = 1.0
MAX_DELAY = 30.0
#: Seconds for the TCP connection plus the AMQP handshake and declarations.
CONNECT_TIMEOUT = 20.0
#: Seconds a publish may wait for its confirmation (a broker that blocks
#: publishers, on a memory or disk alarm, sends none): then the connection is
#: dropped and made again, and the message waits in the outbox meanwhile.
CONFIRM_TIMEOUT = 60.0


class BrokerUnavailable(Exception):
    """Not connected to the broker now."""


class _Connection(TwistedProtocolConnection):
    """pika's protocol, keeping why the transport went (pika reports a failed
    handshake only as "connection attempts exhausted")."""

    lost = None

    def connectionLost(self, reason=None):
        self.lost = reason
        if reason is None:
            super().connectionLost()
        else:
            super().connectionLost(reason)


def _handshake_failure(failure, protocol) -> str:
    if failure.check(AMQPConnectionError) and protocol.lost is not None:
        if protocol.lost.check(ConnectionDone):
            return ("the broker closed the connection during the handshake "
                    "(user, password or virtual host refused?)")
        return _why(protocol.lost)
    return _why(failure)


class Delivery:
    """One message from a queue; settle it once with :meth:`ack` or :meth:`reject`.

    Settling on a channel that has gone since is a no-op: the broker gives
    the message to a consumer again, and the handler's de-duplication
    recognises it.
    """

    def __init__(self, channel, method, properties, body):
        self.channel = channel
        self.delivery_tag = method.delivery_tag
        self.redelivered = bool(method.redelivered)
        self.routing_key = method.routing_key
        self.properties = properties
        self.body = body
        self.message_id = properties.message_id
        self.settled = None

    def _usable(self):
        return self.settled is None and self.channel.is_open

    def ack(self):
        if self._usable():
            self.channel.basic_ack(self.delivery_tag)
            self.settled = "ack"

    def requeue(self):
        """Give the message back to the queue (our own fault, not the message's)."""
        if self._usable():
            self.channel.basic_reject(self.delivery_tag, requeue=True)
            self.settled = "requeue"

    def reject(self):
        """Reject without requeueing: dead-lettered if the queue has a
        dead-letter exchange (a policy), dropped otherwise."""
        if self._usable():
            self.channel.basic_reject(self.delivery_tag, requeue=False)
            self.settled = "reject"


@implementer(IMessageBroker)
class Broker(Service):
    log = Logger()

    def __init__(self, settings, reactor, tls_options=None):
        self.settings = settings
        self.reactor = reactor
        self.tls_options = tls_options
        self.connected = False
        self.status = "stopped"
        self.reason = None
        self.since = reactor.seconds()
        self.delay = MIN_DELAY
        self.max_delay = MAX_DELAY
        self.confirm_timeout = CONFIRM_TIMEOUT
        self.consumers: list[tuple] = []  # (queue, routing_key, handler)
        self.observers: list = []
        self.connection = None
        self.publisher = None
        self._retry = None
        self._attempt = None
        self._logged = None  # the last state logged
        self._dropping = None  # why we are ending the connection ourselves
        self.connections = 0

    # ---- IMessageBroker ---------------------------------------------------

    def consume(self, queue, routing_key, handler):
        self.consumers.append((queue, routing_key, handler))

    def when_connected(self, callback):
        self.observers.append(callback)

    def state(self):
        return {"state": self.status, "url": self.settings.safe_url(), "since": self.since,
                "reason": self.reason, "exchange": self.settings.exchange}

    def publish(self, message):
        if not self.connected or self.publisher is None:
            return defer.fail(BrokerUnavailable(self.reason or "not connected to the broker"))
        properties = pika.BasicProperties(**message.properties(self.settings.app_id))
        confirmed = self.publisher.basic_publish(self.settings.exchange, message.routing_key, message.body,
                                                 properties)
        # pika's Deferred cannot be cancelled: ours settles on whichever of
        # the confirmation and the timer comes first.
        result = defer.Deferred()
        connection = self.connection

        def too_late():
            result.errback(defer.TimeoutError(f"no publisher confirm within {self.confirm_timeout:g} s"))
            self._drop(connection, f"the broker sent no publisher confirm within {self.confirm_timeout:g} s")

        timer = self.reactor.callLater(self.confirm_timeout, too_late)

        def settled(outcome):
            if timer.active():
                timer.cancel()
                result.callback(outcome) if not isinstance(outcome, Failure) else result.errback(outcome)
            return None  # pika's own Deferred ends here, handled

        confirmed.addBoth(settled)
        return result

    # ---- service ------------------------------------------------------------

    def startService(self):
        super().startService()
        self._connect()

    def stopService(self):
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        connection, self.connection = self.connection, None
        self.connected = False
        self.status = "stopped"
        if connection is not None and connection.transport is not None:
            closed = connection.closed
            try:
                connection.close()
            except Exception:
                connection.transport.abortConnection()
                return None
            if closed is not None:
                # A broker that does not answer the close is cut off.
                timer = self.reactor.callLater(5, connection.transport.abortConnection)
                closed.addBoth(lambda r: timer.active() and timer.cancel())
                return closed.addErrback(lambda f: None)
        return None

    # ---- connecting -----------------------------------------------------------

    def _endpoint(self):
        parts = urlsplit(self.settings.url)
        tls = parts.scheme == "amqps"
        port = parts.port or (5671 if tls else 5672)
        endpoint = HostnameEndpoint(self.reactor, parts.hostname, port, timeout=CONNECT_TIMEOUT)
        if tls:
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = wrapClientTLS(self.tls_options or optionsForClientTLS(parts.hostname), endpoint)
        return endpoint

    def _connect(self):
        self._retry = None
        if not self.running:
            return
        self.status = "connecting"
        d = defer.Deferred.fromCoroutine(self._open())
        d.addTimeout(CONNECT_TIMEOUT, self.reactor)
        self._attempt = d
        d.addCallbacks(self._opened, self._failed)

    async def _open(self):
        params = pika.URLParameters(self.settings.url)
        protocol = _Connection(params, custom_reactor=self.reactor)
        self.connection = protocol
        try:
            await connectProtocol(self._endpoint(), protocol)
            await protocol.ready
            publisher = await protocol.channel()
            await publisher.confirm_delivery()
            await publisher.exchange_declare(exchange=self.settings.exchange, exchange_type="topic",
                                             durable=True)
            consumer = None
            if self.consumers:
                consumer = await protocol.channel()
                await consumer.basic_qos(prefetch_count=self.settings.prefetch)
                for queue, routing_key, handler in self.consumers:
                    await consumer.queue_declare(queue=queue, durable=True)
                    await consumer.queue_bind(queue=queue, exchange=self.settings.exchange,
                                              routing_key=routing_key)
                    queue_object, _tag = await consumer.basic_consume(queue=queue, auto_ack=False)
                    self._read(queue_object, handler)
        except BaseException:
            if protocol.transport is not None:
                protocol.transport.abortConnection()
            raise
        return protocol, publisher, consumer

    def _opened(self, result):
        self._attempt = None
        protocol, publisher, consumer = result
        if not self.running or protocol is not self.connection:
            protocol.transport.abortConnection()
            return
        self.publisher = publisher
        self.connected = True
        self.connections += 1
        self.delay = MIN_DELAY
        self._change("connected", None)
        protocol.closed.addBoth(self._lost, protocol)
        for channel in filter(None, (publisher, consumer)):
            channel.on_closed.addBoth(self._channel_closed, protocol)
        for callback in list(self.observers):
            try:
                callback()
            except Exception:
                self.log.failure("broker: a connection observer failed")

    def _failed(self, failure):
        self._attempt = None
        if not self.running:
            return None
        protocol, self.connection = self.connection, None
        self._down(_handshake_failure(failure, protocol) if protocol is not None else _why(failure))
        return None

    def _channel_closed(self, reason, protocol):
        # Channels also close when their connection does: only a channel
        # closed on an open connection is dropped here.
        if self.connected and protocol.is_open:
            self._drop(protocol, f"the broker closed a channel: {_why(reason)}")
        return None

    def _drop(self, protocol, why):
        """End a connection that is no longer usable; it is made again."""
        if protocol is self.connection and protocol.transport is not None:
            self._dropping = why
            protocol.transport.loseConnection()

    def _lost(self, reason, protocol):
        if protocol is not self.connection:
            return None
        self.connection = None
        self.publisher = None
        self.connected = False
        why, self._dropping = self._dropping, None
        if self.running:
            self._down(why or f"connection lost: {_why(reason)}")
        return None

    def _down(self, reason):
        self.reason = reason
        delay = self.delay
        self.delay = min(self.delay * 2, self.max_delay)
        self._change("disconnected", reason, retry=delay)
        self._retry = self.reactor.callLater(delay, self._connect)

    def _change(self, state, reason, retry=None):
        if state != self.status or self._logged != state:
            self.since = self.reactor.seconds()
        self.status = state
        if self._logged == state:
            return  # every failed attempt in a row is one state: logged once
        self._logged = state
        url = self.settings.safe_url()
        if state == "connected":
            self.reason = None
            self.log.info("message broker {url} connected (exchange {exchange})", event="messaging.broker",
                          state=state, url=url, exchange=self.settings.exchange, reason=None)
        else:
            self.log.warn("message broker {url} disconnected: {reason}; retrying with backoff "
                          "(first in {retry:g} s); messages wait in the outbox", event="messaging.broker",
                          state=state, url=url, reason=reason, retry=retry)

    # ---- consuming -------------------------------------------------------------

    def _read(self, queue_object, handler):
        d = queue_object.get()

        def got(message):
            delivery = Delivery(message.channel, message.method, message.properties, message.body)
            try:
                handler(delivery)
            except Exception:
                self.log.failure("broker: the handler of {queue} failed", queue=message.method.routing_key)
            self._read(queue_object, handler)

        d.addCallbacks(got, lambda f: None)  # the queue closes with its channel


def _why(failure_or_exception) -> str:
    value = failure_or_exception.value if isinstance(failure_or_exception, Failure) else failure_or_exception
    if value is None:
        return "closed"
    text = str(value) or type(value).__name__
    return text if len(text) < 300 else text[:300] + "..."
