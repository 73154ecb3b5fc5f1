"""The configured destinations: connecting to them (plain or TLS) and C-ECHO.

A DICOMweb destination is sent to by :mod:`gateway.export.dicomweb`
instead; C-ECHO does not apply to it, and its echo says so.

:class:`Destinations` implements :class:`~gateway.interfaces.IDestinations`
for the export service, the API and ``dicomgw echo``.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from gateway.config import ConfigError
from gateway.dimse import commands as C
from gateway.export.scu import Peer, SCUError, connect, verification_contexts
from gateway.interfaces import IDestinations
from gateway.net.tls import client_options


@implementer(IDestinations)
class Destinations:
    """Connects to configured destinations; C-ECHO."""

    log = Logger()

    def __init__(self, config, reactor, read_pool):
        self.config = config
        self.reactor = reactor
        self.read_pool = read_pool

    def names(self):
        return [d.name for d in self.config.destination]

    def get(self, name):
        d = self.config.destination_named(name)
        if d is None:
            raise KeyError(name)
        return d

    @defer.inlineCallbacks
    def connect(self, name, contexts):
        """Fires with an established SCUAssociation; fails with SCUError."""
        dest = self.get(name)
        config = self.config
        tls = None
        if dest.tls:
            try:
                tls = yield deferToThreadPool(self.reactor, self.read_pool, client_options, dest, config)
            except Exception as e:
                why = "; ".join(e.problems) if isinstance(e, ConfigError) else str(e)
                raise SCUError(f"TLS set-up failed: {why}") from e
        peer = Peer(dest.host, dest.port, dest.ae_title, config.scu.ae_title, dest.name)
        assoc = yield connect(
            self.reactor, peer, contexts, read_pool=self.read_pool, max_pdu_length=config.gateway.max_pdu_length,
            implementation_version_name=config.gateway.implementation_version_name,
            connect_timeout=config.scu.connect_timeout, artim_timeout=config.timeouts.artim,
            dimse_timeout=config.timeouts.dimse, tls_options=tls)
        return assoc

    def echo(self, name):
        self.get(name)  # KeyError now, not in the Deferred
        return self._echo(name)

    @defer.inlineCallbacks
    def _echo(self, name):
        result = {"destination": name, "ok": False, "rtt_ms": None, "reason": None}
        if self.get(name).dicomweb is not None:
            result["reason"] = "C-ECHO is a DIMSE service; this is a DICOMweb (STOW-RS) destination"
            self.log.info("echo {destination}: {outcome}", event="echo", destination=name, ok=False,
                          rtt_ms=None, reason=result["reason"], outcome=result["reason"])
            return result
        try:
            assoc = yield self.connect(name, verification_contexts())
            started = self.reactor.seconds()
            status = yield assoc.echo()
            rtt = self.reactor.seconds() - started
            yield assoc.release()
            result["rtt_ms"] = round(rtt * 1000, 3)
            if status == C.SUCCESS:
                result["ok"] = True
            else:
                result["reason"] = f"C-ECHO answered status 0x{status:04X}"
        except SCUError as e:
            result["reason"] = str(e)
        self.log.info(
            "echo {destination}: {outcome}", event="echo", destination=name, ok=result["ok"],
            rtt_ms=result["rtt_ms"], reason=result["reason"],
            outcome=f"success in {result['rtt_ms']} ms" if result["ok"] else result["reason"])
        return result
