"""Helpers for testing code that runs a gateway: in-memory and in-process."""

from __future__ import annotations

from twisted.internet.defer import Deferred


def listening_port(service, name: str = "dicom") -> Deferred:
    """Fire with the IListeningPort of the named listener of a running gateway.

    The listener is Twisted's StreamServerEndpointService (made by
    ``strports.service``), which keeps the port only privately.
    """
    listener = service.getServiceNamed(name)
    d = Deferred()
    listener._waitingForPort.addCallback(lambda port: (d.callback(port), port)[1])
    return d
