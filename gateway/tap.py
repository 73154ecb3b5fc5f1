"""``twistd dicomgw``: command-line options and the service tree.

:func:`makeService` builds the gateway top to bottom: each service is made
with what it depends on, passed explicitly, and added to the root in the
order it must start (the root stops them in the reverse order).  Services
that others look up have names: ``scp``, ``stow``, ``payloads``,
``pipelines``, ``export``, ``messaging`` (with ``[messaging]`` on), ``reload``,
``api``, and the listeners ``dicom``, ``dicom_tls``, ``dicomweb``, ``http``.
"""

from __future__ import annotations

import os

from twisted.application.service import MultiService, Service
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from zope.interface import implementer

from gateway.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from gateway.export.jobs import ExportService
from gateway.ingest.observers import check_observers, load_observers
from gateway.ingest.scp import SCPService
from gateway.ingest.stow_web import StowService
from gateway.interfaces import IReconfigurable
from gateway.messaging.service import MessagingService, broker_tls
from gateway.net.listener import Listener
from gateway.net.tls import ReloadableServerTLS, server_options
from gateway.ops.api import ApiService
from gateway.ops.audit import AuditTrail, ObserverService, RecentAssociations
from gateway.ops.metrics import Metrics
from gateway.ops.reclaimer import Reclaimer
from gateway.ops.reload import ReloadService
from gateway.ops.watermark import Watermark
from gateway.store.index import open_index
from gateway.store.writer import Storage
from gateway.threads import WorkerPool
from gateway.workflow.payloads import PayloadService
from gateway.workflow.pipelines import PipelineRunner

# Disk work (writes, fsync, rename) runs here; bounded so that a burst of
# associations cannot spawn unbounded threads.
DISK_THREADS = 4


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = "Run the dicomgw DICOM gateway (Storage SCP) with the given configuration file."
    optParameters = [
        ["config", "c", DEFAULT_CONFIG_PATH, "Path of the TOML configuration file."],
    ]

    def postOptions(self):
        try:
            self["config_object"] = load_config_and_certificates(self["config"])
            check_observers(self["config_object"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def load_config_and_certificates(path):
    """Load a config and check the certificate files of its TLS port and of
    its message broker, if it has them.

    Runs off the reactor thread on reload: a config naming certificates that
    cannot be read or do not match is as invalid as a bad key.
    """
    config = load_config(path)
    if serves_tls(config):
        server_options(config.tls, config.path)
    if config.messaging.enabled:
        broker_tls(config.messaging, config.path)
    return config


def serves_tls(config) -> bool:
    """Whether a listener uses the ``[tls]`` certificates: the DICOM TLS
    port, or the DICOMweb server with ``dicomweb.tls``."""
    return config.listen.dicom_tls is not None or bool(config.listen.dicomweb and config.dicomweb.tls)


class WorkerPoolService(Service):
    """Starts and stops a worker pool with the application."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        self.pool.stop()


@implementer(IReconfigurable)
class StorageService(Service):
    """Prepares the storage root (and removes a crash's leftovers) at start."""

    log = Logger()

    def __init__(self, storage: Storage):
        self.storage = storage

    def startService(self):
        super().startService()
        self.storage.prepare()
        self.storage.spares.fill()
        self.log.info("storing instances under {root}", root=self.storage.root)

    def stopService(self):
        super().stopService()
        return self.storage.spares.close()

    def reconfigure(self, config):
        # The root itself only changes with a restart (the reload says so).
        self.storage.fsync = config.storage.fsync
        self.storage.digest = config.storage.digest
        self.storage.implementation_version_name = config.gateway.implementation_version_name


@implementer(IReconfigurable)
class DatabaseService(Service):
    """Opens a :class:`~gateway.store.database.Database` at start and closes it at stop."""

    def __init__(self, db):
        self.db = db

    def startService(self):
        super().startService()
        return self.db.start()

    def stopService(self):
        super().stopService()
        return self.db.stop()

    def reconfigure(self, config):
        self.db.reconfigure(config)


def makeService(options, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    config = options["config_object"] if "config_object" in options else load_config(options["config"])
    root = MultiService()

    def add(service):
        service.setServiceParent(root)
        return service

    pool = WorkerPool(DISK_THREADS, "dicomgw-disk")
    add(WorkerPoolService(pool))
    storage = Storage(config.gateway.storage, reactor, pool, fsync=config.storage.fsync,
                      digest=config.storage.digest, implementation_version_name=config.gateway.implementation_version_name)
    add(StorageService(storage))
    db = open_index(storage.root, reactor, durable=config.storage.fsync, reserve=storage.reserve)
    add(DatabaseService(db))
    # File reads for streaming share the disk pool.
    export = add(ExportService(config, reactor, pool, reserve=storage.reserve))
    runner = add(PipelineRunner(config, db, storage, reactor, export))
    # [messaging] (off without a url): closed payloads are announced, export
    # requests taken in; those it serves are given the list of it.
    messaging = [add(MessagingService(config, storage.root, db, reactor, pool, export, export.destinations))
                 ] if config.messaging.enabled else []
    payloads = add(PayloadService(config, storage, db, reactor, runner, participants=messaging))
    # The metrics and the audit trail follow the log events, and are told of
    # every stored instance directly.
    metrics, recent = Metrics(), RecentAssociations()
    audit = ([AuditTrail(os.path.join(storage.root, config.gateway.audit_log), reactor, pool)]
             if config.gateway.audit_log else [])
    add(ObserverService(metrics, recent, *audit))
    scp = add(SCPService(config, storage, reactor, observers=[payloads, *audit, *load_observers(config)],
                         metrics=metrics))
    stow = None
    if config.listen.dicomweb:
        stow = add(StowService(config, scp, reactor, tls=config.dicomweb.tls))
    add(Listener("dicom", config.listen.dicom, scp.factory(), reactor))
    # One set of certificates for every TLS listener; a reload swaps it for all.
    tls = None
    if serves_tls(config):
        tls = ReloadableServerTLS(server_options(config.tls, config.path), config.tls, config.path, reactor, pool)
    if config.listen.dicom_tls is not None:
        factory = TLSMemoryBIOFactory(tls, False, scp.factory(tls=True))
        add(Listener("dicom_tls", config.listen.dicom_tls, factory, reactor))
    if stow is not None:
        site = stow.site()
        factory = TLSMemoryBIOFactory(tls, False, site) if config.dicomweb.tls else site
        add(Listener("dicomweb", config.listen.dicomweb, factory, reactor))
    add(Watermark(scp, storage.root, reactor, pool, reserve=storage.reserve))
    add(Reclaimer(config, storage, db, reactor, export, holds=messaging))

    reload = add(ReloadService(options.get("config") or config.path, config, root, reactor, pool,
                               loader=load_config_and_certificates,
                               install_signal=options.get("install_sighup", True)))
    if tls is not None:
        reload.add(tls)
    if config.listen.http:
        api = add(ApiService(config, root, reactor, pool, scp=scp, storage=storage, metrics=metrics,
                             recent=recent, exports=export, destinations=export.destinations,
                             payloads=payloads, reports=messaging, degradations=messaging))
        add(Listener("http", config.listen.http, api.site(), reactor))
    return root
