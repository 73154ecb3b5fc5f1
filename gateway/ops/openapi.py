"""The OpenAPI 3.1 document of the management API, made from its routes table.

:data:`gateway.ops.routes.ROUTES` lists every route with its parameters,
body and answers; :func:`document` turns that table and the schemas here
into the document the API serves at ``GET /openapi.json``.  The same
document is kept in the repository (``gateway/ops/openapi.json``) for
readers and tools; a test fails when the two differ.  Regenerate the file
after changing a route or a schema::

    python -m gateway.ops.openapi
"""

from __future__ import annotations

import json
import os
import sys

from gateway import __version__

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_STRING, _INT, _NUMBER, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
_COUNT = {"type": "integer", "minimum": 0}
_STRINGS = {"type": "array", "items": _STRING}
_NAMES = {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}


def _object(required, properties, additional=False) -> dict:
    return {"type": "object", "required": list(required), "properties": properties,
            "additionalProperties": additional}


def page_of(item: str) -> dict:
    """Every list answers this shape."""
    return _object(("items", "total", "limit", "offset"), {
        "items": {"type": "array", "items": ref(item)},
        "total": {**_COUNT, "description": "how many there are in all (with the filters given)"},
        "limit": {"type": "integer", "minimum": 1}, "offset": _COUNT})


def schemas(job_states, payload_states, instance_states) -> dict:
    """The document's components: the status and log views, exports, payloads and studies."""
    return {**_status_schemas(), **_export_schemas(job_states), **_held_schemas(payload_states, instance_states)}


def _status_schemas() -> dict:
    return {
        "Error": _object(("error",), {"error": _STRING}),
        "Health": _object(("status",), {"status": {"enum": ["ok", "degraded", "unhealthy"]},
                                        "reasons": _STRINGS}),
        "Status": _object(("version", "implementation_class_uid", "config", "uptime_seconds", "listeners",
                           "associations", "storage", "queues"), {
            "version": _STRING, "implementation_class_uid": _STRING, "config": _STRING,
            "uptime_seconds": _NUMBER,
            "listeners": {"type": "object", "additionalProperties": _object(("state",), {
                "state": _STRING, "address": _STRING, "detail": _nullable(_STRING)})},
            "associations": _object(("active", "list"), {"active": _COUNT, "list": {
                "type": "array", "items": {"type": "object"}}}),
            "storage": {"type": "object"}, "queues": {"type": "object"},
            "messaging": {"type": "object"},
            # This node, the index, and the nodes sharing it seen recently (gateway.workflow.cluster).
            "cluster": _object(("node", "index", "lease_seconds", "problems", "nodes"), {
                "node": _STRING, "index": _STRING, "lease_seconds": _NUMBER, "problems": _STRINGS,
                "nodes": _nullable({"type": "array", "items": _object(
                    ("node", "seen_ago", "alive", "pid", "version"), {
                        "node": _STRING, "seen_ago": _NUMBER, "alive": {"type": "boolean"},
                        "pid": _nullable(_INT), "version": _nullable(_STRING)})}),
                "error": _STRING})}),
        "Association": {"type": "object", "required": ["time"], "properties": {
            "time": _STRING, "association": _STRING, "calling_ae": _STRING, "called_ae": _STRING,
            "peer": _STRING, "tls_subject": _nullable(_STRING), "result": _STRING, "outcome": _STRING,
            "instances": _COUNT, "bytes": _COUNT, "failures": _COUNT, "duration": _NUMBER,
            "reject_result": _INT, "reject_source": _INT, "reject_reason": _INT,
            # Nodes sharing an index list every node's associations from it (gateway.workflow.cluster).
            "node": _nullable(_STRING), "started": _nullable(_NUMBER), "ended": _nullable(_NUMBER)}},
    }


