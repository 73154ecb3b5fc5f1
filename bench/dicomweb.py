"""Benchmark STOW-RS: dicomgw against its own DIMSE port and against Orthanc.

    python -m bench.dicomweb [--reps N] [--quick] [--no-big] [--out bench/results]

In one run, on the same files (500 CT images of 512 x 512, 16 bit):

- DCMTK ``storescu`` to the gateway's DIMSE port, all on one association;
- STOW-RS to the gateway, all in one request, and in 50 requests of 10 (one
  keep-alive connection, one request after the other);
- STOW-RS to Orthanc (with its DICOMweb plugin), the same two ways;

and one 1 GiB instance via STOW-RS to the gateway, whose peak resident set
size is read from ``/proc`` (VmHWM) just before it is stopped.

The STOW-RS client is the same for both servers and is not the gateway's
code: Python's ``http.client`` with a Content-Length body sent in 1 MiB
pieces read from the files (C ``sendall``; no body is built in memory).
Every receiver is a fresh process per measured run, storage on the same
file system, fsync on for the gateway (its default).  Medians of ``reps``
runs, alternating receivers within each repetition.  Writes
``dicomweb.md`` and ``dicomweb.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

from bench import data
from bench.receivers import BENCH_AE, Gateway, Receiver, free_port, peak_rss, wait_for_port
from bench.run import Workload, run_clients

BOUNDARY = "dicomgw-bench-boundary"
PIECE = 1 << 20
ORTHANC_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class WebGateway(Gateway):
    """The gateway with ``listen.dicomweb`` on a second port."""

    def __init__(self, workdir):
        super().__init__(workdir, name="dicomgw STOW-RS")
        self.web_port = 0

    def config_text(self):
        self.web_port = free_port()
        text = super().config_text()
        return text.replace("[listen]\n", f'[listen]\ndicomweb = "tcp:{self.web_port}:interface=127.0.0.1"\n')

    def start(self, run_id):
        super().start(run_id)
        wait_for_port(self.web_port, self.proc)

    def url_path(self):
        return "/dicomweb/studies"


class Orthanc(Receiver):
    name = "Orthanc STOW-RS"

    def command(self):
        self.web_port = free_port()
        config = {
            "Name": "bench", "StorageDirectory": os.path.join(self.root, "db"),
            "IndexDirectory": os.path.join(self.root, "db"), "DicomPort": self.port, "HttpPort": self.web_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "StorageCompression": False,
            "Plugins": [ORTHANC_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "OverwriteInstances": True,
        }
        path = os.path.join(self.root, "orthanc.json")
        with open(path, "w") as f:
            json.dump(config, f)
        return [shutil.which("Orthanc") or "/usr/sbin/Orthanc", path]

    def start(self, run_id):
        super().start(run_id)
        wait_for_port(self.web_port, self.proc)

    def url_path(self):
        return "/dicom-web/studies"

    def store_dir(self):
        return os.path.join(self.root, "db")

    def stored(self):
        # Orthanc keeps one file per instance plus its index files.
        top = self.store_dir()
        return sum(len(names) for directory, _dirs, names in os.walk(top) if directory != top)


def _body(paths):
    """(length, pieces): a multipart/related body read from the files lazily."""
    heads = []
    for i, p in enumerate(paths):
        lead = "\r\n" if i else ""
        heads.append(f"{lead}--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    length = sum(len(h) for h in heads) + sum(os.path.getsize(p) for p in paths) + len(tail)

    def pieces():
        for head, p in zip(heads, paths):
            yield head
            with open(p, "rb") as f:
                while True:
                    chunk = f.read(PIECE)
                    if not chunk:
                        break
                    yield chunk
        yield tail

    return length, pieces()


def stow(port, path, batches, timeout=600.0):
    """POST each batch of files as one request over one connection; returns
    (seconds, statuses)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    statuses = []
    started = time.perf_counter()
    for batch in batches:
        length, pieces = _body(batch)
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
        conn.putheader("Accept", "application/dicom+json")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        for piece in pieces:
            conn.send(piece)
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed, statuses


