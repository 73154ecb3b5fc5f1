"""The query parameters of the management API: declared per route, checked, named in errors.

Each route says which parameters it takes and how each is read
(``{"limit": integer(1, 1000, 100), "state": one_of(STATES)}``);
:func:`parse_query` turns the request's arguments into those values, and
refuses, naming it, a parameter the route does not take, one given twice,
and one whose value does not fit.  Pure: no Twisted.
"""

from __future__ import annotations

from typing import Any, Callable

MAX_LIMIT = 1000


class QueryError(ValueError):
    """A query parameter that is unknown, repeated or not valid; ``str()`` names it."""


class Param:
    """How one parameter is read: ``check(text)`` returns its value or raises
    ValueError saying why not; ``default`` when it is absent."""

    def __init__(self, check: Callable[[str], Any], default: Any = None):
        self.check = check
        self.default = default


def integer(lo: int, hi: int, default: int | None = None) -> Param:
    def check(text):
        try:
            value = int(text)
        except ValueError:
            raise ValueError("must be an integer") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be from {lo} to {hi}")
        return value
    return Param(check, default)


def one_of(choices, default: str | None = None) -> Param:
    def check(text):
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text
    return Param(check, default)


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
