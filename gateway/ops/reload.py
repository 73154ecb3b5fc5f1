"""Reload without restart: SIGHUP re-reads the configuration file.

The signal handler only schedules :meth:`ReloadService.reload` on the
reactor.  One reload runs at a time; a SIGHUP that arrives while one runs
asks for exactly one more afterwards (repeats are merged).  The file is read,
parsed and validated as a whole in a thread (``deferToThreadPool``), never
on the reactor thread.  A valid config is handed to every
:class:`~gateway.interfaces.IReconfigurable` in the service tree (and to the
objects registered with :meth:`ReloadService.add`); an invalid one changes
nothing and every problem is logged.  Settings that only a restart applies
(``[listen]``, the storage root...: each option says so) are reported as
"restart needed".
"""

from __future__ import annotations

import signal

from twisted.application.service import IServiceCollection, Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from gateway.config import ConfigError, changes, load_config
from gateway.interfaces import IReconfigurable

def changed_keys(old, new) -> tuple[list[str], list[str]]:
    """(the dotted keys whose values differ, those of them only a restart
    applies); each option declares which it is (gateway.config.sections)."""
    found = changes(old, new)
    return [key for key, _ in found], [key for key, reloadable in found if not reloadable]


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
        changed, restart = changed_keys(self.config, new)
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
            event="config.reloaded", source=new.path, changes=changed, restart_needed=restart,
            change_text=", ".join(changed) or "nothing",
        )
        if restart:
            self.log.warn(
                "restart needed: {keys} changed, but only a restart applies them; the gateway "
                "keeps using the old values until then",
                keys=", ".join(restart), event="config.restart_needed", restart_needed=restart,
            )
