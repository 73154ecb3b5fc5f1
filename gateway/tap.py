"""``twistd dicomgw``: command-line options and the service tree."""

from __future__ import annotations

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from gateway.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from gateway.interfaces import IReconfigurable
from gateway.services.scp import SCPService
from gateway.services.storage import Storage
from gateway.services.workflow import add_workflow, check_observers

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
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


class ThreadPoolService(Service):
    """Starts and stops a named, bounded thread pool with the application."""

    def __init__(self, pool: ThreadPool):
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

    def reconfigure(self, config):
        # The root itself only changes with a restart (the reload says so).
        self.storage.fsync = config.fsync
        self.storage.implementation_version_name = config.implementation_version_name


def makeService(options, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    config = options["config_object"] if "config_object" in options else load_config(options["config"])
    root = MultiService()

    pool = ThreadPool(minthreads=1, maxthreads=DISK_THREADS, name="dicomgw-disk")
    ThreadPoolService(pool).setServiceParent(root)
    storage = Storage(config.storage, reactor, pool, fsync=config.fsync,
                      implementation_version_name=config.implementation_version_name)
    StorageService(storage).setServiceParent(root)

    scp = SCPService(config, storage, reactor)
    # Index, payloads, pipelines, reclaimer: observers of the SCP (issue 4).
    add_workflow(root, config, storage, scp, reactor)
    listener = strports.service(config.listen_dicom, scp.factory(), reactor=reactor)
    listener.setName("dicom")
    listener.setServiceParent(root)
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
    from gateway.metrics import Metrics
    from gateway.services.api import ApiService
    from gateway.services.reload import ReloadService

    metrics, recent = Metrics(), RecentAssociations()
    observers = [metrics, recent]
    if config.audit_log:
        observers.append(AuditTrail(os.path.join(storage.root, config.audit_log), reactor, pool))
    ObserverService(*observers).setServiceParent(root)
    path = options.get("config") if hasattr(options, "get") else None
    reload = ReloadService(path or config.source, config, root, reactor, pool,
                           install_signal=options.get("install_sighup", True))
    reload.add(scp)
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
