"""The storage watermark: stop accepting work before the disk is full.

Every ``[storage] check_interval`` seconds a ``LoopingCall`` (on the injected
reactor) probes the file system that holds the storage root with ``statvfs``
in the disk thread pool, never on the reactor thread.  While usage is at or
above ``watermark_percent``, or less than ``reserved_gb`` is free, it sets
``SCPService.congestion`` to a short reason: new associations are then
rejected-transient (service-provider, temporary congestion) and C-STOREs are
answered A700.  The same while the databases' reserve (gateway.store.reserve)
is spent; the probe makes it again once there is room.  When space is back the
next probe clears it.

The probe catches and logs its own errors (a ``LoopingCall`` stops for good
on an exception); a failed probe leaves the last known state in place.
"""

from __future__ import annotations

import os

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from gateway.interfaces import IHealthCheck

GIB = 1 << 30
#: After a write found the disk full, new work waits for this much room.
FULL_UNTIL = 64 << 20


def usage(st) -> tuple[float, int]:
    """(percent used as ``df`` shows it, bytes free for unprivileged users)."""
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    free = st.f_bavail * st.f_frsize
    total = used + free
    percent = 100.0 * used / total if total else 100.0
    return percent, free


def congestion(percent: float, free: int, watermark_percent: float, reserved_gb: float) -> str | None:
    if percent >= watermark_percent:
        return f"{percent:.1f}% used, watermark {watermark_percent:g}%"
    if free < reserved_gb * GIB:
        return f"{free / GIB:.2f} GiB free, reserve {reserved_gb:g} GiB"
    return None


@implementer(IHealthCheck)
class Watermark(Service):
    log = Logger()
    name = "watermark"

    def __init__(self, scp, root: str, reactor, pool, statvfs=os.statvfs, reserve=None):
        self.scp = scp
        self.root = root
        self.reserve = reserve  # the databases' SpaceReserve: while it is spent, nothing new is taken
        self.reactor = reactor
        self.pool = pool
        self.statvfs = statvfs
        self.loop = LoopingCall(self.probe)
        self.loop.clock = reactor
        self._running = None

    def startService(self):
        super().startService()
        self._running = self.loop.start(self.scp.config.storage.check_interval, now=True)

    def stopService(self):
        super().stopService()
        if self.loop.running:
            self.loop.stop()

    def health_problems(self):
        why = self.scp.congestion
        return [f"storage over the watermark: {why}"] if why else []

    def probe(self):
        d = deferToThreadPool(self.reactor, self.pool, self._look)
        d.addCallback(self._measured)
        d.addErrback(self._failed)
        return d

    def _look(self):
        """The file system's figures, with the reserve made again where there is room (pool)."""
        st = self.statvfs(self.root)
        reserve = self.reserve
        if reserve is not None and not reserve.held and usage(st)[1] > 2 * reserve.size and reserve.restore():
            st = self.statvfs(self.root)
        return st

    def _measured(self, st):
        config = self.scp.config
        percent, free = usage(st)
        why = congestion(percent, free, config.storage.watermark_percent, config.storage.reserved_gb)
        if why is None and self.reserve is not None and not self.reserve.held:
            why = "storage full: the databases are using the room kept for them"
        if self.scp.disk_full:  # until there is room for more than a few instances again
            if why is None and free < FULL_UNTIL:
                why = self.scp.congestion or "storage full"
            elif free >= FULL_UNTIL:
                self.scp.disk_full = False
        before = self.scp.congestion
        self.scp.congestion = why
        if why and not before:
            self.log.warn("storage congested ({why}): refusing new associations and C-STOREs",
                          event="storage.congested", why=why, percent=percent, free=free)
        elif before and not why:
            self.log.info("storage space is back ({percent:.1f}% used, {free} bytes free): accepting again",
                          event="storage.recovered", percent=percent, free=free)

    def _failed(self, failure):
        self.log.failure("storage watermark probe of {root} failed", failure, root=self.root)
        return None
