"""The gateway's Prometheus metrics: their definitions, fed by log events and by the ways in.

:class:`Metrics` holds a ``prometheus_client`` registry of its own: our
metrics (every name starts with ``dicomgw_``) beside the standard process
and platform collectors (``process_resident_memory_bytes``,
``process_open_fds``, ``process_cpu_seconds_total``, ``python_info``).
It is a ``twisted.logger`` observer: services only log their events (see
:mod:`gateway.interfaces`), and the counters here follow them
(:data:`EVENT_COUNTERS`: one line maps an event name to a counter and the
event fields used as labels).  Stored instances, once per instance on the
hot path, are counted by a direct call instead
(:class:`~gateway.interfaces.IMetrics`): a cached child per AE title, so
that call is two counter increments and a histogram observation.
:meth:`Metrics.render` is ``prometheus_client``'s exposition
(``GET /metrics``), in the format the scraper asks for.
"""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Histogram, Info, PlatformCollector, ProcessCollector,
                               disable_created_metrics)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from twisted.logger import ILogObserver
from zope.interface import implementer

from gateway import __version__, IMPLEMENTATION_CLASS_UID
from gateway.interfaces import IMetrics

# No "<name>_created" series beside each counter and histogram: the start
# time is process_start_time_seconds.  (A setting of the whole process; the
# gateway's metrics are its only ones.)
disable_created_metrics()

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


class _Capped:
    """A labelled metric that grows at most MAX_SERIES label sets; later ones
    are counted under "other".  Children are cached by their label values."""

    def __init__(self, metric):
        self.metric = metric
        self.children: dict[tuple, object] = {}

    def child(self, values):
        values = tuple(str(v) for v in values)
        found = self.children.get(values)
        if found is None:
            if len(self.children) >= MAX_SERIES:
                values = ("other",) * len(values)
                found = self.children.get(values)
            if found is None:
                found = self.children[values] = self.metric.labels(*values)
        return found


class _ScrapeGauges:
    """The gauges measured for one scrape (active associations, storage,
    the services' reports), handed over by :meth:`Metrics.render`."""

    def __init__(self):
        self.gauges = ()

    def collect(self):
        for name, help_text, samples in self.gauges:
            names = sorted({k for labels, _ in samples for k in labels})
            family = GaugeMetricFamily(name, help_text, labels=names)
            for labels, value in samples:
                family.add_metric([str(labels.get(n, "")) for n in names], value)
            yield family


@implementer(ILogObserver, IMetrics)
class Metrics:
    """Our metrics, in a registry of their own; see the module docstring."""

    def __init__(self):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info("dicomgw_build", "The running dicomgw version.", registry=self.registry).info(
            {"version": __version__, "implementation_class_uid": IMPLEMENTATION_CLASS_UID})
        self._by_event = {}
        for event, (name, help_text, labels) in EVENT_COUNTERS.items():
            self._by_event[event] = (self._counter(name, help_text, labels), labels)
        self.rejected = self._counter("dicomgw_associations_rejected_total",
                                      "Associations rejected, by PS3.8 result, source and reason.",
                                      ("result", "source", "reason"))
        self.instances = self._counter("dicomgw_instances_received_total", "Instances stored, by called AE title.",
                                       ("called_ae",))
        self.bytes = self._counter("dicomgw_received_bytes_total", "Dataset bytes stored, by called AE title.",
                                   ("called_ae",))
        self.failed = self._counter("dicomgw_instances_failed_total",
                                    "C-STORE requests answered with a failure, by called AE title and status.",
                                    ("called_ae", "status"))
        self.latency = Histogram("dicomgw_store_latency_seconds",
                                 "Seconds from a C-STORE command to the instance being durable on disk.",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self._per_ae: dict[str, tuple] = {}  # called AE title -> (instances child, bytes child)
        self._scrape = _ScrapeGauges()
        self.registry.register(self._scrape)

    def _counter(self, name, help_text, labels):
        counter = Counter(name, help_text, labels, registry=self.registry)
        return _Capped(counter) if labels else counter

    @staticmethod
    def _inc(metric, values=(), amount=1):
        (metric.child(values) if isinstance(metric, _Capped) else metric).inc(amount)

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
            metric, fields = mapped
            self._inc(metric, [event.get(f, "unknown") for f in fields])
        if kind == "instance.failed":
            self._inc(self.failed, [event.get("called_ae", "unknown"), f"0x{int(event.get('status', 0)):04X}"])
        elif kind == "association.closed" and event.get("result") == "rejected":
            self._inc(self.rejected, reject_labels(event.get("reject_result"), event.get("reject_source"),
                                                   event.get("reject_reason")))

    def instance_stored(self, called_ae, size, latency):
        children = self._per_ae.get(called_ae)
        if children is None:
            children = self._per_ae[called_ae] = (self.instances.child([called_ae]),
                                                   self.bytes.child([called_ae]))
        children[0].inc()
        children[1].inc(size)
        self.latency.observe(latency)

    def render(self, gauges=(), accept: str | None = None) -> tuple[str, str]:
        """(content type, exposition text) of every metric of the registry,
        in the format ``accept`` (the request's Accept header) asks for.
        ``gauges``: (name, help, [(labels dict, value)]) measured for this scrape."""
        encoder, content_type = choose_encoder(accept or "")
        self._scrape.gauges = tuple(gauges)
        try:
            return content_type, encoder(self.registry).decode("utf-8")
        finally:
            self._scrape.gauges = ()
