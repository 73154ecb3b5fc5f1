"""The gateway's worker threads: a fixed set of threads sharing one queue.

Blocking work (file writes and renames, fsync, SQLite) runs in threads so
that the reactor never waits.  :class:`WorkerPool` offers the two calls of
Twisted's ``ThreadPool`` the gateway uses, ``callInThread`` and
``callInThreadWithCallback`` (so ``deferToThreadPool`` works with it), with
much less in the way: a job is one ``SimpleQueue.put`` (a few
microseconds) and reaches an idle thread in about a third of the time
Twisted's pool takes, whose coordinator, log contexts and ``Queue``
(a Python ``Condition``) cost tens of microseconds per job on each side.
Each stored instance pays that hand-off once.

What it does not do: grow and shrink (its threads start with it, and a
thread waiting on an empty queue costs nothing), or carry Twisted's log
context into jobs (a job that raises is logged here, with its function).
"""

from __future__ import annotations

import threading
from queue import SimpleQueue

from twisted.logger import Logger
from twisted.python.failure import Failure

_STOP = object()


class WorkerPool:
    """``threads`` threads named ``<name>-<n>``, taking jobs in order of submission."""

    log = Logger()

    def __init__(self, threads: int, name: str):
        if threads < 1:
            raise ValueError("a worker pool needs at least one thread")
        self.size = threads
        self.name = name
        self._queue: SimpleQueue = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self.started = False
        self._stopped = False

    def queued(self) -> int:
        """Jobs waiting for a thread."""
        return self._queue.qsize()

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
        for _t in self._threads:
            self._queue.put(_STOP)
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:  # a job that stops its own pool ends with it
                t.join()
        self._threads = []

    def callInThread(self, f, *args, **kwargs):
        """Queue ``f(*args, **kwargs)``; once the pool is stopped, do nothing
        (as Twisted's pool does: shutting down, nothing new starts)."""
        if not self._stopped:
            self._queue.put((f, args, kwargs))

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        """Run ``f``; then, still in the worker thread, ``on_result(True, value)``
        or ``on_result(False, Failure)`` (the contract of Twisted's ThreadPool)."""
        self.callInThread(_with_callback, on_result, f, args, kwargs)

    def _work(self):
        get = self._queue.get
        while True:
            job = get()
            if job is _STOP:
                return
            f, args, kwargs = job
            try:
                f(*args, **kwargs)
            except BaseException:
                self.log.failure("{pool}: job {job!r} raised", Failure(), pool=self.name, job=f)
            del job, f, args, kwargs  # nothing of a finished job stays alive while waiting


def _with_callback(on_result, f, args, kwargs):
    try:
        result = f(*args, **kwargs)
    except BaseException:
        on_result(False, Failure())
    else:
        on_result(True, result)
