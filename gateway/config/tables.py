"""The repeated tables of the configuration file: ``[[ae]]``, ``[[source]]``,
``[[destination]]`` and ``[pipeline.NAME]``, one frozen class each.

Each item checks its own fields (``validate``); what refers to another table
(an AE title's pipelines and sources, a pipeline's export destinations) is
checked by :func:`gateway.config.cross_checks` once every table is read.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gateway.config.options import (
    LOCAL_AE,
    NAME,
    REMOTE_AE,
    Invalid,
    boolean,
    integer,
    network,
    number,
    one_of,
    option,
    strings,
    text,
    uids,
    with_token,
)

GROUPINGS = ("association", "patient", "study", "series")
_WEBHOOK = re.compile(r"^https?://[^\s/]+")


def _served_title(value):
    title = text(LOCAL_AE, "an AE title of 1 to 16 letters, digits, spaces or _-.", strip=" ")(value)
    if title in (".", "..") or not title:
        raise Invalid(f"{title!r} is not a usable AE title")
    return title


def _frozen_uids(value):
    return frozenset(uids(value))


def _nonempty_uids(value):
    found = uids(value)
    if not found:
        raise Invalid("must not be empty (leave it out to allow all)")
    return found


@dataclass(frozen=True)
class AETitle:
    """``[[ae]]``: an AE title we serve, its association policy and payloads."""

    title: str = option(check=_served_title, required=True)
    # Association policy (gateway.ingest.policy)
    tls_only: bool = option(False, boolean)
    sources: tuple[str, ...] | None = option(None, strings(REMOTE_AE, "an AE title", strip=" "))
    allowed_sop_classes: frozenset[str] | None = option(None, _frozen_uids)
    ignored_sop_classes: frozenset[str] = option(frozenset(), _frozen_uids)
    transfer_syntaxes: tuple[str, ...] | None = option(None, _nonempty_uids)
    # Payloads (gateway.workflow.payloads): how instances are grouped, the
    # seconds of quiet that close a group, the pipelines it goes to.
    grouping: str = option("study", one_of(GROUPINGS))
    timeout: float = option(5.0, number(0.01, 86400))
    pipelines: tuple[str, ...] = option((), strings())
    # Copied into each workflow request of its payloads ([messaging]).
    workflows: tuple[str, ...] = option((), strings())

    def validate(self, key):
        if self.allowed_sop_classes is not None and self.ignored_sop_classes:
            return [f"{key}: allowed_sop_classes and ignored_sop_classes cannot both be set"]
        return []


@dataclass(frozen=True)
class Source:
    """``[[source]]``: a calling AE title, optionally tied to a host or network."""

    ae_title: str = option(check=text(REMOTE_AE, "an AE title (1 to 16 characters, no backslash)", strip=" "),
                           required=True)
    host: ipaddress.IPv4Network | ipaddress.IPv6Network | None = option(None, network)


_DESTINATION_AE = text(REMOTE_AE, "an AE title of 1 to 16 characters of the DICOM default repertoire",
                       strip=" ", nonempty=True)


def _base_url(value):
    """A DICOMweb service's base URL (we POST to ``{url}/studies``), without a trailing "/"."""
    url = text(nonempty=True)(value)
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError for a port out of range
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment or parts.username is not None:
        raise Invalid(f"{url!r} is not an http:// or https:// base URL (no user, query or fragment)")
    return url.rstrip("/")


@dataclass(frozen=True)
class Destination:
    """``[[destination]]``: a Storage SCP we send to (``ae_title``, ``host``,
    ``port``), or a DICOMweb service we send to by STOW-RS (``dicomweb``)."""

    name: str = option(check=text(NAME, "a name of 1 to 64 letters, digits or _-."), required=True, reload=True)
    ae_title: str | None = option(None, _DESTINATION_AE, reload=True)
    host: str | None = option(None, text(nonempty=True), reload=True)
    port: int | None = option(None, integer(1, 65535), reload=True)
    tls: bool = option(False, boolean, reload=True)
    ca_certificates: str | None = option(None, text(), reload=True)
    certificate: str | None = option(None, text(), reload=True)
    private_key: str | None = option(None, text(), reload=True)
    dicomweb: str | None = option(None, _base_url, reload=True)  # a STOW-RS base URL instead of host/port
    token_file: str | None = option(None, text(), reload=True)  # dicomweb: "Authorization: Bearer" from it
    token: str = field(default="", repr=False)  # read from token_file

    @property
    def https(self) -> bool:
        return self.dicomweb is not None and self.dicomweb.startswith("https:")

    @property
    def server_host(self) -> str:
        """The host we connect to, whose certificate TLS verifies."""
        return self.host if self.dicomweb is None else urlsplit(self.dicomweb).hostname

    def validate(self, key):
        problems = []
        if self.dicomweb is None:
            problems += [f"{key}.{name}: required" for name, value in
                         (("ae_title", self.ae_title), ("host", self.host), ("port", self.port)) if value is None]
            if self.token_file is not None:
                problems.append(f"{key}.token_file: only a dicomweb destination takes a token_file")
        elif (self.ae_title, self.host, self.port) != (None, None, None) or self.tls:
            problems.append(f"{key}: ae_title, host, port and tls are for DIMSE destinations; a dicomweb "
                            "destination has its URL (https:// for TLS)")
        files = {"ca_certificates": self.ca_certificates, "certificate": self.certificate,
                 "private_key": self.private_key}
        if any(files.values()) and not (self.tls or self.https):
            problems.append(f"{key}: ca_certificates, certificate and private_key need "
                            + ("an https:// dicomweb URL" if self.dicomweb else "tls = true"))
        for name, path in files.items():
            if path is not None and not os.path.isfile(path):
                problems.append(f"{key}.{name}: {path!r} is not a readable file")
        if bool(self.certificate) != bool(self.private_key):
            problems.append(f"{key}: a client certificate needs both certificate and private_key")
        return problems

    def complete(self, key, problems):
        # A remote server's token: whatever it is, it is not ours to lengthen.
        return with_token(self, key, problems, minimum=1)


@dataclass(frozen=True)
class Pipeline:
    """``[pipeline.NAME]``: a command or a webhook a closed payload is handed to."""

    name: str = option(check=text(NAME), required=True)  # the NAME of the table
    command: tuple[str, ...] = option((), strings())
    webhook: str = option("", text())
    concurrency: int = option(1, integer(1, 256))
    timeout: float = option(3600.0, number(0.01, 7 * 86400))
    retries: int = option(3, integer(0, 1000))
    backoff: float = option(10.0, number(0, 86400))
    export: tuple[str, ...] = option((), strings())

    def validate(self, key):
        problems = []
        if bool(self.command) == bool(self.webhook):
            problems.append(f"{key}: needs exactly one of command or webhook")
        if self.webhook and not _WEBHOOK.match(self.webhook):
            problems.append(f"{key}.webhook: {self.webhook!r} is not an http:// or https:// URL")
        return problems

