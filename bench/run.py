"""Benchmark dicomgw against DCMTK storescp and pynetdicom storescp.

    python -m bench.run [--quick] [--big] [--reps N] [--only 1,2] [--out bench/results]

Every receiver runs as its own process on 127.0.0.1 and is started fresh for
each measured run.  The client is always DCMTK ``storescu`` (TCP_NODELAY=1).
Within one repetition every receiver of a scenario gets the same workload in
turn (alternating, so a noisy neighbour hurts all of them alike); the report
gives medians over the repetitions and the ratio to DCMTK.

Writes ``results.md`` (table, targets, machine), ``results.json`` (every
run) and ``results.png`` (bar chart, when matplotlib is installed) under the
output directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

from bench import data
from bench.receivers import (
    BENCH_AE,
    RUNS,
    DcmtkStorescp,
    Floor,
    Gateway,
    PynetdicomStorescp,
    Receiver,
    TLSFiles,
    gateway_tls_support,
)

MB = 1e6
CLIENT_TIMEOUT = 600.0


# ---- workloads ---------------------------------------------------------------


@dataclass
class Workload:
    """What the clients send: one file list per association, all at once."""

    associations: list[list[str]]

    @property
    def instances(self) -> int:
        return sum(len(a) for a in self.associations)

    @property
    def bytes(self) -> int:
        return sum(os.path.getsize(p) for a in self.associations for p in a)


def storescu_command(port: int, files: list[str], tls: TLSFiles | None = None) -> list[str]:
    cmd = ["storescu", "-q", "-aet", "BENCH", "-aec", BENCH_AE, "-pdu", "131072"]
    if tls is not None:
        cmd += ["+tls", tls.key, tls.cert, "-ic"]
    return cmd + ["127.0.0.1", str(port)] + files


def run_clients(port: int, workload: Workload, tls: TLSFiles | None = None,
                timeout: float = CLIENT_TIMEOUT) -> tuple[float, int, float]:
    """Start one storescu per association at once; wait for all.

    Returns (wall seconds from the first start to the last exit, number of
    clients that failed, CPU seconds the clients used).  The wait blocks in
    ``wait4``: ``Popen.wait`` with a timeout polls, sleeping up to 50 ms
    between looks, which made 50 ms the resolution of every time measured.
    A timer kills whatever still runs at the deadline (a killed client
    counts as failed).
    """
    env = dict(os.environ, TCP_NODELAY="1")
    started = time.perf_counter()
    procs = [subprocess.Popen(storescu_command(port, files, tls), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
             for files in workload.associations]

    def kill_all():
        for p in procs:
            p.kill()  # nothing happens to one already reaped

    timer = threading.Timer(timeout, kill_all)
    timer.daemon = True
    timer.start()
    failed, cpu = 0, 0.0
    try:
        for p in procs:
            _pid, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            failed += p.returncode != 0
            cpu += usage.ru_utime + usage.ru_stime
        ended = time.perf_counter()
    finally:
        timer.cancel()
    return ended - started, failed, cpu


# ---- scenarios ---------------------------------------------------------------


@dataclass
class Scenario:
    key: str
    title: str
    workload: Workload
    receivers: list
    unit: str  # "MB/s" or "inst/s": the rate column
    tls: TLSFiles | None = None
    note: str = ""
    #: Measure the disk's own cost of a durable file of the workload's size
    #: before each repetition (see disk_fsync_cost).
    fsync_probe: bool = False


@dataclass
class Run:
    scenario: str
    receiver: str
    rep: int
    seconds: float
    instances: int
    bytes: int
    stored: int
    failed_clients: int
    peak_rss: int | None
    cpu_s: float | None = None  # the receiver process's CPU time (forked children not counted)
    client_cpu_s: float | None = None  # the storescu processes' CPU time
    # The host just before and during the run (see host_times): SHA-256 in
    # MB/s on one core, and the share of all CPU time the hypervisor took.
    sha256_probe: float | None = None
    steal: float | None = None
    # What making one file of this workload's size durable costs the disk
    # (seconds, see disk_fsync_cost), measured before this repetition.
    disk_fsync_s: float | None = None


@dataclass
class Sizes:
    ct_single: int = 500
    small: int = 2000
    ct_groups: int = 8
    ct_per_group: int = 100
    concurrent: int = 200
    per_concurrent: int = 5
    big_bytes: int = 1 << 30
    ct_rows: int = 512
    reps: int = 5
    reps_big: int = 2


QUICK = Sizes(ct_single=20, small=100, ct_groups=4, ct_per_group=5, concurrent=10,
              per_concurrent=5, big_bytes=32 << 20, ct_rows=512, reps=1, reps_big=1)


FLOOR_TLS = ("DCMTK does not fsync: compare it with the fsync=false row.  The floor is bench/floor.py "
             "under Twisted's TLS (pyOpenSSL), the TLS layer the gateway uses")
NO_FSYNC = ("dicomgw fsyncs every instance and its directory before answering Success (the default); "
            "neither DCMTK nor pynetdicom fsync: compare them with the fsync=false row.  The floor "
            "(bench/floor.py) is the least a Twisted receiver can do: PDUs framed, PDV data written "
            "behind a meta header with BLAKE3 inline, renamed on the reactor")


def build_scenarios(workdir: str, sizes: Sizes, only: set[str], big: bool, log=print) -> list[Scenario]:
    """The scenarios of issue 7, their data generated (or reused) under workdir."""
    w = workdir
    dcmtk, pynet = (lambda **kw: DcmtkStorescp(w, **kw)), (lambda: PynetdicomStorescp(w))
    out = []
    need_ct = {"1", "3", "6"} & only
    ct = []
    if need_ct:
        log(f"data: {sizes.ct_groups} x {max(sizes.ct_per_group, 1)} CT images ...")
        groups = max(sizes.ct_groups, -(-sizes.ct_single // sizes.ct_per_group))
        ct = data.ct_series(w, groups, sizes.ct_per_group, sizes.ct_rows)
    flat_ct = [p for g in ct for p in g]
    concurrent = 1000 if big else sizes.concurrent
    small_needed = max(sizes.small if "2" in only else 0,
                       concurrent * sizes.per_concurrent if "4" in only else 0)
    small = data.small_instances(w, small_needed) if small_needed else []
    ct_label = f"CT {sizes.ct_rows}x{sizes.ct_rows}"

    if "1" in only:
        out.append(Scenario("1", f"{sizes.ct_single} {ct_label}, one association",
                            Workload([flat_ct[:sizes.ct_single]]),
                            [Gateway(w), Gateway(w, fsync=False), dcmtk(), Floor(w), pynet()], "MB/s",
                            note=NO_FSYNC, fsync_probe=True))
    if "2" in only:
        out.append(Scenario("2", f"{sizes.small} small (8 KB) instances, one association",
                            Workload([small[:sizes.small]]),
                            [Gateway(w), Gateway(w, fsync=False), dcmtk(), Floor(w), pynet()], "inst/s",
                            note=NO_FSYNC, fsync_probe=True))
    if "3" in only:
        out.append(Scenario("3", f"{sizes.ct_groups} concurrent associations x {sizes.ct_per_group} {ct_label}",
                            Workload(ct[:sizes.ct_groups]), [Gateway(w), dcmtk(fork=True), pynet()], "MB/s",
                            note="DCMTK runs with --fork"))
    if "4" in only:
        n, k = concurrent, sizes.per_concurrent
        out.append(Scenario("4", f"{n} concurrent associations x {k} small instances",
                            Workload([small[i * k:(i + 1) * k] for i in range(n)]),
                            [Gateway(w), dcmtk(fork=True), pynet()], "inst/s",
                            note="DCMTK runs with --fork: its peak RSS is the parent's only"))
    if "5" in only:
        log(f"data: one instance of {sizes.big_bytes / 2**20:.0f} MiB ...")
        path = data.big_instance(w, sizes.big_bytes)
        out.append(Scenario("5", f"one {_size_label(sizes.big_bytes)} instance",
                            Workload([[path]]), [Gateway(w), dcmtk(), pynet()], "MB/s"))
    if "6" in only:
        files = flat_ct[:sizes.ct_single]
        receivers = [Gateway(w, fsync=True), Gateway(w, fsync=False), dcmtk()]
        out.append(Scenario("6", f"gateway fsync on/off: {len(files)} {ct_label}, one association",
                            Workload([files]), receivers, "MB/s"))
        tls = TLSFiles(os.path.join(w, "tls"))
        why = gateway_tls_support(tls)
        if why is None:
            out.append(Scenario("6-tls", f"over TLS: {len(files)} {ct_label}, one association",
                                Workload([files]), [Gateway(w, tls=tls), Gateway(w, fsync=False, tls=tls), dcmtk(tls=tls),
                                                   Floor(w, tls=tls)],
                                "MB/s", tls=tls, note=FLOOR_TLS))
        else:
            out.append(Scenario("6-tls", "over TLS", Workload([]), [], "MB/s",
                                note=f"skipped: {why}"))
    return out


def add_candidate(scenarios: list[Scenario], workdir: str, source: str) -> None:
    """Put the gateway of another checkout beside this one's fsync-off gateway."""
    for sc in scenarios:
        if sc.key in ("1", "2", "6-tls"):
            at = next(i for i, r in enumerate(sc.receivers) if isinstance(r, Gateway) and not r.fsync)
            sc.receivers.insert(at + 1, Gateway(workdir, fsync=False, tls=sc.tls, source=source))


