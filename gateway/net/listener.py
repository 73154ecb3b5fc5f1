"""A listening port as a service, that says how it is doing.

:class:`Listener` does what ``strports.service`` does (listen when the
application starts, privileged start included, so that systemd and port 104
work; stop listening at stop; a port that cannot be bound stops start-up
with the reason) and also keeps what the management API and the tests ask:
the port once it listens, or why it does not.  Once it listens it logs one
line: what it serves, where, and how (``what`` and ``detail``: the TLS
profile of a TLS port).
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger


class Listener(Service):
    log = Logger()

    def __init__(self, name: str, description: str, factory, reactor, what: str = "", detail: str = ""):
        self.setName(name)
        self.description = description
        self.what = what or name
        self.detail = detail
        self.endpoint = serverFromString(reactor, description)
        self.factory = factory
        self.port = None  # the IListeningPort, once listening
        self.failure = None  # why listening failed, if it did
        self._listening: Deferred | None = None
        self._waiters: list[Deferred] = []
        self._starting, self._early = False, None

    def privilegedStartService(self):
        super().privilegedStartService()
        self._listen()

    def startService(self):
        super().startService()
        if self._listening is None:
            self._listen()

    def _listen(self):
        self._starting, self._early = True, None
        self._listening = self.endpoint.listen(self.factory)
        self._listening.addCallbacks(self._listened, self._failed)
        self._starting = False
        if self._early is not None:  # at start-up: stop it, naming the reason
            self._early.raiseException()

    def _listened(self, port):
        self.port = port
        host = port.getHost()
        address = f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}" if hasattr(host, "port") \
            else str(getattr(host, "name", host))
        self.log.info("{what} listening on {address} ({description}){detail_text}", event="listener.up",
                      listener=self.name, what=self.what, address=address, description=self.description,
                      detail=self.detail, detail_text=f"; {self.detail}" if self.detail else "")
        for d in self._waiters:
            d.callback(port)
        self._waiters = []
        return port

    def _failed(self, failure):
        if failure.check(CancelledError):
            return None
        self.failure = failure
        if self._starting:
            self._early = failure
        else:
            self.log.failure("cannot listen on {description}", failure, description=self.description)
        return None

    def listening(self) -> Deferred:
        """Fires with the IListeningPort once there is one."""
        if self.port is not None:
            return succeed(self.port)
        d = Deferred()
        self._waiters.append(d)
        return d

    def state(self) -> tuple[str, str | None]:
        """("up", "host:port"), ("starting", None) or ("down", why)."""
        if not self.running or self._listening is None:
            return "down", "not running"
        if self.failure is not None:
            return "down", f"could not listen: {self.failure.getErrorMessage()}"
        if self.port is None:
            return "starting", None
        if getattr(self.port, "connected", True) is False:
            return "down", "stopped listening"
        host = self.port.getHost()
        return "up", f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}"

    def stopService(self):
        super().stopService()
        listening, self._listening = self._listening, None
        if listening is None:
            return succeed(None)
        listening.cancel()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else succeed(None)
