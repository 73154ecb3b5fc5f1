"""The management API's routes: one line each, the table the dispatcher
(:mod:`gateway.ops.api`) follows and the OpenAPI document
(:mod:`gateway.ops.openapi`) is made from, so that the two cannot part."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.config.options import NAME
from gateway.export.store import JOB_STATES
from gateway.ops.query import AE_PATTERN, LO_PATTERN, PAGING, UID_PATTERN, date_time, integer, one_of, text
from gateway.workflow.payloads import PAYLOAD_STATES

_UID = text(UID_PATTERN, "a UID (digits and dots)", 64)
_NAME = text(NAME.pattern[1:-1], "a name of 1 to 64 letters, digits or _-.", 64)
_PAYLOAD_ID = text(r"[A-Za-z0-9_.\-]{1,128}", "a payload id", 128)
_JOB_ID = integer(1, 2 ** 62)

#: GET /studies: filters, and paging.
STUDY_FILTERS = {
    "PatientID": text(LO_PATTERN, "a Patient ID (1 to 64 characters, no backslash)", 64).describe(
        "only instances of this Patient ID (exact)"),
    "StudyInstanceUID": _UID.describe("only this study"),
    "ae": text(AE_PATTERN, "an AE title", 16).describe("only instances received on this AE title of ours"),
    "received_since": date_time().describe("only instances received at or after this time"),
    "received_before": date_time().describe("only instances received before this time"),
}


@dataclass(frozen=True)
class Route:
    """One route of the API.  ``path`` segments in braces are parameters,
    checked by ``path_params``; ``responses`` maps a status to
    (description, a component schema name or a schema, [media type])."""

    method: str
    path: str
    handler: str
    summary: str
    params: dict = field(default_factory=dict)
    path_params: dict = field(default_factory=dict)
    body: str | None = None
    responses: dict = field(default_factory=dict)
    description: str = ""

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.strip("/").split("/"))


_NO_PROVIDER = ("that part of the gateway is not configured", "Error")

ROUTES = (
    Route("GET", "/health", "get_health", "Whether the gateway works",
          responses={200: ("ok, or degraded (works, not fully: reasons say why)", "Health"),
                     503: ("unhealthy: a listener is down, the storage root is unusable or a service reports "
                           "a problem", "Health")}),
    Route("GET", "/status", "get_status", "Listeners, active associations, storage, queues",
          responses={200: ("the gateway's state", "Status")}),
    Route("GET", "/metrics", "get_metrics", "Prometheus metrics",
          description="The text exposition format, or OpenMetrics when the Accept header asks for it.",
          responses={200: ("every metric of the gateway's registry", {"type": "string"},
                           ("text/plain", "application/openmetrics-text"))}),
    Route("GET", "/openapi.json", "get_openapi", "This document",
          responses={200: ("the OpenAPI document of the API", {"type": "object"})}),
    Route("GET", "/associations", "get_associations", "The most recent associations (up to 1000 kept), newest first",
          params=PAGING, responses={200: ("a page of associations", "AssociationPage")}),
    Route("GET", "/studies", "get_studies", "What the gateway holds, study by study, the most recently received "
                                             "first",
          description="The counts, bytes and times of each study are of its instances that match the filters.",
          params={**STUDY_FILTERS, **PAGING},
          responses={200: ("a page of studies", "StudySummaryPage"), 503: _NO_PROVIDER}),
    Route("GET", "/studies/{uid}", "get_study", "A study's series and instances, with the associations they came on",
          path_params={"uid": _UID},
          responses={200: ("the study", "Study"), 404: ("nothing of that study is held", "Error"),
                     503: _NO_PROVIDER}),
    Route("POST", "/studies/{uid}/export", "post_study_export", "Export every file held of a study",
          path_params={"uid": _UID}, body="StudyExportRequest",
          responses={202: ("one export job per destination, queued", "StudyExportQueued"),
                     404: ("nothing of that study is held", "Error"),
                     422: ("an unknown destination", "Error"), 503: _NO_PROVIDER}),
    Route("GET", "/exports", "get_exports", "Export jobs, newest first",
          params={**PAGING, "state": one_of(JOB_STATES)},
          responses={200: ("a page of export jobs", "ExportJobPage"), 503: _NO_PROVIDER}),
    Route("POST", "/exports", "post_exports", "Export files under the storage root", body="ExportRequest",
          responses={202: ("one export job per destination, queued", "ExportsQueued"),
                     422: ("an unknown destination", "Error"), 503: _NO_PROVIDER}),
    Route("GET", "/exports/{id}", "get_export", "One export job with its files' statuses",
          path_params={"id": _JOB_ID},
          responses={200: ("the job", "ExportJob"), 404: ("no such job", "Error"), 503: _NO_PROVIDER}),
    Route("GET", "/destinations", "get_destinations", "The configured destinations", params=PAGING,
          responses={200: ("a page of destinations", "DestinationPage"), 503: _NO_PROVIDER}),
    Route("POST", "/destinations/{name}/echo", "post_echo", "C-ECHO a destination",
          path_params={"name": _NAME},
          responses={200: ("it answered", "EchoResult"), 502: ("it did not answer, or refused (reason)",
                                                               "EchoResult"),
                     404: ("no such destination", "Error"), 503: _NO_PROVIDER}),
    Route("GET", "/payloads", "get_payloads", "Payloads and their pipeline jobs, newest first",
          params={**PAGING, "state": one_of(PAYLOAD_STATES)},
          responses={200: ("a page of payloads", "PayloadPage"), 503: _NO_PROVIDER}),
    Route("POST", "/payloads/{id}/jobs/{pipeline}/retry", "post_retry", "Run a failed pipeline job again",
          description="One more attempt, now; its attempts go on counting.",
          path_params={"id": _PAYLOAD_ID, "pipeline": _NAME},
          responses={202: ("the job, pending", "PipelineJob"), 404: ("no such payload or job", "Error"),
                     409: ("the job is not failed", "Error"), 503: _NO_PROVIDER}),
)
