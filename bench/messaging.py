"""Messaging benchmark: the cost of [messaging] on receiving, and no request
lost or duplicated at scale.

    .venv/bin/python -m bench.messaging [--reps 3] [--ct 500] [--studies 100 --per-study 100]

1. ``--ct`` CT images (512x512) on one association to ``twistd -n dicomgw``
   with messaging off, then on (alternating, ``--reps`` times each, fsync
   off as in scenario 1 of ``bench.run``); the median storescu wall times and
   their ratio (target: within 1.1x).
2. ``--studies`` studies of ``--per-study`` small instances, sent over 10
   associations at once with messaging on: every workflow request is read
   from a queue of the bench's own; there must be exactly one per study
   (none lost, none duplicated by ``message_id``) and their ``file_count``
   must add up to the instances sent.

Needs DCMTK and a RabbitMQ on 127.0.0.1:5672 (guest/guest); the bench makes
and deletes its own exchange and queue.  Writes ``messaging.md`` (the table)
and ``messaging.json`` (every run) to ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid

from bench.data import ct_series
from bench.receivers import Gateway
from bench.run import Workload, run_clients, warm_memory

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
#: Seconds every gateway is given after its port listens, before the timed run.
SETTLE = 1.0


class MessagingGateway(Gateway):
    def __init__(self, workdir, exchange=None, timeout=2.0, name=None):
        super().__init__(workdir, fsync=False, name=name)
        self.exchange = exchange
        self.timeout = timeout

    def config_text(self):
        text = super().config_text() + f"grouping = \"study\"\ntimeout = {self.timeout}\n"
        if self.exchange:
            text += (f'\n[messaging]\nurl = "{URL}"\nexchange = "{self.exchange}"\n'
                     f'export_agents = []\n')
        return text


def _channel():
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(URL))
    return conn, conn.channel()


def make_queue(exchange):
    conn, ch = _channel()
    try:
        ch.exchange_declare(exchange, "topic", durable=True)
        queue = f"{exchange}.requests"
        ch.queue_declare(queue, durable=False)
        ch.queue_bind(queue, exchange, "md.workflow.request")
        return queue
    finally:
        conn.close()


def drop(exchange, queue):
    conn, ch = _channel()
    try:
        ch.queue_delete(queue)
        ch.exchange_delete(exchange)
    finally:
        conn.close()


def read_all(queue, expected, timeout):
    """Messages on ``queue`` until ``expected`` arrived (plus 3 s for extras) or the timeout."""
    conn, ch = _channel()
    got = []
    deadline = time.monotonic() + timeout
    extra_until = None
    try:
        while time.monotonic() < deadline and (extra_until is None or time.monotonic() < extra_until):
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                time.sleep(0.05)
                continue
            got.append((props.message_id, json.loads(body)))
            if len(got) >= expected and extra_until is None:
                extra_until = time.monotonic() + 3.0
    finally:
        conn.close()
    return got


def ct_cost(workdir, count, reps, log):
    [files] = ct_series(workdir, 1, count)
    exchange = f"dicomgw-bench-{uuid.uuid4().hex[:8]}"
    queue = make_queue(exchange)
    times = {"off": [], "on": []}
    try:
        for rep in range(reps):
            for mode in ("off", "on"):
                gw = MessagingGateway(workdir, exchange if mode == "on" else None, name=f"messaging {mode}")
                gw.start(f"msg-ct-{mode}-{rep}")
                try:
                    # Both modes get the same second to settle: with messaging on
                    # the gateway connects to the broker and declares its exchange
                    # as it starts, which is start-up, not receiving.
                    time.sleep(SETTLE)
                    warm_memory(sum(os.path.getsize(f) for f in files))
                    seconds, failed, _client_cpu = run_clients(gw.port, Workload([files]))
                    if failed:
                        raise SystemExit(f"storescu failed (messaging {mode})")
                    times[mode].append(seconds)
                    if mode == "on":
                        got = read_all(queue, 1, 60)
                        if [b["file_count"] for _m, b in got] != [count]:
                            raise SystemExit(f"expected one request of {count} files, got {len(got)}")
                finally:
                    gw.stop()
                    gw.release_space()
                    os.sync()  # as bench.run does: the next run does not pay for writing back this one
                log(f"  {count} CT, messaging {mode}, rep {rep}: {seconds:.3f} s")
    finally:
        drop(exchange, queue)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return off, on, times


def make_studies(workdir, studies, per_study):
    """``studies`` studies of ``per_study`` small CT-like instances each (one study UID per directory)."""
    from pydicom.uid import generate_uid

    from tests.dicomfiles import ct_image

    directory = os.path.join(workdir, "data", f"msg-studies-{studies}x{per_study}")
    marker = os.path.join(directory, ".complete")
    out = []
    for s in range(studies):
        sub = os.path.join(directory, f"study{s:04d}")
        if not os.path.exists(marker):
            os.makedirs(sub, exist_ok=True)
            study, ser = generate_uid(), generate_uid()
            for i in range(per_study):
                ct_image(os.path.join(sub, f"i{i:04d}.dcm"), study_uid=study, series_uid=ser, number=i + 1,
                         rows=16, cols=16)
        out.append(sorted(os.path.join(sub, n) for n in os.listdir(sub) if n.endswith(".dcm")))
    with open(marker, "w"):
        pass
    return out


def scale(workdir, studies, per_study, log):
    groups = make_studies(workdir, studies, per_study)
    exchange = f"dicomgw-bench-{uuid.uuid4().hex[:8]}"
    queue = make_queue(exchange)
    gw = MessagingGateway(workdir, exchange, timeout=1.0, name="messaging on")
    gw.start("msg-scale")
    try:
        # 10 associations at once, each with studies/10 whole studies.
        lanes = [[f for g in groups[i::10] for f in g] for i in range(min(10, studies))]
        started = time.perf_counter()
        seconds, failed, _client_cpu = run_clients(gw.port, Workload(lanes))
        got = read_all(queue, studies, 300)
        total = time.perf_counter() - started
    finally:
        gw.stop()
        gw.release_space()
        drop(exchange, queue)
    ids = [m for m, _b in got]
    files = sum(b["file_count"] for _m, b in got)
    log(f"  {studies} studies x {per_study}: sent in {seconds:.2f} s, {len(got)} request(s), "
        f"{len(set(ids))} distinct message_id(s), {files} file(s), all in after {total:.1f} s")
    return {"studies": studies, "instances": studies * per_study, "failed_associations": failed,
            "requests": len(got), "distinct_message_ids": len(set(ids)), "files_in_requests": files,
            "send_seconds": seconds, "all_requests_seconds": total}


def _shown(argv):
    """The arguments that say what was measured (not where files went)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--workdir"):
            skip = True
        elif not arg.startswith(("--out=", "--workdir=")):
            out.append(arg)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ct", type=int, default=500)
    ap.add_argument("--studies", type=int, default=100)
    ap.add_argument("--per-study", type=int, default=100)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--workdir", default=os.path.join(here, "work"), help="generated data are kept here")
    ap.add_argument("--out", default=os.path.join(here, "results"))
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    off, on, times = ct_cost(args.workdir, args.ct, args.reps, log)
    result = scale(args.workdir, args.studies, args.per_study, log)
    ok_ratio = on / off <= 1.1
    ok_scale = (result["requests"] == result["distinct_message_ids"] == args.studies
                and result["files_in_requests"] == result["instances"] and not result["failed_associations"])
    lines = [
        f"# Messaging benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
        f"`python -m bench.messaging {' '.join(_shown(argv if argv is not None else sys.argv[1:]))}`"
        .replace(" `", "`"),
        "",
        "| measure | messaging off | messaging on | ratio / result | target |",
        "|---|---|---|---|---|",
        f"| {args.ct} CT 512x512, one association, median of {args.reps} (s) | {off:.3f} | {on:.3f} | "
        f"{on / off:.3f}x | within 1.1x: {'met' if ok_ratio else 'NOT met'} |",
        f"| {result['instances']} instances in {args.studies} studies, 10 associations at once | | "
        f"{result['requests']} requests, {result['distinct_message_ids']} distinct message_id, "
        f"{result['files_in_requests']} files in them, {result['failed_associations']} failed association(s) | "
        f"{'as expected' if ok_scale else 'WRONG'} | "
        f"{args.studies} requests, none lost or duplicated: {'met' if ok_scale else 'NOT met'} |",
        "",
        f"Runs (s): off {', '.join(f'{t:.3f}' for t in times['off'])}; "
        f"on {', '.join(f'{t:.3f}' for t in times['on'])}. The {result['instances']} instances took "
        f"{result['send_seconds']:.1f} s to send; the last request was in the queue "
        f"{result['all_requests_seconds']:.1f} s after the first association started.",
    ]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "messaging.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "messaging.json"), "w") as f:
        json.dump({"ct": {"off": times["off"], "on": times["on"]}, "scale": result}, f, indent=1)
    print("\n".join(lines))
    return 0 if ok_scale else 1


if __name__ == "__main__":
    sys.exit(main())
