"""The gateway's worker threads: a fixed set of threads and a backlog.

Blocking work (file writes and renames, fsync, SQLite) runs in threads so
that the reactor never waits.  :class:`WorkerPool` offers the two calls of
Twisted's ``ThreadPool`` the gateway uses, ``callInThread`` and
``callInThreadWithCallback`` (so ``deferToThreadPool`` works with it), with
much less in the way: a job is a lock and a ``SimpleQueue.put`` (a few
microseconds) and reaches an idle thread in about a third of the time
Twisted's pool takes, whose coordinator, log contexts and ``Queue``
(a Python ``Condition``) cost tens of microseconds per job on each side.
Each stored instance pays that hand-off once.

What it does not do: grow and shrink (its threads start with it, and a
thread waiting for work costs nothing), or carry Twisted's log context into
jobs (a job that raises is logged here, with its function).
"""

from __future__ import annotations

import threading
from collections import deque
from queue import SimpleQueue

from twisted.logger import Logger
from twisted.python.failure import Failure

_STOP = object()


class WorkerPool:
    """``threads`` threads named ``<name>-<n>``, taking jobs in order of submission.

    Each thread waits on a ``SimpleQueue`` of its own, and a job goes straight
    to an idle thread's queue (the one that went idle last: its caches are
    the warmest), or to the backlog when every thread is busy.  One queue shared
    by all would wake a second idle thread for every job (a ``SimpleQueue``
    getter that takes an item releases the next waiter), only for it to take
    the GIL, find nothing and sleep again.
    """

    log = Logger()

    def __init__(self, threads: int, name: str):
        if threads < 1:
            raise ValueError("a worker pool needs at least one thread")
        self.size = threads
        self.name = name
        self._lock = threading.Lock()
        self._idle: list[SimpleQueue] = []  # the queues of the threads waiting for work
        self._backlog: deque = deque()  # jobs waiting for a thread (never while one is idle)
        self._threads: list[threading.Thread] = []
        self.started = False
        self._stopped = False

    def queued(self) -> int:
        """Jobs waiting for a thread."""
        return len(self._backlog)

    def start(self):
        """Start the threads; jobs submitted before this run now."""
        if self.started or self._stopped:
            return
        self.started = True
        for n in range(self.size):
            t = threading.Thread(target=self._work, name=f"{self.name}-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self):
        """Let every job submitted so far finish, then end the threads."""
        self._stopped = True
        if not self.started:
            return
        self.started = False
        with self._lock:
            self._backlog.extend(_STOP for _t in self._threads)
            idle = list(self._idle)
            self._idle.clear()
        for inbox in idle:
            inbox.put(None)  # look at the backlog
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:  # a job that stops its own pool ends with it
                t.join()
        self._threads = []

    def callInThread(self, f, *args, **kwargs):
        """Queue ``f(*args, **kwargs)``; once the pool is stopped, do nothing
        (as Twisted's pool does: shutting down, nothing new starts)."""
        if self._stopped:
            return
        job = (f, args, kwargs)
        with self._lock:
            if not self._idle:
                self._backlog.append(job)
                return
            inbox = self._idle.pop()
        inbox.put(job)

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        """Run ``f``; then, still in the worker thread, ``on_result(True, value)``
        or ``on_result(False, Failure)`` (the contract of Twisted's ThreadPool)."""
        self.callInThread(run_with_callback, on_result, f, args, kwargs)

    def _work(self):
        inbox: SimpleQueue = SimpleQueue()
        lock, backlog, idle = self._lock, self._backlog, self._idle
        job = None
        while True:
            if job is _STOP:
                return
            if job is not None:
                f, args, kwargs = job
                try:
                    f(*args, **kwargs)
                except BaseException:
                    self.log.failure("{pool}: job {job!r} raised", Failure(), pool=self.name, job=f)
                job = f = args = kwargs = None  # nothing of a finished job stays alive while waiting
            with lock:
                if backlog:
                    job = backlog.popleft()
                    continue
                idle.append(inbox)
            job = inbox.get()


def run_with_callback(on_result, f, args, kwargs):
    """``f(*args, **kwargs)``, its outcome given to ``on_result`` as
    ``callInThreadWithCallback`` promises (also for pools that tests fake)."""
    try:
        result = f(*args, **kwargs)
    except BaseException:
        on_result(False, Failure())
    else:
        on_result(True, result)
