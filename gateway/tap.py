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
import sys

from twisted.application.service import MultiService, Service
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from zope.interface import implementer

from gateway.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from gateway.export.jobs import ExportService
from gateway.ingest.observers import load_observers, observer_problems
from gateway.ingest.service import SCPService
from gateway.ingest.stow_web import StowService
from gateway.interfaces import IReconfigurable
from gateway.messaging.service import MessagingService, broker_tls
from gateway.net.listener import Listener
from gateway.net.tls import DicomTLSFactory, ReloadableServerTLS, file_problems, server_options
from gateway.ops.api import ApiService
from gateway.ops.audit import AuditTrail, ObserverService, RecentAssociations
from gateway.ops.metrics import Metrics
from gateway.ops.reclaimer import Reclaimer
from gateway.ops.reload import ReloadService
from gateway.ops.watermark import Watermark
from gateway.store.index import open_index
from gateway.store.studies import StudyIndex
from gateway.store.writer import Storage
from gateway.threads import WorkerPool
from gateway.workflow.payloads import PayloadService
from gateway.workflow.cluster import ClusterService, IndexAssociations
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
            self["config_object"] = load_checked_config(self["config"])
        except ConfigError as e:
            # The problems alone, as check-config prints them: twistd would
            # print its whole usage text before a UsageError's message.
            print(e, file=sys.stderr)
            raise SystemExit(1) from None


def external_problems(config) -> list[str]:
    """What the configuration names outside itself that cannot be used
    (blocking: reads files, imports modules): the certificates, keys and CA
    files of the TLS listeners, of TLS destinations and of the message
    broker, and the ``[notify]`` observer modules."""
    problems = file_problems(config)
    if config.messaging.enabled:
        try:
            broker_tls(config.messaging, config.path)
        except ConfigError as e:
            problems.extend(e.problems)
    problems.extend(observer_problems(config))
    return problems


def load_checked_config(path):
    """The configuration at ``path`` as start-up, a reload and
    ``dicomgw check-config`` read it: parsed, every table checked (token
    files read, endpoints parsed), and every file and module it names
    checked (:func:`external_problems`); a ConfigError lists every problem.

    Blocking: a reload runs it off the reactor thread.
    """
    return load_config(path, checks=(external_problems,))


def audit_path(config, root) -> str:
    """The audit trail's file: under the storage root, one per node when
    nodes share the root (``audit.jsonl`` -> ``nodes/<node>/audit.jsonl``)."""
    if config.index.shared:
        return os.path.join(root, "nodes", config.gateway.node, config.gateway.audit_log)
    return os.path.join(root, config.gateway.audit_log)


def serves_tls(config) -> bool:
    """Whether a listener uses the ``[tls]`` certificates: the DICOM TLS
    port, or the DICOMweb server with ``dicomweb.tls``."""
    return config.listen.dicom_tls is not None or bool(config.listen.dicomweb and config.dicomweb.tls)


def tls_detail(tls) -> str:
    """How a TLS listener serves, for its start-up line."""
    clients = "client certificate required" if tls.require_client_certificate else "client certificate optional"
    return f"TLS profile {tls.profile}, {clients}, certificate {tls.certificate}"


def describe_index(db) -> str:
    """Where the index database is, for the start-up line (never a password)."""
    return db.describe()


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

    def __init__(self, storage: Storage, config, index: str = ""):
        self.storage = storage
        self.config = config
        self.index = index  # where the index is, for the start-up line

    def startService(self):
        super().startService()
        self.storage.prepare()
        self.storage.spares.fill()
        s = self.config.storage
        self.log.info("storage under {root} (fsync {fsync}, digest {digest}, refusing work at {watermark}% "
                      "used or under {reserved} GiB free); index {index}", event="storage.ready",
                      root=self.storage.root, fsync="on" if s.fsync else "off", digest=s.digest,
                      watermark=f"{s.watermark_percent:g}", reserved=f"{s.reserved_gb:g}", index=self.index)

    def stopService(self):
        super().stopService()
        return self.storage.spares.close()

    def reconfigure(self, config):
        # The root itself only changes with a restart (the reload says so).
        self.config = config
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
    # Nodes sharing an index share the storage root, each with a tmp/<node>/ of its own.
    node_dir = config.gateway.node if config.index.shared else ""
    storage = Storage(config.gateway.storage, reactor, pool, fsync=config.storage.fsync,
                      digest=config.storage.digest, implementation_version_name=config.gateway.implementation_version_name,
                      node=node_dir)
    db = open_index(storage.root, reactor, durable=config.storage.fsync, reserve=storage.reserve,
                    url=config.index.url, namespace=config.index.schema)
    add(StorageService(storage, config, index=describe_index(db)))
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
    audit = ([AuditTrail(audit_path(config, storage.root), reactor, pool)]
             if config.gateway.audit_log else [])
    add(ObserverService(metrics, recent, *audit))
    scp = add(SCPService(config, storage, reactor, observers=[payloads, *audit, *load_observers(config)],
                         metrics=metrics))
    # Heartbeats, leases, a stopped node's work taken over; it watches the databases.
    cluster = add(ClusterService(config, db, reactor, payloads, runner, scp=scp, dbs=(db, export.store.db)))
    stow = None
    if config.listen.dicomweb:
        stow = add(StowService(config, scp, reactor, tls=config.dicomweb.tls))
    add(Listener("dicom", config.listen.dicom, scp.factory(), reactor, what="DICOM"))
    # One set of certificates for every TLS listener; a reload swaps it for all.
    tls = None
    if serves_tls(config):
        tls = ReloadableServerTLS(server_options(config.tls, config.path), config.tls, config.path, reactor, pool)
    if config.listen.dicom_tls is not None:
        factory = DicomTLSFactory(tls, False, scp.factory(tls=True))
        factory.noisy = False
        add(Listener("dicom_tls", config.listen.dicom_tls, factory, reactor, what="DICOM over TLS",
                     detail=tls_detail(config.tls)))
    if stow is not None:
        site = stow.site()
        factory = TLSMemoryBIOFactory(tls, False, site) if config.dicomweb.tls else site
        factory.noisy = False
        add(Listener("dicomweb", config.listen.dicomweb, factory, reactor, what="DICOMweb STOW-RS",
                     detail=tls_detail(config.tls) if config.dicomweb.tls else "plain HTTP"))
    add(Watermark(scp, storage.root, reactor, pool, reserve=storage.reserve))
    add(Reclaimer(config, storage, db, reactor, export, holds=messaging))

    reload = add(ReloadService(options.get("config") or config.path, config, root, reactor, pool,
                               loader=load_checked_config,
                               install_signal=options.get("install_sighup", True)))
    if tls is not None:
        reload.add(tls)
    if config.listen.http:
        # Nodes sharing an index list the associations of all of them.
        listed = IndexAssociations(db) if config.index.shared else recent
        api = add(ApiService(config, root, reactor, pool, scp=scp, storage=storage, metrics=metrics,
                             recent=listed, exports=export, destinations=export.destinations,
                             payloads=payloads, studies=StudyIndex(db), pipelines=runner,
                             reports=[*messaging, cluster], degradations=messaging))
        add(Listener("http", config.listen.http, api.site(), reactor, what="management API",
                     detail="bearer token required" if config.http.token_file else "no token"))
    return root