def _export_schemas(job_states) -> dict:
    return {
        "ExportJob": _object(("id", "destination", "state", "origin", "created", "updated", "files", "done",
                              "failed"), {
            "id": {"type": ["integer", "string"]}, "destination": _STRING, "state": {"enum": list(job_states)},
            "origin": _STRING, "created": _NUMBER, "updated": _NUMBER, "attempts": _COUNT,
            "next_attempt": _nullable(_NUMBER), "reason": _nullable(_STRING),
            "files": _COUNT, "done": _COUNT, "failed": _COUNT,
            "file_statuses": {"type": "array", "items": _object(("path", "state"), {
                "path": _STRING, "state": _STRING, "status": _nullable(_INT), "attempts": _COUNT,
                "reason": _nullable(_STRING), "sop_instance_uid": _nullable(_STRING)})}}),
        "ExportRequest": _object(("destinations", "paths"), {
            "destinations": {**_NAMES, "description": "[[destination]] names"},
            "paths": {**_NAMES, "description": "files under the storage root"}}),
        "ExportsQueued": _object(("jobs",), {"jobs": {"type": "array", "items": {"type": ["integer", "string"]}}}),
        "StudyExportRequest": _object(("destinations",), {
            "destinations": {**_NAMES, "description": "[[destination]] names"}}),
        "StudyExportQueued": _object(("StudyInstanceUID", "files", "jobs"), {
            "StudyInstanceUID": _STRING, "files": _COUNT, "jobs": {"type": "array", "items": ref("ExportJob")}}),
        "Destination": _object(("name", "kind"), {
            "name": _STRING, "kind": _nullable({"enum": ["dimse", "dicomweb"]}), "ae_title": _nullable(_STRING),
            "host": _nullable(_STRING), "port": _nullable(_INT), "tls": _BOOL, "url": _nullable(_STRING)}),
        "EchoResult": _object(("destination", "ok", "rtt_ms", "reason"), {
            "destination": _STRING, "ok": _BOOL, "rtt_ms": _nullable(_NUMBER), "reason": _nullable(_STRING)}),
    }


def _held_schemas(payload_states, instance_states) -> dict:
    return {
        "Payload": _object(("id", "ae", "key", "state", "instances", "pipelines"), {
            "id": _STRING, "ae": _STRING, "key": _STRING, "state": {"enum": list(payload_states)},
            "created": _nullable(_NUMBER), "closed": _nullable(_NUMBER), "instances": _COUNT,
            "pipelines": {"type": "object", "additionalProperties": _object(("state", "attempts", "reason"), {
                "state": _STRING, "attempts": _COUNT, "reason": _nullable(_STRING)})}}),
        "PipelineJob": _object(("payload", "pipeline", "state", "attempts", "reason"), {
            "payload": _STRING, "pipeline": _STRING, "state": _STRING, "attempts": _COUNT,
            "reason": _nullable(_STRING)}),
        "StudySummary": _object(("StudyInstanceUID", "PatientID", "PatientName", "modalities", "series",
                                 "instances", "bytes", "first_received", "last_received", "ae_titles"), {
            "StudyInstanceUID": _STRING, "PatientID": _nullable(_STRING), "PatientName": _nullable(_STRING),
            "modalities": _STRINGS, "series": _COUNT, "instances": _COUNT, "bytes": _COUNT,
            "first_received": _nullable(_NUMBER), "last_received": _nullable(_NUMBER),
            "ae_titles": {**_STRINGS, "description": "the AE titles of ours that received it"}}),
        "Study": _object(("StudyInstanceUID", "PatientID", "PatientName", "instances", "bytes", "series",
                          "associations"), {
            "StudyInstanceUID": _STRING, "PatientID": _nullable(_STRING), "PatientName": _nullable(_STRING),
            "instances": _COUNT, "bytes": _COUNT,
            "series": {"type": "array", "items": ref("Series")},
            "associations": {"type": "array", "items": ref("IndexedAssociation")}}),
        "Series": _object(("SeriesInstanceUID", "Modality", "instances"), {
            "SeriesInstanceUID": _nullable(_STRING), "Modality": _nullable(_STRING),
            "instances": {"type": "array", "items": ref("Instance")}}),
        "Instance": _object(("SOPInstanceUID", "SOPClassUID", "TransferSyntaxUID", "path", "size", "digest",
                             "called_ae", "calling_ae", "peer", "association", "node", "received", "state",
                             "payload"), {
            "SOPInstanceUID": _nullable(_STRING), "SOPClassUID": _nullable(_STRING),
            "TransferSyntaxUID": _nullable(_STRING), "path": _nullable(_STRING), "size": _nullable(_COUNT),
            "digest": {**_nullable(_STRING), "description": "\"<algorithm>:<hex>\" of the file"},
            "called_ae": _nullable(_STRING), "calling_ae": _nullable(_STRING), "peer": _nullable(_STRING),
            "association": _nullable(_STRING),
            "node": {**_nullable(_STRING), "description": "the gateway node that received it, when there are "
                                                         "several; else null"},
            "received": _nullable(_NUMBER), "state": {"enum": list(instance_states)},
            "payload": _nullable(_STRING)}),
        "AssociationPage": page_of("Association"),
        "ExportJobPage": page_of("ExportJob"),
        "DestinationPage": page_of("Destination"),
        "PayloadPage": page_of("Payload"),
        "StudySummaryPage": page_of("StudySummary"),
        "IndexedAssociation": _object(("id", "calling_ae", "called_ae", "peer", "started", "ended", "state",
                                       "node"), {
            "id": _STRING, "calling_ae": _nullable(_STRING), "called_ae": _nullable(_STRING),
            "peer": _nullable(_STRING), "started": _nullable(_NUMBER), "ended": _nullable(_NUMBER),
            "state": _STRING, "node": _nullable(_STRING)}),
    }


