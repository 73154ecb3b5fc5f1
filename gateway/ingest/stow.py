"""DICOMweb STOW-RS (PS3.18 section 10.5): routing, media types, outcomes, the answer.

Pure: no Twisted in it.  :mod:`gateway.ingest.stow_receiver` parses a body
into :class:`PartOutcome` records, :mod:`gateway.ingest.stow_web` carries the
requests; this module says what a request names and what its answer is.

- :func:`route` maps ``POST /dicomweb/studies[/{StudyInstanceUID}]`` and
  ``POST /dicomweb/vae/{AE}/studies[/{StudyInstanceUID}]`` to an AE title
  and an optional study.
- :func:`check_media_type` takes ``multipart/related;
  type="application/dicom"; boundary=...`` apart.
- :class:`StowResult` is a request's outcome and HTTP status, and
  :func:`store_response` its ``application/dicom+json`` Store Instances
  Response (PS3.18 section 10.5.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

from gateway.dimse import status as C
from gateway.dimse.sop import is_valid_uid

PREFIX = "/dicomweb"
MAX_BOUNDARY = 200

# Failure Reason (0008,1197) values: the codes of PS3.4 Annex B, as a
# C-STORE answers them (PS3.18 section 10.5.3 lists them for STOW-RS).
PROCESSING_FAILURE = C.PROCESSING_FAILURE
SOP_CLASS_NOT_SUPPORTED = C.SOP_CLASS_NOT_SUPPORTED
OUT_OF_RESOURCES = C.OUT_OF_RESOURCES
CANNOT_UNDERSTAND = C.CANNOT_UNDERSTAND
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
# An instance of another study than the one the request names.  PS3.18 has
# no code of its own for it; this one is in the Cxxx "cannot understand"
# range (dcm4chee-arc answers the same).
STUDY_MISMATCH = 0xC409


class Refusal(Exception):
    """The request is answered with ``status`` and nothing of it is stored."""

    def __init__(self, status: int, why: str, headers: dict | None = None):
        super().__init__(why)
        self.status = status
        self.why = why
        self.headers = headers or {}


@dataclass(frozen=True)
class Route:
    ae: str  # "" for plain /dicomweb/studies: the [dicomweb] ae
    study_uid: str | None
    prefix: str  # the path before /studies, for the Retrieve URLs


def route(path: bytes) -> Route:
    """The STOW-RS resource a request path names; :class:`Refusal` (404, 400) if none."""
    text = path.split(b"?", 1)[0].decode("latin-1")
    if len(text) > 1 and text.endswith("/"):
        text = text[:-1]
    segments = [unquote(s) for s in text.split("/")]
    if segments[:2] != ["", "dicomweb"]:
        raise Refusal(404, "no such resource: STOW-RS is POST /dicomweb/studies or /dicomweb/vae/{AE}/studies")
    rest = segments[2:]
    ae = ""
    prefix = PREFIX
    if rest[:1] == ["vae"]:
        if len(rest) < 3 or not rest[1]:
            raise Refusal(404, "no such resource: /dicomweb/vae/{AE}/studies")
        ae = rest[1]
        prefix = f"{PREFIX}/vae/{quote(ae, safe='')}"
        rest = rest[2:]
    if not rest or rest[0] != "studies" or len(rest) > 2:
        raise Refusal(404, "no such resource: STOW-RS is POST .../studies[/{StudyInstanceUID}]")
    study = rest[1] if len(rest) == 2 else None
    if study is not None and not is_valid_uid(study):
        raise Refusal(400, f"not a Study Instance UID: {study[:80]!r}")
    return Route(ae, study, prefix)


def check_media_type(value: bytes | None) -> bytes:
    """The multipart boundary of a STOW-RS body's Content-Type.

    ``multipart/related`` whose ``type`` is ``application/dicom`` (or absent);
    anything else is :class:`Refusal` 415, a missing boundary 400.
    """
    from python_multipart.multipart import parse_options_header

    if not value:
        raise Refusal(415, 'a STOW-RS body is multipart/related; type="application/dicom"')
    kind, options = parse_options_header(value)
    if kind != b"multipart/related":
        raise Refusal(415, f'{kind.decode("latin-1")[:80]!r} is not multipart/related; type="application/dicom"')
    part_type = options.get(b"type", b"application/dicom").strip().lower()
    if part_type != b"application/dicom":
        raise Refusal(415, f"parts of type {part_type.decode('latin-1')[:80]!r} are not supported: "
                           "only application/dicom (Part 10 instances)")
    boundary = options.get(b"boundary", b"")
    # RFC 2046 allows 70 characters; Orthanc's STOW-RS client sends 73.
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise Refusal(400, f"the Content-Type has no usable multipart boundary (1 to {MAX_BOUNDARY} characters)")
    return boundary


@dataclass
class PartOutcome:
    """What became of one part."""

    index: int  # 1-based, in the order of the body
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    failure: int | None = None  # Failure Reason; None once stored (or ignored)
    reason: str = ""
    ignored: bool = False  # an ignored SOP class: answered as stored, not stored
    stored: bool = False
    not_part10: bool = False
    bytes: int = 0  # data set bytes stored

    @property
    def ok(self) -> bool:
        return self.stored or self.ignored


@dataclass
class StowResult:
    outcomes: list[PartOutcome]
    error: Refusal | None = None  # the body as a whole was bad (400, 413) or could not be recorded

    @property
    def status(self) -> int:
        """The HTTP status of the answer (PS3.18 section 10.5.3)."""
        if self.error is not None:
            return self.error.status
        if not self.outcomes:
            return 400
        if any(o.not_part10 for o in self.outcomes):
            return 400
        ok = sum(1 for o in self.outcomes if o.ok)
        if ok == len(self.outcomes):
            return 200
        return 202 if ok else 409


def _uid(value: str) -> dict:
    return {"vr": "UI", "Value": [value]}


def store_response(result: StowResult, base_url: str) -> dict:
    """The Store Instances Response (PS3.18 section 10.5.3) as DICOM JSON.

    ``base_url`` is the request's own ``.../studies`` parent (scheme, host,
    prefix), which the Retrieve URLs are built on.
    """
    body: dict = {}
    referenced, failed = [], []
    studies = set()
    for o in result.outcomes:
        if o.ok:
            item = {"00081150": _uid(o.sop_class_uid), "00081155": _uid(o.sop_instance_uid)}
            if o.study_uid and o.series_uid:
                item["00081190"] = {"vr": "UR", "Value": [
                    f"{base_url}/studies/{o.study_uid}/series/{o.series_uid}/instances/{o.sop_instance_uid}"]}
            referenced.append(item)
            studies.add(o.study_uid)
        else:
            item = {"00081197": {"vr": "US", "Value": [o.failure if o.failure is not None else PROCESSING_FAILURE]}}
            if o.sop_class_uid:
                item["00081150"] = _uid(o.sop_class_uid)
            if o.sop_instance_uid:
                item["00081155"] = _uid(o.sop_instance_uid)
            failed.append(item)
    if len(studies) == 1 and "" not in studies:
        body["00081190"] = {"vr": "UR", "Value": [f"{base_url}/studies/{studies.pop()}"]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    return body