def measure(receiver, run_id, work):
    receiver.start(run_id)
    try:
        seconds, ok = work(receiver)
        stored = receiver.stored()
    finally:
        rss = receiver.stop()
        receiver.release_space()
    return {"seconds": seconds, "ok": ok, "stored": stored, "rss": rss}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="50 small CT and a 64 MiB instance, one repetition")
    p.add_argument("--no-big", action="store_true", help="leave out the 1 GiB instance")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    workdir = args.workdir or os.path.join(tempfile.gettempdir(), "dicomgw-bench")
    os.makedirs(workdir, exist_ok=True)
    count, rows, big = (50, 256, 64 << 20) if args.quick else (500, 512, 1 << 30)
    reps = 1 if args.quick else args.reps
    [files] = data.ct_series(workdir, 1, count, rows=rows)
    per = 10
    tens = [files[i:i + per] for i in range(0, len(files), per)]
    total_bytes = sum(os.path.getsize(f) for f in files)
    orthanc_ok = os.path.exists(ORTHANC_PLUGIN) and (shutil.which("Orthanc") or os.path.exists("/usr/sbin/Orthanc"))

    def dimse(r):
        seconds, failed, _client_cpu = run_clients(r.port, Workload([files]))
        return seconds, failed == 0

    def stow_one(r):
        seconds, statuses = stow(r.web_port, r.url_path(), [files])
        return seconds, statuses == [200]

    def stow_tens(r):
        seconds, statuses = stow(r.web_port, r.url_path(), tens)
        return seconds, statuses == [200] * len(tens)

    cases = [("dimse", "DCMTK storescu -> dicomgw DIMSE (1 association)", lambda: Gateway(workdir), dimse),
             ("stow1", f"STOW-RS -> dicomgw, 1 request of {count}", lambda: WebGateway(workdir), stow_one),
             ("stow10", f"STOW-RS -> dicomgw, {len(tens)} requests of {per}", lambda: WebGateway(workdir), stow_tens)]
    if orthanc_ok:
        cases += [("orthanc1", f"STOW-RS -> Orthanc, 1 request of {count}", lambda: Orthanc(workdir), stow_one),
                  ("orthanc10", f"STOW-RS -> Orthanc, {len(tens)} requests of {per}", lambda: Orthanc(workdir),
                   stow_tens)]
    runs: dict[str, list[dict]] = {key: [] for key, *_ in cases}
    for rep in range(reps):
        for key, label, make, work in cases:
            result = measure(make(), f"dw-{key}-{rep}", work)
            runs[key].append(result)
            print(f"rep {rep + 1}/{reps} {label}: {result['seconds']:.2f} s, ok={result['ok']}, "
                  f"stored={result['stored']}", flush=True)

    big_result = None
    if not args.no_big:
        path = data.big_instance(workdir, big)

        def send_big(r):
            seconds, statuses = stow(r.web_port, r.url_path(), [[path]])
            return seconds, statuses == [200]

        big_result = measure(WebGateway(workdir), "dw-big", send_big)
        print(f"{big >> 20} MiB instance via STOW-RS: {big_result['seconds']:.2f} s, peak RSS "
              f"{(big_result['rss'] or 0) / 1e6:.1f} MB, ok={big_result['ok']}", flush=True)

    med = {key: statistics.median(r["seconds"] for r in rs) for key, rs in runs.items()}
    allok = {key: all(r["ok"] and r["stored"] >= count for r in rs) for key, rs in runs.items()}
    lines = ["# STOW-RS benchmark", "",
             f"{count} CT images ({rows} x {rows}, 16 bit), {total_bytes / 1e6:.1f} MB; medians of {reps} "
             f"run(s); machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
             f"gateway with fsync on (its default); started {time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
             "| case | median s | MB/s | all stored | runs (s) |", "|---|---|---|---|---|"]
    for key, label, *_ in cases:
        times = ", ".join(f"{r['seconds']:.2f}" for r in runs[key])
        lines.append(f"| {label} | {med[key]:.2f} | {total_bytes / 1e6 / med[key]:.0f} | "
                     f"{'yes' if allok[key] else 'NO'} | {times} |")
    lines += ["", "Targets:", ""]
    for key in ("stow1", "stow10"):
        ratio = med[key] / med["dimse"]
        lines.append(f"- {key}: STOW-RS to dicomgw within 1.5x its DIMSE figure: {ratio:.2f}x "
                     f"({'met' if ratio <= 1.5 else 'NOT met'})")
        other = "orthanc" + key[4:]
        if other in med:
            lines.append(f"- {key}: faster than Orthanc's STOW-RS: {med[key]:.2f} s against {med[other]:.2f} s "
                         f"({'met' if med[key] < med[other] else 'NOT met'})")
    if big_result is not None:
        rss = (big_result["rss"] or 0) / 1e6
        lines.append(f"- a {big >> 20} MiB instance via STOW-RS at < 150 MB peak RSS: {rss:.1f} MB in "
                     f"{big_result['seconds']:.1f} s ({'met' if rss < 150 and big_result['ok'] else 'NOT met'})")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    with open(os.path.join(args.out, f"dicomweb{suffix}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"dicomweb{suffix}.json"), "w") as f:
        json.dump({"runs": runs, "big": big_result, "count": count, "bytes": total_bytes}, f, indent=1)
    return 0 if all(allok.values()) and (big_result is None or big_result["ok"]) else 1


if __name__ == "__main__":
    sys.exit(main())