#: How many files the disk probe makes each way (at most the workload's count).
DISK_PROBE_FILES = 200


def disk_fsync_cost(directory: str, size: int, count: int) -> float:
    """What the disk itself charges to make one file durable, in seconds.

    ``count`` files of ``size`` bytes are each written to a temporary name
    and renamed into place, once plainly and once durably (the file fsynced
    before the rename, its directory after it: what a receiver must do
    before it may say Success, and what the gateway does with ``fsync``);
    the answer is the difference per file.  The two ways alternate in
    quarters, so that a host slowing down in the middle charges both.  The
    files are emptied, not removed (see RUNS), and the disk synced after.
    """
    os.makedirs(directory, exist_ok=True)
    data = os.urandom(max(size, 1))
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    spent = {False: 0.0, True: 0.0}
    made = []
    try:
        for quarter in range(8):
            durable = bool(quarter % 2)
            start = time.perf_counter()
            for i in range(count // 4 or 1):
                name = os.path.join(directory, f"{quarter}-{i}")
                fd = os.open(name + ".part", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
                os.write(fd, data)
                if durable:
                    os.fsync(fd)
                os.close(fd)
                os.rename(name + ".part", name)
                if durable:
                    os.fsync(dir_fd)
                made.append(name)
            spent[durable] += time.perf_counter() - start
    finally:
        os.close(dir_fd)
        for name in made:
            os.truncate(name, 0)
        os.sync()
    per_way = 4 * (count // 4 or 1)
    return max(0.0, (spent[True] - spent[False]) / per_way)


def _size_label(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 1 << 30 else f"{n / 2**20:g} MiB"


#: Memory the bench touches before each run, beyond the workload's bytes (see warm_memory).
WARM_EXTRA = 128 << 20
WARM_MAX = 1536 << 20


def warm_memory(workload_bytes: int) -> None:
    """Touch, and give back, about as much memory as the run will fill with page cache.

    On the bench VMs the host backs a guest page only when the guest first
    uses it after having given it back (free page reporting): writing 263 MB
    into new files took 0.7-1.2 s when the pages came from long-free memory
    and 0.08-0.15 s right after a process had touched and freed 1.5 GB
    (touching costs about 2.7 us per 4 KiB page, and the effect is gone a few
    seconds later).  Which receiver paid it depended on what ran before it.
    Touching the memory right before every run makes every receiver start
    alike, and closer to a machine that does not lend its memory back.
    """
    n = min(int(workload_bytes * 1.25) + WARM_EXTRA, WARM_MAX)
    block = bytearray(n)
    block[::4096] = bytes(len(range(0, n, 4096)))
    del block


def measure(scenario: Scenario, reps: int, log=print) -> list[Run]:
    """Run every receiver ``reps`` times, alternating receivers within a repetition."""
    runs = []
    workload = scenario.workload
    count, size = workload.instances, workload.bytes
    for rep in range(reps):
        disk = None
        if scenario.fsync_probe:
            disk = disk_fsync_cost(os.path.join(scenario.receivers[0].workdir, RUNS, Receiver.run_set, "disk-probe"),
                                   size // max(count, 1), min(count, DISK_PROBE_FILES))
            log(f"  [{scenario.key}] the disk: a durable file of {size // max(count, 1):,} bytes costs "
                f"{disk * 1000:.3f} ms more than one that is not")
        for i, receiver in enumerate(scenario.receivers):
            probe = sha256_rate(PROBE_SECONDS) / MB
            receiver.start(f"s{scenario.key}-r{i}-{rep}")
            try:
                warm_memory(size)
                before = host_times()
                seconds, failed, client_cpu = run_clients(receiver.port, workload, scenario.tls)
                steal = stolen(before, host_times())
                # The last response is out: give a receiver that writes after
                # answering (none should) no extra time; count what is there.
                rss = receiver.stop()
                stored = receiver.stored()
            finally:
                if receiver.proc is not None and receiver.proc.poll() is None:
                    receiver.stop()
                # Every receiver starts on a settled disk: the next one does not
                # pay for writing back this one's files.  They are emptied, not
                # removed, until the bench ends (see RUNS).
                receiver.release_space()
                os.sync()
            run = Run(scenario.key, receiver.name, rep, seconds, count, size, stored, failed, rss,
                      None if receiver.forks else receiver.cpu, client_cpu, probe, steal, disk)
            runs.append(run)
            log(f"  [{scenario.key}] {receiver.name:36s} rep {rep}: {seconds:7.3f} s, "
                f"{stored}/{count} stored, {failed} failed client(s), "
                f"peak RSS {_mb(rss)}, CPU {run.cpu_s if run.cpu_s is not None else float('nan'):.2f} s "
                f"(clients {client_cpu:.2f} s), SHA-256 before {probe:,.0f} MB/s")
    return runs


# ---- summary -------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    title: str
    receiver: str
    median_s: float
    rate: float
    unit: str
    ratio_to_dcmtk: float | None
    peak_rss: int | None
    stored_ok: bool
    failed_clients: int
    runs: int
    note: str = ""
    cpu_s: float | None = None  # medians of the receiver's and the clients' CPU seconds
    client_cpu_s: float | None = None
    disk_fsync_s: float | None = None  # median of the disk probes of the scenario
    instances: int = 0


def summarize(scenarios: list[Scenario], runs: list[Run]) -> list[Row]:
    rows = []
    for sc in scenarios:
        if not sc.receivers:
            rows.append(Row(sc.key, sc.title, "-", 0.0, 0.0, sc.unit, None, None, True, 0, 0, sc.note))
            continue
        medians = {}
        for rec in sc.receivers:
            mine = [r for r in runs if r.scenario == sc.key and r.receiver == rec.name]
            if mine:
                medians[rec.name] = statistics.median(r.seconds for r in mine)
        base = next((v for k, v in medians.items() if k.startswith("DCMTK")), None)
        for rec in sc.receivers:
            mine = [r for r in runs if r.scenario == sc.key and r.receiver == rec.name]
            if not mine:
                continue
            m = medians[rec.name]
            rate = (mine[0].bytes / MB if sc.unit == "MB/s" else mine[0].instances) / m if m else 0.0
            rss = [r.peak_rss for r in mine if r.peak_rss is not None]
            rows.append(Row(
                sc.key, sc.title, rec.name, m, rate, sc.unit,
                (m / base) if base else None,
                None if rec.forks else (max(rss) if rss else None),
                all(r.stored == r.instances for r in mine),
                sum(r.failed_clients for r in mine), len(mine), sc.note,
                _median(r.cpu_s for r in mine), _median(r.client_cpu_s for r in mine),
                _median(r.disk_fsync_s for r in mine), mine[0].instances,
            ))
    return rows


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def targets(rows: list[Row], big: bool) -> list[tuple[str, bool | None, str]]:
    """Issue 18's targets, each (text, met?, figures); None when not measured.

    Times are compared with DCMTK ``storescp +B`` in the same run, with
    ``fsync = false`` (neither DCMTK nor the floor fsyncs).  What fsync adds
    per instance is compared with what the disk itself charges for a
    durable file of the workload's size, measured in the same run
    (:func:`disk_fsync_cost`).
    """
    def get(sc, name):
        return next((r for r in rows if r.scenario == sc and r.receiver == name), None)

    def find(sc, prefix):
        return next((r for r in rows if r.scenario == sc and r.receiver.startswith(prefix)), None)

    out = []
    for sc, limit in (("1", 1.3), ("2", 1.4)):
        gw, dc = get(sc, "dicomgw fsync=false"), find(sc, "DCMTK")
        if gw and dc:
            floor = find(sc, "floor")
            extra = f"; the floor {floor.median_s / dc.median_s:.2f} x" if floor else ""
            out.append((f"Scenario {sc} ({gw.title}), fsync off: <= {limit} x DCMTK storescp +B", gw.ratio_to_dcmtk <= limit,
                        f"{gw.median_s:.3f} s = {gw.ratio_to_dcmtk:.2f} x DCMTK ({dc.median_s:.3f} s){extra}"))
    for sc in ("1", "2"):
        on, off = get(sc, "dicomgw"), get(sc, "dicomgw fsync=false")
        if on and off and on.disk_fsync_s:
            added = (on.median_s - off.median_s) / on.instances
            out.append((f"Scenario {sc}: what fsync adds per instance <= 1.2 x the disk's own cost of a durable file",
                        added <= 1.2 * on.disk_fsync_s,
                        f"{added * 1000:.3f} ms per instance = {added / on.disk_fsync_s:.2f} x the disk's "
                        f"{on.disk_fsync_s * 1000:.3f} ms"))
    gw = get("5", "dicomgw")
    if gw and gw.peak_rss is not None:
        out.append((f"Scenario 5: gateway peak RSS < 100 MB ({gw.title})", gw.peak_rss < 100e6,
                    f"{gw.peak_rss / 1e6:.0f} MB"))
    gw = get("4", "dicomgw")
    if gw:
        label = "Scenario 4 with 1000 associations" if big else "Scenario 4 (1000 only with --big)"
        ok = gw.failed_clients == 0 and gw.stored_ok
        out.append((f"{label}: every association served", ok if big else (None if ok else False),
                    f"{gw.title}: {gw.failed_clients} failed association(s), "
                    f"all stored: {'yes' if gw.stored_ok else 'no'}, peak RSS {_mb(gw.peak_rss)}"))
    gw, dc = get("6-tls", "dicomgw fsync=false TLS"), find("6-tls", "DCMTK")
    if gw and dc:
        floor = find("6-tls", "floor")
        extra = f"; the floor {floor.median_s / dc.median_s:.2f} x" if floor else ""
        out.append(("Scenario 6-tls: <= 1.5 x DCMTK storescp +B +tls", gw.ratio_to_dcmtk <= 1.5,
                    f"{gw.median_s:.3f} s = {gw.ratio_to_dcmtk:.2f} x DCMTK ({dc.median_s:.3f} s){extra}"))
    return out


def sha256_rate(seconds: float = 0.3, algorithm: str = "sha256") -> float:
    """Bytes per second that SHA-256 (or BLAKE3) takes in 128 KiB pieces."""
    piece = os.urandom(128 << 10)
    if algorithm == "blake3":
        import blake3

        h = blake3.blake3()
    else:
        h = hashlib.sha256()
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(8):
            h.update(piece)
        done += 8 * len(piece)
    return done / elapsed


#: How long the CPU's speed is probed (SHA-256) before each run.
PROBE_SECONDS = 0.1


def host_times(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(CPU time of all cores, of it the time the hypervisor gave to others),
    in clock ticks since boot; None where the kernel does not say."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is in user)
    ticks = [int(x) for x in fields[1:9]]
    return sum(ticks), ticks[7]


def stolen(before, after) -> float | None:
    """The share of the CPU time between two :func:`host_times` that was stolen."""
    if before is None or after is None:
        return None
    total = after[0] - before[0]
    return (after[1] - before[1]) / total if total > 0 else 0.0


def host_lines(runs: list[Run]) -> list[str]:
    """Per scenario: how fast the CPU was before its runs, and how much the host took."""
    lines = []
    for key in dict.fromkeys(r.scenario for r in runs):
        mine = [r for r in runs if r.scenario == key]
        probes = [r.sha256_probe for r in mine if r.sha256_probe is not None]
        timed = [(r.steal, r.seconds) for r in mine if r.steal is not None]
        parts = []
        if probes:
            parts.append(f"SHA-256 {min(probes):,.0f}-{max(probes):,.0f} MB/s before its runs "
                         f"(median {statistics.median(probes):,.0f})")
        if timed and sum(t for _s, t in timed) > 0:
            # Weighted by duration: a short run spans few clock ticks.
            share = sum(s * t for s, t in timed) / sum(t for _s, t in timed)
            parts.append(f"CPU time taken by the hypervisor during its runs {share:.1%}")
        if parts:
            lines.append(f"- {key}: " + "; ".join(parts))
    return lines


def _proc_field(path: str, key: str) -> str | None:
    """The value of the first ``key: value`` line of a /proc file, or None."""
    try:
        with open(path) as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith(key))
    except (OSError, StopIteration):
        return None


def machine() -> dict:
    cpu = _proc_field("/proc/cpuinfo", "model name") or "?"
    flags = set((_proc_field("/proc/cpuinfo", "flags") or "").split())
    mem = int((_proc_field("/proc/meminfo", "MemTotal") or "0 kB").split()[0]) * 1024

    def version(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
            return out.strip().splitlines()[0] if out.strip() else "?"
        except (OSError, subprocess.SubprocessError):
            return "not installed"

    import twisted
    try:
        import pynetdicom
        pynet = pynetdicom.__version__
    except ImportError:
        pynet = "not installed"
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory": f"{mem / 2**30:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "twisted": twisted.__version__, "pynetdicom": pynet,
        "dcmtk": version(["storescp", "--version"]),
        # The gateway digests every byte it stores ([storage] digest): BLAKE3
        # by default; SHA-256 is slow on a CPU without SHA extensions.
        "sha256": f"{sha256_rate() / 1e6:,.0f} MB/s on one core (SHA extensions: "
                  f"{'yes' if 'sha_ni' in flags else 'no' if flags else '?'})",
        "blake3": f"{sha256_rate(algorithm='blake3') / 1e6:,.0f} MB/s on one core",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


_LOCAL_OPTIONS = ("--workdir", "--out", "--profile", "--note")


def shown_argv(argv: list[str]) -> list[str]:
    """The options of a run as the results record them: without the local
    paths of --workdir/--out/--profile, and without the note (shown apart)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _LOCAL_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(o + "=" for o in _LOCAL_OPTIONS)):
            out.append(arg)
    return out


def markdown(rows, target_list, info, args, started, runs=(), earlier=None) -> str:
    command = " ".join(["python -m bench.run"] + shown_argv(args.argv))
    lines = ["# dicomgw benchmark results", "",
             f"Run {started} UTC with `{command}`.", ""]
    if args.note:
        lines += [f"**Note:** {args.note}", ""]
    lines += ["## Machine", ""] + [f"- {k}: {v}" for k, v in info.items()] + [""]
    lines += ["## Results (medians)", "",
              "Client: DCMTK `storescu` with `TCP_NODELAY=1`, max PDU 128 KiB on every receiver. "
              "Ratio = receiver time / DCMTK time (lower is better). CPU: seconds of the receiver "
              "process (all its threads, start-up included) and of the clients.", "",
              "| scenario | receiver | median time (s) | rate | x DCMTK | CPU receiver / clients (s) | peak RSS "
              "| all stored | failed assoc. | runs |",
              "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        if r.receiver == "-":
            lines.append(f"| {r.scenario}: {r.title} | {r.note} | | | | | | | | |")
            continue
        ratio = f"{r.ratio_to_dcmtk:.2f}" if r.ratio_to_dcmtk is not None else ""
        cpu = (f"{r.cpu_s:.2f}" if r.cpu_s is not None else "n/a") + " / " + \
              (f"{r.client_cpu_s:.2f}" if r.client_cpu_s is not None else "n/a")
        lines.append(f"| {r.scenario}: {r.title} | {r.receiver} | {r.median_s:.3f} | "
                     f"{r.rate:,.0f} {r.unit} | {ratio} | {cpu} | {_mb(r.peak_rss)} | "
                     f"{'yes' if r.stored_ok else 'NO'} | {r.failed_clients} | {r.runs} |")
    probes = {r.scenario: r for r in rows if r.disk_fsync_s is not None}
    if probes:
        lines += ["", "The disk's own cost of a durable file (written to a temporary name, fsynced, renamed, "
                  "its directory fsynced, minus the same without the two fsyncs; median of one probe per "
                  "repetition, in the same run): " + "; ".join(
                      f"scenario {k}: {r.disk_fsync_s * 1000:.3f} ms per file" for k, r in probes.items())]
    notes = sorted({f"{r.scenario}: {r.note}" for r in rows if r.note and r.receiver != "-"})
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    host = host_lines(list(runs))
    if host:
        lines += ["", "## The host during the runs", "",
                  "A shared VM's speed moves from minute to minute, the reference's with it: a scenario "
                  "whose probes spread widely or whose runs lost CPU time to the hypervisor compares "
                  "less well with another run's.", ""] + host
    lines += ["", "## Targets (issue 18)", ""]
    for text, ok, figures in target_list:
        mark = "met" if ok else ("not measured" if ok is None else "NOT met")
        lines.append(f"- {text}: **{mark}** ({figures})")
    lines += before_and_now(rows, earlier)
    return "\n".join(lines) + "\n"


#: The run that closed issue 7 (on an Intel VM without SHA extensions), kept beside each new one.
EARLIER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "issue7.json")


def load_earlier(path: str = EARLIER) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def before_and_now(rows: list[Row], earlier: dict | None) -> list[str]:
    """The ratios to DCMTK of the issue 7 run beside this run's, where both have the row."""
    if not earlier:
        return []
    then = {(r["scenario"], r["receiver"]): r for r in earlier.get("rows", [])}
    lines = ["", "## Beside the issue 7 run", "",
             f"The run that closed issue 7 ({earlier.get('started', '?')} UTC, "
             f"{earlier.get('machine', {}).get('cpu', '?')}, SHA-256 "
             f"{earlier.get('machine', {}).get('sha256', '?')}): each receiver's time as a multiple of "
             "DCMTK's in its own run.", "",
             "| scenario | receiver | issue 7 (x DCMTK) | now (x DCMTK) |", "|---|---|---:|---:|"]
    for r in rows:
        old = then.get((r.scenario, r.receiver))
        if old is None or old.get("ratio_to_dcmtk") is None or r.ratio_to_dcmtk is None:
            continue
        lines.append(f"| {r.scenario}: {r.title} | {r.receiver} | {old['ratio_to_dcmtk']:.2f} | "
                     f"{r.ratio_to_dcmtk:.2f} |")
    return lines


def chart(rows: list[Row], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = [k for k in dict.fromkeys(r.scenario for r in rows) if any(
        x.scenario == k and x.receiver != "-" for x in rows)]
    big = [r for r in rows if r.scenario == "5" and r.peak_rss is not None]
    panels = len(keys) + (1 if big else 0)
    if not panels:
        return False
    cols = min(panels, 4)
    nrows = -(-panels // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows), squeeze=False)
    colours = {"dicomgw": "tab:blue", "DCMTK": "tab:green", "pynetdicom": "tab:orange"}

    def colour(name):
        return next((c for k, c in colours.items() if name.startswith(k)), "tab:gray")

    flat = [ax for row in axes for ax in row]
    for ax, key in zip(flat, keys):
        mine = [r for r in rows if r.scenario == key]
        names = [r.receiver.replace(" storescp", "") for r in mine]
        ax.bar(names, [r.median_s for r in mine], color=[colour(r.receiver) for r in mine])
        ax.set_title(f"{key}: {mine[0].title}", fontsize=8, wrap=True)
        ax.set_ylabel("median time (s), lower is better", fontsize=7)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        for i, r in enumerate(mine):
            if r.ratio_to_dcmtk is not None:
                ax.annotate(f"{r.ratio_to_dcmtk:.2f}x", (i, r.median_s), ha="center", va="bottom", fontsize=7)
    if big:
        ax = flat[len(keys)]
        ax.bar([r.receiver.replace(" storescp", "") for r in big], [r.peak_rss / 2**20 for r in big],
               color=[colour(r.receiver) for r in big])
        ax.set_title(f"5: peak RSS, {big[0].title}", fontsize=8)
        ax.set_ylabel("MiB", fontsize=7)
        ax.set_yscale("log")
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    for ax in flat[panels:]:
        ax.set_visible(False)
    fig.suptitle("dicomgw vs DCMTK storescp vs pynetdicom storescp (client: DCMTK storescu)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def check_peers() -> list[str]:
    missing = [p for p in ("storescu", "storescp", "openssl") if shutil.which(p) is None]
    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        missing.append("pynetdicom")
    return missing


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts, one repetition (a smoke run)")
    ap.add_argument("--big", action="store_true", help="scenario 4 with 1000 associations")
    ap.add_argument("--reps", type=int, help="repetitions per scenario (default 5; 2 for scenario 5)")
    ap.add_argument("--only", default="1,2,3,4,5,6", help="comma-separated scenarios to run")
    ap.add_argument("--receivers", default="",
                    help="comma-separated name prefixes of the receivers to run (default: all)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    help="where results.md/.json/.png go")
    ap.add_argument("--workdir", help="data and receiver storage (default: a new temporary directory; "
                    "give one to reuse the generated data)")
    ap.add_argument("--profile", metavar="DIR",
                    help="run the gateway under cProfile, one .pstats file per run in DIR")
    ap.add_argument("--note", default="", help="a remark printed at the top of results.md")
    ap.add_argument("--keep-runs", action="store_true",
                    help="leave the runs' emptied files in the work directory: removing thousands of files slows "
                         "file creation for minutes after it (see bench.receivers.RUNS), which the next of a "
                         "series of runs would pay")
    ap.add_argument("--candidate", metavar="DIR",
                    help="another checkout of the gateway (a change under test): it runs beside this one's, "
                         "fsync off, in scenarios 1, 2 and 6-tls, interleaved in every repetition")
    args = ap.parse_args(argv)
    args.argv = argv
    missing = check_peers()
    if missing:
        print(f"missing peers: {', '.join(missing)} (install DCMTK, openssl and pynetdicom)", file=sys.stderr)
        return 2
    if args.profile:
        Gateway.profile_dir = os.path.abspath(args.profile)
    Receiver.run_set = time.strftime("%Y%m%d-%H%M%S") if args.keep_runs else ""
    sizes = dataclasses.replace(QUICK if args.quick else Sizes())
    if args.reps:
        sizes.reps = sizes.reps_big = args.reps
    only = set(args.only.split(","))
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    info = machine()
    workdir = args.workdir or tempfile.mkdtemp(prefix="dicomgw-bench-")
    os.makedirs(workdir, exist_ok=True)
    keep = args.workdir is not None or args.keep_runs
    try:
        scenarios = build_scenarios(workdir, sizes, only, args.big)
        if args.candidate:
            add_candidate(scenarios, workdir, os.path.abspath(args.candidate))
        if args.receivers:
            prefixes = tuple(args.receivers.split(","))
            for sc in scenarios:
                sc.receivers = [r for r in sc.receivers if r.name.startswith(prefixes)]
        runs = []
        for sc in scenarios:
            if not sc.receivers:
                print(f"scenario {sc.key}: {sc.note}")
                continue
            print(f"scenario {sc.key}: {sc.title} ({sc.workload.instances} instances, "
                  f"{sc.workload.bytes / MB:.0f} MB)")
            # The 1 GiB instance runs fewer times; 1000 associations once
            # (pynetdicom alone takes minutes there).
            reps = sizes.reps_big if sc.key == "5" else sizes.reps
            runs += measure(sc, 1 if sc.key == "4" and args.big else reps)
    finally:
        if not args.keep_runs:
            shutil.rmtree(os.path.join(workdir, RUNS), ignore_errors=True)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = summarize(scenarios, runs)
    os.makedirs(args.out, exist_ok=True)
    target_list = targets(rows, args.big)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(rows, target_list, info, args, started, runs, load_earlier()))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"started": started, "argv": shown_argv(argv), "machine": info, "note": args.note,
                   "runs": [asdict(r) for r in runs], "rows": [asdict(r) for r in rows]}, f, indent=1)
    drew = chart(rows, os.path.join(args.out, "results.png"))
    print(open(os.path.join(args.out, "results.md")).read())
    if not drew:
        print("(no chart: install the [bench] extra for matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
