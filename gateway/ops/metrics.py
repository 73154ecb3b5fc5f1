"""Prometheus metrics, counted by a log observer of the structured events.

:class:`Metrics` is a ``twisted.logger`` observer: services only log their
events (see :mod:`gateway.interfaces`), and the counters here follow them.
Stored instances, once per instance on the hot path, are counted by a
direct call instead (:class:`~gateway.interfaces.IMetrics`).
:meth:`Metrics.render` writes the Prometheus text exposition format 0.0.4
(``GET /metrics``).  Every name starts with ``dicomgw_``.

Events of other services are counted by :data:`EVENT_COUNTERS`: one line
maps an event name to a counter and the event fields used as labels.
"""

from __future__ import annotations

import math

from twisted.logger import ILogObserver
from zope.interface import implementer

from gateway import __version__, IMPLEMENTATION_CLASS_UID
from gateway.interfaces import IMetrics

# Upper bounds of the store latency histogram, in seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# No metric grows more series than this; later label sets are counted as "other".
MAX_SERIES = 500

# event name -> (counter name, help, label fields).  A missing field is "unknown".
EVENT_COUNTERS = {
    "association.closed": ("dicomgw_associations_total",
                           "Associations by how they ended (released, aborted, rejected, lost).",
                           ("result",)),
    "payload.closed": ("dicomgw_payloads_total", "Payloads closed and handed to pipelines, by AE title.",
                       ("ae",)),
    "pipeline.run": ("dicomgw_pipeline_runs_total",
                     "Pipeline attempts, by pipeline and outcome (done, retry, failed).",
                     ("pipeline", "outcome")),
    "export.job.finished": ("dicomgw_export_jobs_total", "Export jobs, by destination and outcome.",
                            ("destination", "outcome")),
    "export.file.finished": ("dicomgw_export_files_total", "Exported files, by destination and outcome.",
                             ("destination", "outcome")),
    "messaging.published": ("dicomgw_messaging_published_total",
                            "Messages handed to the message broker, by routing key (a retry counts again).",
                            ("routing_key",)),
    "messaging.confirmed": ("dicomgw_messaging_confirmed_total",
                            "Messages the message broker confirmed, by routing key.", ("routing_key",)),
    "export_request": ("dicomgw_export_requests_total",
                       "Export requests from the message broker, by outcome (exported, rejected, duplicate).",
                       ("outcome",)),
    "config.reloaded": ("dicomgw_config_reloads_total", "Successful configuration reloads.", ()),
    "config.reload_failed": ("dicomgw_config_reload_failures_total",
                             "Reloads refused because the file was invalid.", ()),
}

_RJ_RESULT = {1: "permanent", 2: "transient"}
_RJ_SOURCE = {1: "service-user", 2: "service-provider-acse", 3: "service-provider-presentation"}
_RJ_REASON = {
    1: {1: "no-reason-given", 2: "application-context-name-not-supported",
        3: "calling-ae-title-not-recognized", 7: "called-ae-title-not-recognized"},
    2: {1: "no-reason-given", 2: "protocol-version-not-supported"},
    3: {1: "temporary-congestion", 2: "local-limit-exceeded"},
}


def reject_labels(result, source, reason) -> tuple[str, str, str]:
    """PS3.8 Table 9-21 codes as readable label values."""
    return (_RJ_RESULT.get(result, str(result)), _RJ_SOURCE.get(source, str(source)),
            _RJ_REASON.get(source, {}).get(reason, f"reason-{reason}"))


class _Family:
    def __init__(self, name, help_text, kind, labels):
        self.name, self.help, self.kind, self.labels = name, help_text, kind, tuple(labels)
        self.samples: dict[tuple, float] = {}

    def key(self, values) -> tuple:
        values = tuple(str(v) for v in values)
        if values not in self.samples and len(self.samples) >= MAX_SERIES:
            values = ("other",) * len(values)
        return values

    def inc(self, values=(), amount=1):
        k = self.key(values)
        self.samples[k] = self.samples.get(k, 0) + amount