_ERRORS = {400: "a query parameter, path parameter or body that is not valid (the message names it)",
           401: "no or a wrong bearer token (when [http] token_file is set)"}


def _response(description, schema, media="application/json"):
    out = {"description": description}
    if schema is not None:
        out["content"] = {m: {"schema": schema} for m in ((media,) if isinstance(media, str) else media)}
    return out


def operation(route) -> dict:
    op = {"operationId": route.handler, "summary": route.summary}
    if route.description:
        op["description"] = route.description
    params = []
    for name, param in route.path_params.items():
        params.append({"name": name, "in": "path", "required": True, "schema": param.schema,
                       **({"description": param.description} if param.description else {})})
    for name, param in route.params.items():
        params.append({"name": name, "in": "query", "required": False, "schema": param.schema,
                       **({"description": param.description} if param.description else {})})
    if params:
        op["parameters"] = params
    if route.body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(route.body)}}}
    responses = {}
    for status, (description, schema, *media) in route.responses.items():
        responses[str(status)] = _response(description, ref(schema) if isinstance(schema, str) else schema,
                                           *media)
    for status, description in _ERRORS.items():
        responses.setdefault(str(status), _response(description, ref("Error")))
    op["responses"] = dict(sorted(responses.items()))
    return op


def document(routes=None) -> dict:
    """The OpenAPI document of ``routes`` (default: the API's)."""
    from gateway.export.store import JOB_STATES
    from gateway.ops.routes import ROUTES
    from gateway.store.studies import HELD_STATES
    from gateway.workflow.payloads import PAYLOAD_STATES

    paths: dict = {}
    for route in routes if routes is not None else ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "dicomgw management API", "version": __version__,
                 "description": "JSON over HTTP on [listen] http. Every list answers {items, total, limit, "
                                "offset}; every route takes only the query parameters listed, and an unknown "
                                "one, one given twice or a value that does not fit is a 400 naming it. Errors "
                                "are {\"error\": \"...\"}. With [http] token_file set, every request needs "
                                "Authorization: Bearer <token>."},
        "paths": paths,
        "components": {
            "schemas": schemas(JOB_STATES, PAYLOAD_STATES, HELD_STATES),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "only when [http] token_file is set"}},
        },
        "security": [{}, {"bearer": []}],
    }


def text(routes=None) -> str:
    return json.dumps(document(routes), indent=1, sort_keys=False) + "\n"


def main(argv=None) -> int:
    with open(PATH, "w", encoding="utf-8") as f:
        f.write(text())
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
