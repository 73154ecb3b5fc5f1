"""Reload without restart: SIGHUP re-reads the configuration file.

The signal handler only schedules :meth:`ReloadService.reload` on the
reactor.  One reload runs at a time; a SIGHUP that arrives while one runs
asks for exactly one more afterwards (repeats are merged).  The file is read,
parsed and validated as a whole in a thread (``deferToThreadPool``), never
on the reactor thread.  A valid config is handed to every
:class:`~gateway.interfaces.IReconfigurable` in the service tree (and to the
objects registered with :meth:`ReloadService.add`); an invalid one changes
nothing and every problem is logged.  Settings that only a restart applies
(``[listen]``, the storage root) are reported as "restart needed".
"""

from __future__ import annotations

import dataclasses
import signal

from twisted.application.service import IServiceCollection, Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from gateway.config import ConfigError, load_config
from gateway.interfaces import IReconfigurable

# Config fields that a running gateway cannot change: the listeners are bound
# and the storage root is where everything already lives.
RESTART_FIELDS = ("listen_dicom", "listen_http", "storage", "audit_log")
# ... and the keys operators know them by.
_KEYS = {"listen_dicom": "listen.dicom", "listen_http": "listen.http", "storage": "gateway.storage",
         "audit_log": "gateway.audit_log"}
# The TLS port is bound at start-up, and the watermark loop's interval is set
# then too (its thresholds are read at every probe).  [tls] itself reloads:
# new connections get the new certificates (gateway.net.tls).
RESTART_FIELDS += ("listen_dicom_tls", "check_interval")
_KEYS.update({"listen_dicom_tls": "listen.dicom_tls", "check_interval": "storage.check_interval"})
# The reclaimer's interval is set at start-up, and observers are loaded then.
RESTART_FIELDS += ("reclaim_interval", "observers")
_KEYS.update({"reclaim_interval": "reclaimer.interval", "observers": "notify.observers"})
# Fields that describe where a config came from, not what it says.
_IGNORED = ("source",)


def changed_fields(old, new) -> list[str]:
    """Names of the Config fields whose values differ (secrets by name only)."""
    return [f.name for f in dataclasses.fields(old)
            if f.name not in _IGNORED and getattr(old, f.name) != getattr(new, f.name)]


def _providers(service, seen):
    if id(service) in seen:
        return
    seen.add(id(service))
    if IReconfigurable.providedBy(service):
        yield service
    if IServiceCollection.providedBy(service):
        for child in service:
            yield from _providers(child, seen)


class ReloadService(Service):
    """Owns the SIGHUP handler and the current config of a running gateway."""

    log = Logger()
    name = "reload"

    def __init__(self, path: str, config, root, reactor, pool, *, loader=load_config,
                 install_signal: bool = True):
        self.path = path
        self.config = config
        self.root = root
        self.reactor = reactor
        self.pool = pool
        self.loader = loader
        self.install_signal = install_signal
        self._extra: list = []
        self._running: Deferred | None = None
        self._again = False
        self._previous_handler = None
        self.reloads = 0  # completed reload attempts, valid or not

    def add(self, target) -> None:
        """Also reconfigure ``target`` (an IReconfigurable outside the tree)."""
        self._extra.append(target)

    def targets(self) -> list:
        seen: set = set()
        found = [p for p in _providers(self.root, seen) if p is not self]
        return found + [t for t in self._extra if id(t) not in seen]

    # ---- signal ------------------------------------------------------------

    def startService(self):
        super().startService()
        if self.install_signal:
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)

    def stopService(self):
        if self.install_signal and self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        super().stopService()
        return self._running if self._running is not None else succeed(None)

    def _on_sighup(self, signum, frame):
        # A signal handler may run between any two bytecodes of the reactor
        # thread: do nothing here but wake the reactor up.
        self.reactor.callFromThread(self.reload)

    # ---- reload --------------------------------------------------------------

    def reload(self) -> Deferred:
        """Re-read the file; fires when this reload (and any merged one) is done."""
        if self._running is not None:
            self._again = True
            d = Deferred()
            self._running.addBoth(lambda r: (d.callback(None), r)[1])
            return d
        d = self._cycle()
        if not d.called:
            self._running = d
        return d

    @inlineCallbacks
    def _cycle(self):
        try:
            while True:
                self._again = False
                yield self._reload_once()
                if not self._again:
                    break
        finally:
            self._running = None

    @inlineCallbacks
    def _reload_once(self):
        self.log.info("reloading the configuration from {source}", source=self.path)
        try:
            new = yield deferToThreadPool(self.reactor, self.pool, self.loader, self.path)
        except ConfigError as e:
            self.reloads += 1
            self.log.error(
                "configuration NOT reloaded: {source} is invalid; the running configuration "
                "stays in force:\n{problem_text}",
                event="config.reload_failed", source=e.source, problems=list(e.problems),
                problem_text="\n".join(f"  - {p}" for p in e.problems),
            )
            return
        except Exception as e:  # never let a reload kill the service
            self.reloads += 1
            self.log.failure("configuration NOT reloaded from {source}: {error}",
                             source=self.path, error=e, event="config.reload_failed",
                             problems=[str(e)])
            return
        old = self.config
        changes = changed_fields(old, new)
        restart = [_KEYS[f] for f in RESTART_FIELDS if f in changes]
        self.config = new
        for target in self.targets():
            try:
                # A target may finish its part later (work off the reactor
                # thread): the reload is done when every target is.
                yield maybeDeferred(target.reconfigure, new)
            except Exception:
                self.log.failure("{target!r} could not take the new configuration", target=target)
        self.reloads += 1
        self.log.info(
            "configuration reloaded from {source}; changed: {change_text}",
            event="config.reloaded", source=new.source, changes=changes, restart_needed=restart,
            change_text=", ".join(changes) or "nothing",
        )
        if restart:
            self.log.warn(
                "restart needed: {keys} changed, but listeners and the storage root are only "
                "set at start-up; the gateway keeps using the old values until restarted",
                keys=", ".join(restart), event="config.restart_needed", restart_needed=restart,
            )