class _Histogram:
    def __init__(self, name, help_text, buckets):
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float):
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    return str(value)


def _labels(names, values) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values)) + "}"


@implementer(ILogObserver, IMetrics)
class Metrics:
    """Counters and histograms fed by log events and by the ways in; see the module docstring."""

    def __init__(self):
        self.families: dict[str, _Family] = {}
        self._by_event = {}
        for event, (name, help_text, labels) in EVENT_COUNTERS.items():
            self._by_event[event] = (self._family(name, help_text, "counter", labels), labels)
        self.rejected = self._family(
            "dicomgw_associations_rejected_total",
            "Associations rejected, by PS3.8 result, source and reason.", "counter",
            ("result", "source", "reason"))
        self.instances = self._family(
            "dicomgw_instances_received_total", "Instances stored, by called AE title.", "counter",
            ("called_ae",))
        self.bytes = self._family(
            "dicomgw_received_bytes_total", "Dataset bytes stored, by called AE title.", "counter",
            ("called_ae",))
        self.failed = self._family(
            "dicomgw_instances_failed_total",
            "C-STORE requests answered with a failure, by called AE title and status.", "counter",
            ("called_ae", "status"))
        self.latency = _Histogram(
            "dicomgw_store_latency_seconds",
            "Seconds from a C-STORE command to the instance being durable on disk.", LATENCY_BUCKETS)

    def _family(self, name, help_text, kind, labels) -> _Family:
        family = _Family(name, help_text, kind, labels)
        self.families[name] = family
        return family

    def __call__(self, event):
        try:
            self._observe(event)
        except Exception:
            pass  # an observer must never raise into the logging system

    def _observe(self, event):
        kind = event.get("event")
        if kind is None:
            return
        mapped = self._by_event.get(kind)
        if mapped is not None:
            family, fields = mapped
            family.inc([event.get(f, "unknown") for f in fields])
        if kind == "instance.failed":
            self.failed.inc([event.get("called_ae", "unknown"), f"0x{int(event.get('status', 0)):04X}"])
        elif kind == "association.closed" and event.get("result") == "rejected":
            self.rejected.inc(reject_labels(event.get("reject_result"), event.get("reject_source"),
                                            event.get("reject_reason")))

    def instance_stored(self, called_ae, size, latency):
        self.instances.inc([called_ae])
        self.bytes.inc([called_ae], size)
        self.latency.observe(latency)

    def render(self, gauges=()) -> str:
        """The exposition text.  ``gauges``: (name, help, [(labels dict, value)])."""
        out = []
        out.append("# HELP dicomgw_build_info The running dicomgw version.")
        out.append("# TYPE dicomgw_build_info gauge")
        out.append(f'dicomgw_build_info{{version="{_escape(__version__)}",'
                   f'implementation_class_uid="{IMPLEMENTATION_CLASS_UID}"}} 1')
        for name, help_text, samples in gauges:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} gauge")
            for labels, value in samples:
                names = tuple(labels)
                out.append(f"{name}{_labels(names, [str(labels[n]) for n in names])} {_number(value)}")
        for family in self.families.values():
            out.append(f"# HELP {family.name} {family.help}")
            out.append(f"# TYPE {family.name} {family.kind}")
            if not family.labels and not family.samples:
                out.append(f"{family.name} 0")
            for values, value in sorted(family.samples.items()):
                out.append(f"{family.name}{_labels(family.labels, values)} {_number(value)}")
        h = self.latency
        out.append(f"# HELP {h.name} {h.help}")
        out.append(f"# TYPE {h.name} histogram")
        cumulative = 0
        for bound, n in zip(h.buckets, h.counts):
            cumulative += n
            out.append(f'{h.name}_bucket{{le="{_number(float(bound))}"}} {cumulative}')
        out.append(f'{h.name}_bucket{{le="+Inf"}} {h.count}')
        out.append(f"{h.name}_sum {_number(h.sum)}")
        out.append(f"{h.name}_count {h.count}")
        return "\n".join(out) + "\n"
