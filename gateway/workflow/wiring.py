"""Wiring of the index, payloads, pipelines and reclaimer into the service tree."""

from __future__ import annotations

import importlib
import os

from twisted.application.service import Service

from gateway.config import ConfigError
from gateway.interfaces import IInstanceStoredObserver
from gateway.store.index import DB_NAME, Database, header_attributes
from gateway.workflow.payloads import PayloadService
from gateway.workflow.pipelines import PipelineRunner
from gateway.ops.reclaimer import Reclaimer


class DatabaseService(Service):
    def __init__(self, db: Database, runner: PipelineRunner):
        self.db = db
        self.runner = runner

    def startService(self):
        super().startService()
        os.makedirs(os.path.dirname(self.db.path), exist_ok=True)
        self.db.start()

    def stopService(self):
        super().stopService()
        self.runner.stop()
        return self.db.stop()


def _factory(name: str, config, index: int):
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as e:
        raise ConfigError([f"notify.observers[{index}]: cannot import {name!r}: {type(e).__name__}: {e}"],
                          config.source) from None


def check_observers(config):
    """Raise ConfigError naming the key if an observer factory cannot be imported."""
    for i, name in enumerate(config.observers):
        _factory(name, config, i)


def load_observer(name: str, config, index: int):
    factory = _factory(name, config, index)
    try:
        observer = factory(config)
    except Exception as e:
        raise ConfigError([f"notify.observers[{index}]: cannot load {name!r}: {type(e).__name__}: {e}"],
                          config.source) from None
    if not IInstanceStoredObserver.providedBy(observer):
        raise ConfigError([f"notify.observers[{index}]: {name!r} did not make an IInstanceStoredObserver"],
                          config.source)
    return observer


def add_workflow(root, config, storage, scp, reactor, export_queue):
    """Add the database, payloads, runner and reclaimer to ``root``.

    The payload service becomes the SCP's first observer; observers named in
    ``[notify] observers`` follow.  Pipeline results are submitted to
    ``export_queue`` (an IExportQueue).
    """
    db = Database(os.path.join(os.path.abspath(storage.root), DB_NAME), reactor, durable=config.fsync)
    # The index needs each instance's header: the writer picks it out of the
    # data set's first bytes, kept as they were written, in the job that put
    # the file in place (no extra job; the file is read only when they fall short).
    storage.after_write = header_attributes
    runner = PipelineRunner(config, db, storage, reactor, export_queue)
    DatabaseService(db, runner).setServiceParent(root)
    payloads = PayloadService(config, storage, db, reactor, runner)
    payloads.setName("payloads")
    payloads.setServiceParent(root)
    reclaimer = Reclaimer(config, storage, db, reactor, export_queue)
    reclaimer.setName("reclaimer")
    reclaimer.setServiceParent(root)
    scp.observers.append(payloads)
    for i, name in enumerate(config.observers):
        scp.observers.append(load_observer(name, config, i))
    root.db = db
    root.payloads = payloads
    root.runner = runner
    root.reclaimer = reclaimer
    root.export_queue = export_queue
    return payloads
