"""MONAI Deploy messaging on an AMQP 0-9-1 broker (RabbitMQ).

The ``[messaging]`` table is :class:`gateway.config.sections.Messaging`;
the ``outbox`` and ``export_requests`` tables are in the index schema
(:mod:`gateway.store.index`).

- :mod:`gateway.messaging.monai`: the event bodies, built and parsed (pure).
- :mod:`gateway.messaging.outbox`: messages recorded in the index database
  before they are published, and published in order once the broker is there.
- :mod:`gateway.messaging.broker`: the connection (pika's Twisted adapter),
  reconnection, publisher confirms and the export request consumers.
- :mod:`gateway.messaging.export_requests`: export request -> export jobs ->
  export complete.
- :mod:`gateway.messaging.service`: the service that holds them, given to
  the payloads, the reclaimer and the API by ``makeService``.
"""
