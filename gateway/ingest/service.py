"""The SCP's shared state (the service "scp") and the protocol factory of its
listeners; :mod:`gateway.ingest.scp` is what happens on each association."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, FirstError, fail, gatherResults
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from zope.interface import implementer

from gateway.ingest.scp import StoreSCP
from gateway.interfaces import IIngest, IMetrics, IReconfigurable
from gateway.net.protocol import DicomProtocol


@implementer(IMetrics)
class _NoMetrics:
    def instance_stored(self, called_ae, size, latency):
        pass


NO_METRICS = _NoMetrics()


@implementer(IReconfigurable, IIngest)
class SCPService(Service):
    """Shared state of the SCP; one per running gateway (the service "scp").

    ``observers`` are the IInstanceStoredObserver providers told of every
    instance, in order; ``metrics`` (an IMetrics) counts what is received.
    As :class:`~gateway.interfaces.IIngest` it is also what the other ways
    in (DICOMweb) store, refuse, count and observe through.
    """

    log = Logger()
    name = "scp"

    def __init__(self, config, storage, reactor, observers=(), metrics=None):
        self.config = config
        self.storage = storage
        self.reactor = reactor
        self.observers = list(observers)
        self.metrics = metrics if metrics is not None else NO_METRICS
        self.active: set[StoreSCP] = set()
        # Set by the watermark service: why storage is congested, or None.
        self.congestion: str | None = None
        # Set by the cluster service: why the index cannot be reached, or None.
        # New associations are refused (transient) meanwhile, as for congestion.
        self.index_trouble: str | None = None
        self.disk_full = False  # a write found no room; the watermark clears it

    def notify(self, method: str, *args):
        """Call ``method`` on every observer: None when all have finished at
        once (the index does), else a Deferred that fires when all have
        (failing with the first failure).  Runs once per instance."""
        ds = None
        for o in self.observers:
            try:
                result = getattr(o, method)(*args)
            except Exception:
                result = fail()
            if isinstance(result, Deferred):
                ds = ds or []
                ds.append(result)
        if ds is None:
            return None
        if len(ds) == 1:
            return ds[0]
        d = gatherResults(ds, consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure if f.check(FirstError) else f)
        return d

    def storage_full(self, why: str):
        """A write found the disk full: refuse new work now, not at the
        watermark's next probe (which clears this once there is room)."""
        self.disk_full = True
        if not self.congestion:
            self.congestion = f"storage full ({why})"
            self.log.warn("storage congested ({why}): refusing new associations and C-STOREs",
                          event="storage.congested", why=self.congestion, percent=None, free=None)

    def factory(self, tls: bool = False) -> "DicomServerFactory":
        """The protocol factory of one listener; ``tls`` says it is the TLS port."""
        return DicomServerFactory(self, tls)

    def reconfigure(self, config):
        """New associations use ``config``; those in progress keep theirs."""
        self.config = config


class DicomServerFactory(ServerFactory):
    noisy = False  # the listener says where it listens, once (gateway.net.listener)

    def __init__(self, service: SCPService, tls: bool = False):
        self.service = service
        self.tls = tls

    def buildProtocol(self, addr):
        service = self.service
        config = service.config
        user = StoreSCP(service, config, tls=self.tls)
        return DicomProtocol(
            user,
            service.reactor,
            requestor=False,
            max_pdu_length=config.gateway.max_pdu_length,
            artim_timeout=config.timeouts.artim,
            dimse_timeout=config.timeouts.dimse,
            pdu_timeout=config.timeouts.pdu,
        )
