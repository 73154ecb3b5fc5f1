"""``twistd dicomgw``: command-line options and the service tree."""

from __future__ import annotations

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from gateway.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from gateway.interfaces import IReconfigurable
from gateway.net.tls import server_options
from gateway.export.jobs import ExportService
from gateway.ingest.scp import SCPService
from gateway.store.writer import Storage
from gateway.ops.watermark import Watermark
from gateway.workflow.wiring import add_workflow, check_observers
from gateway.threads import WorkerPool

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
            self["config_object"] = load_config(self["config"])
            check_observers(self["config_object"])
            if self["config_object"].listen_dicom_tls is not None:
                # Missing or bad certificate files stop start-up here, named.
                self["tls_options"] = server_options(self["config_object"].tls, self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


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
        self.log.info("storing instances under {root}", root=self.storage.root)

    def stopService(self):
        super().stopService()
        return self.storage.spares.close()

    def reconfigure(self, config):
        # The root itself only changes with a restart (the reload says so).
        self.storage.fsync = config.fsync
        self.storage.implementation_version_name = config.implementation_version_name


def makeService(options, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    config = options["config_object"] if "config_object" in options else load_config(options["config"])
    root = MultiService()

    pool = WorkerPool(DISK_THREADS, "dicomgw-disk")
    WorkerPoolService(pool).setServiceParent(root)
    storage = Storage(config.storage, reactor, pool, fsync=config.fsync,
                      implementation_version_name=config.implementation_version_name)
    StorageService(storage).setServiceParent(root)

    scp = SCPService(config, storage, reactor)
    # Export jobs (IExportQueue) and the destinations (IDestinations); file
    # reads for streaming share the disk pool.
    export = ExportService(config, reactor, pool)
    export.setName("export")
    export.setServiceParent(root)
    root.export = root.exports = export
    root.destinations = export.destinations
    # Index, payloads, pipelines, reclaimer: observers of the SCP; pipeline
    # results become export jobs.
    add_workflow(root, config, storage, scp, reactor, export_queue=export)
    listener = strports.service(config.listen_dicom, scp.factory(), reactor=reactor)
    listener.setName("dicom")
    listener.setServiceParent(root)
    if config.listen_dicom_tls is not None:
        root.tls = add_tls_listener(root, scp, options, reactor, pool)
    watermark = Watermark(scp, storage.root, reactor, pool)
    watermark.setName("watermark")
    watermark.setServiceParent(root)
    root.scp = scp

    _add_operations(root, options, config, scp, storage, pool, reactor)
    return root


def _add_operations(root, options, config, scp, storage, pool, reactor):
    """Metrics, audit trail, SIGHUP reload and the management API (issue 6).

    Providers for the API (``root.exports``, ``root.destinations``,
    ``root.payloads``) are picked up when the services that build them set
    those attributes before this runs.
    """
    import os

    from gateway.logs import AuditTrail, ObserverService, RecentAssociations
    from gateway.ops.metrics import Metrics
    from gateway.ops.api import ApiService
    from gateway.ops.reload import ReloadService

    metrics, recent = Metrics(), RecentAssociations()
    observers = [metrics, recent]
    if config.audit_log:
        observers.append(AuditTrail(os.path.join(storage.root, config.audit_log), reactor, pool))
    ObserverService(*observers).setServiceParent(root)
    path = options.get("config") if hasattr(options, "get") else None
    reload = ReloadService(path or config.source, config, root, reactor, pool,
                           loader=load_config_and_certificates,
                           install_signal=options.get("install_sighup", True))
    reload.add(scp)
    if getattr(root, "tls", None) is not None:
        reload.add(root.tls)
    reload.setServiceParent(root)
    root.metrics, root.recent_associations, root.reload = metrics, recent, reload
    root.api = None
    if config.listen_http:
        api = ApiService(config, root, reactor, pool, scp=scp, storage=storage, metrics=metrics,
                         recent=recent, exports=getattr(root, "exports", None),
                         destinations=getattr(root, "destinations", None),
                         payloads=getattr(root, "payloads", None))
        api.setServiceParent(root)
        http = strports.service(config.listen_http, api.site(), reactor=reactor)
        http.setName("http")
        http.setServiceParent(root)
        root.api = api


def load_config_and_certificates(path):
    """Load a config and, when it has a TLS port, check its certificate files.

    Runs off the reactor thread on reload: a config naming certificates that
    cannot be read or do not match is as invalid as a bad key.
    """
    config = load_config(path)
    if config.listen_dicom_tls is not None:
        server_options(config.tls, config.source)
    return config


def add_tls_listener(root, scp, options, reactor, pool):
    """The TLS port: TLS layered on the endpoint, the same SCP behind it.

    Returns the connection creator, which a reload gives new certificates.
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from gateway.net.tls import ReloadableServerTLS

    config = scp.config
    tls_options = options["tls_options"] if "tls_options" in options else server_options(config.tls, config.source)
    creator = ReloadableServerTLS(tls_options, config.tls, config.source, reactor, pool)
    factory = TLSMemoryBIOFactory(creator, False, scp.factory(tls=True))
    listener = strports.service(config.listen_dicom_tls, factory, reactor=reactor)
    listener.setName("dicom_tls")
    listener.setServiceParent(root)
    return creator
