"""``dicomgw echo`` and ``dicomgw send``: the export code, run from a terminal.

Both read the daemon's configuration file, so they call out with the same
AE title, timeouts, TLS settings and destinations.  ``send`` records its jobs
in the same export database as the daemon (origin ``cli``), so what it did
can be read back later; it runs them itself and waits for the end.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from twisted.internet import defer
from twisted.logger import globalLogPublisher

from gateway.export.destinations import Destinations
from gateway.export.jobs import ExportService
from gateway.export.store import expand_paths
from gateway.store.database import DatabaseError
from gateway.threads import WorkerPool

# Failed files listed per job in the summary; the rest are in the database.
MAX_LISTED = 20


def _run(main):
    """Run ``main(reactor)`` (a coroutine function) in the reactor; its return value."""
    from twisted.internet import reactor

    outcome = {}

    def go():
        d = defer.ensureDeferred(main(reactor))

        def done(result):
            outcome["result"] = result
            reactor.stop()

        d.addBoth(done)

    reactor.callWhenRunning(go)
    reactor.run()
    result = outcome.get("result")
    if isinstance(result, BaseException) or hasattr(result, "raiseException"):
        result.raiseException()
    return result


def _pool():
    pool = WorkerPool(2, "dicomgw-cli-read")
    pool.start()
    return pool


def _unknown(config, name, out) -> int:
    names = ", ".join(d.name for d in config.destination) or "none"
    print(f"dicomgw: unknown destination {name!r} (configured: {names})", file=out)
    return 2


def echo(config, name: str, out=sys.stdout, err=sys.stderr) -> int:
    dest = config.destination_named(name)
    if dest is None:
        return _unknown(config, name, err)
    where = dest.dicomweb if dest.dicomweb is not None else \
        f"{dest.ae_title}@{dest.host}:{dest.port}{' (TLS)' if dest.tls else ''}"

    async def main(reactor):
        pool = _pool()
        try:
            return await Destinations(config, reactor, pool).echo(name)
        finally:
            pool.stop()

    result = _run(main)
    if result["ok"]:
        print(f"echo {name} ({where}): success, round trip {result['rtt_ms']:.1f} ms", file=out)
        return 0
    print(f"echo {name} ({where}): failed: {result['reason']}", file=out)
    return 1


class _Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, stream):
        self.total = total
        self.sent = self.failed = 0
        self.stream = stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def __call__(self, event):
        if event.get("event") not in ("export.file", "export.file.finished"):
            return
        if event.get("state") == "sent":
            self.sent += 1
        elif event.get("state") == "failed":
            self.failed += 1
        self.draw()

    def draw(self):
        if not self.tty or not self.total:
            return
        done = self.sent + self.failed
        width = 30
        filled = width * done // self.total
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                          f"({self.sent} sent, {self.failed} failed)")
        self.stream.flush()

    def finish(self):
        if self.tty and self.total:
            self.stream.write("\n")
            self.stream.flush()


def send(config, destinations, paths, *, retries=None, out=sys.stdout, err=sys.stderr) -> int:
    for name in destinations:
        if config.destination_named(name) is None:
            return _unknown(config, name, err)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        print(f"dicomgw: no such file or directory: {', '.join(missing)}", file=err)
        return 2
    files = expand_paths(paths)
    if not files:
        print("dicomgw: no files to send", file=err)
        return 2
    if retries is not None:
        config = dataclasses.replace(config, scu=dataclasses.replace(config.scu, retries=retries))
    progress = _Progress(len(files) * len(destinations), err)

    async def main(reactor):
        pool = _pool()
        service = ExportService(config, reactor, pool, resume=False)
        globalLogPublisher.addObserver(progress)
        service.startService()
        try:
            ids = await service.submit(destinations, files, "cli")
            progress.draw()
            await defer.gatherResults([service.wait(i) for i in ids])
            return [await service.job(i) for i in ids]
        finally:
            globalLogPublisher.removeObserver(progress)
            await service.stopService()
            pool.stop()

    try:
        jobs = _run(main)
    except (OSError, DatabaseError) as e:
        progress.finish()
        print(f"dicomgw: cannot use the export database under {config.gateway.storage}: {e}", file=err)
        return 1
    progress.finish()
    if jobs is None:  # the reactor stopped first (Ctrl-C)
        print("dicomgw: interrupted; unfinished jobs are resumed when the gateway (re)starts", file=err)
        return 130
    status = 0
    for job in jobs:
        print(f"job {job['id']} to {job['destination']}: {job['state']}, {job['done']} of {job['files']} "
              f"file(s) sent, {job['failed']} failed", file=out)
        failed = [f for f in job["file_statuses"] if f["state"] != "sent"]
        for f in failed[:MAX_LISTED]:
            detail = f" (status 0x{f['status']:04X})" if f["status"] is not None else ""
            print(f"  failed: {f['path']}{detail}: {f['reason']}", file=out)
        if len(failed) > MAX_LISTED:
            print(f"  ... and {len(failed) - MAX_LISTED} more failed file(s); all are in the export "
                  f"database, job {job['id']}", file=out)
        if job["state"] != "done":
            status = 1
    return status
