"""The query parameters of the management API: declared per route, checked, named in errors.

Each route says which parameters it takes and how each is read
(``{"limit": integer(1, 1000, 100), "state": one_of(STATES)}``);
:func:`parse_query` turns the request's arguments into those values, and
refuses, naming it, a parameter the route does not take, one given twice,
and one whose value does not fit.  Each kind of parameter also says what it
takes as a JSON Schema (``Param.schema``), which the OpenAPI document
publishes (:mod:`gateway.ops.openapi`): the check and its description are
made together, so they cannot disagree.  Pure: no Twisted.
"""

from __future__ import annotations

import datetime
import re
from typing import Any, Callable

MAX_LIMIT = 1000


class QueryError(ValueError):
    """A query parameter that is unknown, repeated or not valid; ``str()`` names it."""


class Param:
    """How one parameter is read: ``check(text)`` returns its value or raises
    ValueError saying why not; ``default`` when it is absent; ``schema``
    the JSON Schema of the text it takes; ``description`` for the document."""

    def __init__(self, check: Callable[[str], Any], default: Any = None, schema: dict | None = None,
                 description: str = ""):
        self.check = check
        self.default = default
        self.schema = dict(schema or {"type": "string"})
        if default is not None:
            self.schema["default"] = default
        self.description = description

    def describe(self, description: str) -> "Param":
        return Param(self.check, self.default, {k: v for k, v in self.schema.items() if k != "default"},
                     description)


_INTEGER = re.compile(r"^-?[0-9]+$")


def integer(lo: int, hi: int, default: int | None = None) -> Param:
    def check(text):
        if not _INTEGER.match(text):
            raise ValueError("must be an integer")
        value = int(text)
        if not lo <= value <= hi:
            raise ValueError(f"must be from {lo} to {hi}")
        return value
    return Param(check, default, {"type": "integer", "minimum": lo, "maximum": hi})


def one_of(choices, default: str | None = None) -> Param:
    def check(text):
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text
    return Param(check, default, {"type": "string", "enum": list(choices)})


def text(pattern: str, what: str, max_length: int) -> Param:
    """A string matching ``pattern`` (a regular expression, anchored), of at
    most ``max_length`` characters."""
    compiled = re.compile(pattern)

    def check(value):
        if len(value) > max_length:
            raise ValueError(f"is longer than {max_length} characters")
        if not compiled.fullmatch(value):
            raise ValueError(f"is not {what}")
        return value
    return Param(check, None, {"type": "string", "pattern": f"^{pattern}$", "maxLength": max_length})


#: A DICOM UID: digits and dots, at most 64 characters (PS3.5 9.1).
UID_PATTERN = r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*"
#: An AE title as a peer may send it (PS3.5 AE: no backslash, no control characters).
AE_PATTERN = r"[\x20-\x5b\x5d-\x7e]{1,16}"
#: A DICOM LO value such as a Patient ID (no backslash, no control characters).
LO_PATTERN = r"[^\\\x00-\x1f\x7f]{1,64}"

_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})")


def date_time() -> Param:
    """An RFC 3339 date-time (``2026-12-04T18:00:00Z``), as seconds since the epoch."""
    def check(value):
        if not _DATE_TIME.fullmatch(value):
            raise ValueError("is not an RFC 3339 date-time such as 2026-12-04T18:00:00Z")
        try:
            when = datetime.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
            return when.timestamp()
        except (ValueError, OverflowError) as e:
            raise ValueError(f"is not a valid date-time: {e}") from None
    return Param(check, None, {"type": "string", "format": "date-time"})


#: limit and offset, as every list takes them.
PAGING = {"limit": integer(1, MAX_LIMIT, 100), "offset": integer(0, 10 ** 9, 0)}


def parse_query(args: dict[bytes, list[bytes]], spec: dict[str, Param]) -> dict[str, Any]:
    """The values of the parameters ``spec`` declares, from a request's ``args``."""
    given = {}
    for raw, values in args.items():
        name = raw.decode("utf-8", "replace")
        if name not in spec:
            allowed = ", ".join(sorted(spec)) or "none"
            raise QueryError(f"unknown query parameter {name!r} (allowed: {allowed})")
        if len(values) != 1:
            raise QueryError(f"query parameter {name!r} is given {len(values)} times")
        given[name] = values[0].decode("utf-8", "replace")
    out = {}
    for name, param in spec.items():
        if name not in given:
            out[name] = param.default
            continue
        try:
            out[name] = param.check(given[name])
        except ValueError as e:
            raise QueryError(f"query parameter {name!r}: {given[name]!r} {e}") from None
    return out
