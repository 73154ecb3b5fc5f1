"""MONAI Deploy's event bodies: built and parsed, without I/O.

The field names and their meaning follow MONAI Deploy's public message
definitions (``WorkflowRequestEvent``, ``ExportRequestEvent``,
``ExportCompleteEvent``, ``BlockStorageInfo``, ``DataOrigin``): snake_case
JSON fields, a ``trigger`` and ``data_origins`` of ``dataService`` /
``source`` / ``destination``, export statuses ``Success``,
``PartialFailure``, ``Failure`` and per-file statuses ``Success``,
``ConfigurationError``, ``UnsupportedDataType``, ``ServiceError``,
``DownloadError``, ``Unknown``.

Identifiers that a retry must repeat are derived, not drawn: a payload's
``payload_id`` and the ``message_id`` of its workflow request are UUIDs
made from the payload's own id (UUID version 5), so recording the request
twice (a close redone after a crash) yields the same message.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

#: The namespace of the UUIDs the gateway derives (a UUID of our own).
NAMESPACE = uuid.UUID("6f1c2f0e-3c1b-5d8a-9a41-2d5c0e7b9a10")

CONTENT_TYPE = "application/json"
PERSISTENT = 2  # AMQP delivery_mode: the broker keeps it on disk

SUCCESS, PARTIAL_FAILURE, FAILURE = "Success", "PartialFailure", "Failure"
FILE_SUCCESS = "Success"
CONFIGURATION_ERROR = "ConfigurationError"
UNSUPPORTED_DATA_TYPE = "UnsupportedDataType"
SERVICE_ERROR = "ServiceError"
DOWNLOAD_ERROR = "DownloadError"
UNKNOWN = "Unknown"

#: An export request's body is refused above this size, before parsing.
MAX_REQUEST_BYTES = 4 << 20
#: ... and its file list above this many entries.
MAX_FILES = 100_000
_MAX_TEXT = 1024  # ids and names


def derived_uuid(*parts: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "\x1f".join(parts)))


def iso_utc(t: float) -> str:
    """ISO-8601 in UTC with milliseconds and a ``Z``."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def relative_path(path: str, root: str) -> str:
    """``path`` relative to the storage root, with ``/`` separators."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return rel.replace(os.sep, "/")


@dataclass(frozen=True)
class Message:
    """One message to publish: its routing key, body and AMQP properties."""

    routing_key: str
    body: bytes
    message_id: str
    correlation_id: str
    type: str
    timestamp: float

    def properties(self, app_id: str) -> dict:
        """Keyword arguments for ``pika.BasicProperties``."""
        return {"content_type": CONTENT_TYPE, "delivery_mode": PERSISTENT, "message_id": self.message_id,
                "correlation_id": self.correlation_id, "app_id": app_id, "type": self.type,
                "timestamp": int(self.timestamp)}


def _dumps(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def workflow_request(payload: dict, instances: list[dict], associations: list[dict], *, root: str,
                     bucket: str, workflows, routing_key: str) -> Message:
    """The workflow request of a closed payload.

    ``payload``: its row (id, created); ``instances``: its instance rows
    (path, in order); ``associations``: its associations in the order they
    started (id, calling_ae, called_ae).  The correlation id is the first
    association's id; the trigger is that association's AE pair, and
    ``data_origins`` has one entry per distinct pair.
    """
    pid = payload["id"]
    origins = []
    for a in associations:
        origin = {"dataService": "DIMSE", "source": a["calling_ae"], "destination": a["called_ae"]}
        if origin not in origins:
            origins.append(origin)
    first = associations[0] if associations else {"id": pid, "calling_ae": "", "called_ae": payload.get("ae", "")}
    trigger = {"dataService": "DIMSE", "source": first["calling_ae"], "destination": first["called_ae"]}
    files = [{"path": relative_path(i["path"], root), "metadata": ""} for i in instances]
    body = {
        "payload_id": derived_uuid("payload", pid),
        "workflows": list(workflows),
        "file_count": len(files),
        "correlation_id": first["id"],
        "bucket": bucket,
        "trigger": trigger,
        "data_origins": origins,
        "timestamp": iso_utc(payload["created"]),
        "payload": files,
    }
    return Message(routing_key, _dumps(body), derived_uuid("workflow-request", pid), first["id"],
                   "WorkflowRequestEvent", payload["created"])


# ---- export requests in -----------------------------------------------------


class PoisonMessage(ValueError):
    """An export request that can never be carried out.

    ``task`` is the parsed request as far as it got (None when not even its
    export task id is known); ``file_statuses`` gives the files' statuses
    when the fault lies with some of them.
    """

    def __init__(self, reason: str, task: "ExportRequest | None" = None, file_statuses=None):
        super().__init__(reason)
        self.reason = reason
        self.task = task
        self.file_statuses = dict(file_statuses or {})


@dataclass(frozen=True)
class ExportRequest:
    workflow_instance_id: str
    export_task_id: str
    correlation_id: str
    files: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    message_id: str = ""

    @property
    def key(self) -> str:
        """What a redelivery or a resend of the same task has in common."""
        return self.export_task_id


def _text(body: dict, name: str, task=None) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise PoisonMessage(f"{name!r} is missing or not a non-empty string", task)
    if len(value) > _MAX_TEXT:
        raise PoisonMessage(f"{name!r} is longer than {_MAX_TEXT} characters", task)
    return value


def parse_export_request(body: bytes, message_id: str | None = None) -> ExportRequest:
    """Parse and check an export request; :class:`PoisonMessage` says why not."""
    if len(body) > MAX_REQUEST_BYTES:
        raise PoisonMessage(f"the body is {len(body)} bytes, over {MAX_REQUEST_BYTES}")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise PoisonMessage(f"the body is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise PoisonMessage("the body is not a JSON object")
    partial = None
    task_id = doc.get("export_task_id")
    if isinstance(task_id, str) and task_id.strip() and len(task_id) <= _MAX_TEXT:
        # Enough to answer with an export complete, whatever else is wrong.
        wid, cid = doc.get("workflow_instance_id"), doc.get("correlation_id")
        partial = ExportRequest(wid if isinstance(wid, str) and len(wid) <= _MAX_TEXT else "", task_id,
                                cid if isinstance(cid, str) and len(cid) <= _MAX_TEXT else "",
                                message_id=message_id or "")
    task_id = _text(doc, "export_task_id")
    workflow_instance_id = _text(doc, "workflow_instance_id", partial)
    correlation_id = _text(doc, "correlation_id", partial)
    lists = {}
    for name, limit in (("files", MAX_FILES), ("destinations", 64)):
        value = doc.get(name)
        if not isinstance(value, list) or not value:
            raise PoisonMessage(f"{name!r} is missing or not a non-empty list", partial)
        if len(value) > limit:
            raise PoisonMessage(f"{name!r} has {len(value)} entries, over {limit}", partial)
        if not all(isinstance(v, str) and v and len(v) <= 4096 and "\0" not in v for v in value):
            raise PoisonMessage(f"{name!r} must hold non-empty strings", partial)
        lists[name] = tuple(dict.fromkeys(value))
    partial = ExportRequest(workflow_instance_id, task_id, correlation_id, lists["files"],
                            lists["destinations"], message_id or "")
    return partial


def resolve_file(name: str, root: str) -> str | None:
    """The absolute path of a request's file, or None when it leaves the root.

    ``name`` is relative to the storage root (as in workflow requests);
    symbolic links are followed before the check.
    """
    real_root = os.path.realpath(root)
    normalized = posixpath.normpath(name.replace("\\", "/"))
    target = os.path.realpath(os.path.join(real_root, normalized))
    if os.path.commonpath([real_root, target]) != real_root or target == real_root:
        return None
    return target


# ---- export complete out ------------------------------------------------------


def file_status(state: str, reason: str | None) -> str:
    """The MONAI file status of one export file (state and reason as the
    export service records them)."""
    if state == "sent":
        return FILE_SUCCESS
    text = (reason or "").lower()
    if "no longer configured" in text:
        return CONFIGURATION_ERROR
    if text.startswith("cannot read"):
        if "no such file" in text or "errno" in text or "permission" in text:
            return DOWNLOAD_ERROR
        return UNSUPPORTED_DATA_TYPE  # not a Part 10 file, or a broken meta group
    if "not accepted" in text or "transfer syntax" in text or "abstract syntax" in text:
        return UNSUPPORTED_DATA_TYPE
    if state in ("failed", "retry"):
        return SERVICE_ERROR
    return UNKNOWN


def overall_status(statuses) -> str:
    statuses = list(statuses)
    ok = sum(1 for s in statuses if s == FILE_SUCCESS)
    if statuses and ok == len(statuses):
        return SUCCESS
    return PARTIAL_FAILURE if ok else FAILURE


def combine(per_destination: list[dict]) -> dict:
    """Per-file statuses over several destinations: a file is a success only
    where every destination has it; otherwise its first failure counts."""
    out: dict = {}
    for statuses in per_destination:
        for name, status in statuses.items():
            if out.get(name, FILE_SUCCESS) == FILE_SUCCESS:
                out[name] = status
    return out


@dataclass(frozen=True)
class ExportOutcome:
    status: str
    message: str
    file_statuses: dict = field(default_factory=dict)


def export_complete(request: ExportRequest, outcome: ExportOutcome, *, routing_key: str, now: float) -> Message:
    body = {
        "workflow_instance_id": request.workflow_instance_id,
        "export_task_id": request.export_task_id,
        "status": outcome.status,
        "message": outcome.message,
        "file_statuses": dict(outcome.file_statuses),
        "correlation_id": request.correlation_id,
    }
    return Message(routing_key, _dumps(body), derived_uuid("export-complete", request.key), request.correlation_id,
                   "ExportCompleteEvent", now)
