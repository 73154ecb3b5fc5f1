"""The gateway's configuration: one validated, immutable object parsed from TOML.

``load_config(path)`` reads a file, ``config_from_string(text)`` a string (for
tests).  Unknown keys and bad values are rejected with :class:`ConfigError`,
which lists every problem found, each naming its key (``timeouts.artim``,
``ae[2].title``) and the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from gateway import IMPLEMENTATION_VERSION_NAME

DEFAULT_CONFIG_PATH = "etc/dicomgw.toml"

# PS3.5 Table 6.2-1, AE: default character repertoire, no backslash, no
# control characters.  We are stricter for AE titles we *serve*, because
# they name directories: letters, digits, space, and "_-." only.
_LOCAL_AE = re.compile(r"^[A-Za-z0-9_.\- ]{1,16}$")
# Implementation Version Name is SH: 1..16 characters of the default repertoire.
_VERSION_NAME = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class ConfigError(ValueError):
    """The configuration is not valid; ``problems`` lists each one."""

    def __init__(self, problems: list[str], source: str = "<string>"):
        self.problems = list(problems)
        self.source = source
        text = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration in {source}:\n{text}")


@dataclass(frozen=True)
class AETitle:
    title: str
    # Association policy (see gateway.ingest.policy).
    tls_only: bool = False
    sources: tuple[str, ...] | None = None  # calling AE titles from [[source]]
    allowed_sop_classes: frozenset[str] | None = None
    ignored_sop_classes: frozenset[str] = frozenset()
    transfer_syntaxes: tuple[str, ...] | None = None
    # Payloads (see gateway.workflow.payloads): how instances are grouped,
    # seconds of quiet that close a group, and the pipelines it goes to.
    grouping: str = "study"
    timeout: float = 5.0
    pipelines: tuple[str, ...] = ()


GROUPINGS = ("association", "patient", "study", "series")


@dataclass(frozen=True)
class Pipeline:
    """``[pipeline.NAME]``: a command or a webhook a closed payload is handed to."""

    name: str
    command: tuple[str, ...] = ()
    webhook: str = ""
    concurrency: int = 1
    timeout: float = 3600.0
    retries: int = 3
    backoff: float = 10.0
    export: tuple[str, ...] = ()


@dataclass(frozen=True)
class Source:
    """A [[source]]: a calling AE title, optionally tied to a host or network."""

    ae_title: str
    host: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None


TLS_PROFILES = ("bcp195", "bcp195-nd", "bcp195-ex")


@dataclass(frozen=True)
class TLSConfig:
    certificate: str = "etc/tls/server.pem"
    private_key: str = "etc/tls/server.key"
    ca_certificates: str = "etc/tls/ca.pem"
    require_client_certificate: bool = True
    profile: str = "bcp195-nd"


@dataclass(frozen=True)
class SCUSettings:
    """``[scu]``: how the gateway calls out (export, echo)."""

    ae_title: str = "DICOMGW"
    max_associations: int = 2
    retries: int = 3
    retry_delay: float = 30.0
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class Destination:
    """One ``[[destination]]``: a Storage SCP we send to."""

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False
    ca_certificates: str | None = None
    certificate: str | None = None
    private_key: str | None = None


@dataclass(frozen=True)
class Config:
    storage: str = "var/dicomgw"
    max_pdu_length: int = 131072
    implementation_version_name: str = IMPLEMENTATION_VERSION_NAME
    listen_dicom: str = "tcp:11112"
    artim: float = 30.0
    dimse: float = 60.0
    fsync: bool = True
    # Association policy, the TLS port, the storage watermark (issue 3).
    listen_dicom_tls: str | None = None
    tls: TLSConfig = field(default_factory=TLSConfig)
    reject_unknown_sources: bool = False
    max_associations: int = 25
    sources: tuple[Source, ...] = ()
    watermark_percent: float = 75.0
    reserved_gb: float = 5.0
    check_interval: float = 10.0
    pdu_timeout: float = 60.0
    ae_titles: tuple[AETitle, ...] = field(default_factory=lambda: (AETitle("DICOMGW"),))
    source: str = "<string>"
    # Operations (issue 6): the management API and the audit trail.
    listen_http: str = ""  # "" = no management API
    http_token_file: str = ""
    http_token: str = field(default="", repr=False)
    audit_log: str = "audit.jsonl"  # relative to the storage root; "" = off
    scu: SCUSettings = field(default_factory=SCUSettings)
    destinations: tuple[Destination, ...] = ()

    # Payloads, pipelines and the reclaimer (issue 4).
    pipelines: tuple[Pipeline, ...] = ()
    retention: float = 0.0
    aborted_retention: float = 0.0
    reclaim_interval: float = 60.0
    observers: tuple[str, ...] = ()

    def destination(self, name: str) -> Destination | None:
        for d in self.destinations:
            if d.name == name:
                return d
        return None

    def pipeline(self, name: str) -> Pipeline | None:
        for p in self.pipelines:
            if p.name == name:
                return p
        return None

    def ae(self, title: str) -> AETitle | None:
        for ae in self.ae_titles:
            if ae.title == title:
                return ae
        return None


class _Reader:
    """Takes values out of one table, recording problems by dotted key."""

    def __init__(self, table: dict, prefix: str, problems: list[str]):
        self.table = dict(table)
        self.prefix = prefix
        self.problems = problems

    def _key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def _take(self, name, default, types, what):
        if name not in self.table:
            return default
        value = self.table.pop(name)
        # bool is an int in Python; never accept it where a number is wanted.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            self.problems.append(f"{self._key(name)}: expected {what}, got {value!r}")
            return default
        return value

    def string(self, name, default=None, pattern=None, what="a string"):
        value = self._take(name, default, (str,), what)
        if value is not default and pattern is not None and not pattern.match(value):
            self.problems.append(f"{self._key(name)}: {value!r} is not {what}")
            return default
        return value

    def boolean(self, name, default):
        return self._take(name, default, (bool,), "true or false")

    def integer(self, name, default, lo, hi):
        value = self._take(name, default, (int,), f"an integer from {lo} to {hi}")
        if value is not default and not lo <= value <= hi:
            self.problems.append(f"{self._key(name)}: {value} is out of range {lo}..{hi}")
            return default
        return value

    def number(self, name, default, lo, hi):
        value = self._take(name, default, (int, float), f"a number from {lo} to {hi}")
        if value is not default and not lo <= value <= hi:
            self.problems.append(f"{self._key(name)}: {value} is out of range {lo}..{hi}")
            return default
        return float(value)

    def strings(self, name, pattern=None, what="a string"):
        """A list of strings, or None when the key is absent."""
        if name not in self.table:
            return None
        value = self.table.pop(name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problems.append(f"{self._key(name)}: expected a list of strings, got {value!r}")
            return None
        bad = [v for v in value if pattern is not None and not pattern.match(v)]
        if bad:
            self.problems.append(f"{self._key(name)}: {bad[0]!r} is not {what}")
            return None
        return value

    def string_tuple(self, name, default=()):
        value = self._take(name, None, (list,), "an array of strings")
        if value is None:
            return tuple(default)
        if not all(isinstance(v, str) and v for v in value):
            self.problems.append(f"{self._key(name)}: expected an array of non-empty strings, got {value!r}")
            return tuple(default)
        return tuple(value)

    def done(self):
        for name in sorted(self.table):
            self.problems.append(f"{self._key(name)}: unknown key")


def _section(doc: dict, name: str, problems: list[str]) -> _Reader:
    value = doc.pop(name, {})
    if not isinstance(value, dict):
        problems.append(f"{name}: expected a table [{name}]")
        value = {}
    return _Reader(value, name, problems)


def parse_config(doc: dict[str, Any], source: str = "<string>") -> Config:
    problems: list[str] = []
    doc = dict(doc)
    defaults = Config()

    g = _section(doc, "gateway", problems)
    storage = g.string("storage", defaults.storage)
    if not storage:
        problems.append("gateway.storage: must not be empty")
    max_pdu = g.integer("max_pdu_length", defaults.max_pdu_length, 0, 16 << 20)
    if 0 < max_pdu < 4096:
        problems.append(f"gateway.max_pdu_length: {max_pdu} is below 4096 (use 0 for no limit)")
    version = g.string(
        "implementation_version_name",
        defaults.implementation_version_name,
        _VERSION_NAME,
        "1 to 16 characters of the DICOM default repertoire",
    )
    audit_log = g.string("audit_log", defaults.audit_log)
    reject_unknown = g.boolean("reject_unknown_sources", defaults.reject_unknown_sources)
    max_associations = g.integer("max_associations", defaults.max_associations, 1, 1000)
    g.done()

    lst = _section(doc, "listen", problems)
    dicom = lst.string("dicom", defaults.listen_dicom)
    http = lst.string("http", defaults.listen_http)
    dicom_tls = lst.string("dicom_tls", None)
    if dicom_tls is not None and not dicom_tls.strip():
        problems.append("listen.dicom_tls: must not be empty (leave the key out for no TLS port)")
    lst.done()
    token_file, token = _parse_http(doc, http, problems, source)
    _check_endpoint("listen.dicom", dicom, problems)
    _check_endpoint("listen.http", http, problems)
    _check_endpoint("listen.dicom_tls", dicom_tls or "", problems)

    tls = _tls_section(doc, problems)

    t = _section(doc, "timeouts", problems)
    artim = t.number("artim", defaults.artim, 1, 3600)
    dimse = t.number("dimse", defaults.dimse, 1, 86400)
    pdu_timeout = t.number("pdu", defaults.pdu_timeout, 1, 86400)
    t.done()

    s = _section(doc, "storage", problems)
    fsync = s.boolean("fsync", defaults.fsync)
    watermark = s.number("watermark_percent", defaults.watermark_percent, 1, 100)
    reserved = s.number("reserved_gb", defaults.reserved_gb, 0, 1 << 20)
    check_interval = s.number("check_interval", defaults.check_interval, 0.1, 3600)
    retention = s.number("retention", defaults.retention, 0, 365 * 86400)
    aborted_retention = s.number("aborted_retention", defaults.aborted_retention, 0, 365 * 86400)
    s.done()

    rc = _section(doc, "reclaimer", problems)
    reclaim_interval = rc.number("interval", defaults.reclaim_interval, 0.1, 86400)
    rc.done()

    nt = _section(doc, "notify", problems)
    observers = nt.string_tuple("observers")
    for i, name in enumerate(observers):
        if not _DOTTED.match(name):
            problems.append(f"notify.observers[{i}]: {name!r} is not a dotted Python name")
    nt.done()

    pipelines = _pipelines(doc, problems)

    sources = _sources(doc, problems)

    raw_aes = doc.pop("ae", None)
    aes: list[AETitle] = []
    if raw_aes is None:
        problems.append("ae: at least one [[ae]] table is required")
    elif not isinstance(raw_aes, list):
        problems.append("ae: expected an array of tables [[ae]]")
    else:
        seen = set()
        for i, raw in enumerate(raw_aes):
            r = _Reader(raw if isinstance(raw, dict) else {}, f"ae[{i}]", problems)
            title = r.string(
                "title", None, _LOCAL_AE,
                "an AE title of 1 to 16 letters, digits, spaces or _-.",
            )
            grouping = r.string("grouping", "study")
            if grouping not in GROUPINGS:
                problems.append(f"ae[{i}].grouping: {grouping!r} is not one of {', '.join(GROUPINGS)}")
            timeout = r.number("timeout", 5.0, 0.01, 86400)
            names = r.string_tuple("pipelines")
            for name in names:
                if name not in pipelines:
                    problems.append(f"ae[{i}].pipelines: no [pipeline.{name}] table")
            policy = _ae_policy(r, i, sources, problems)
            r.done()
            if title is None:
                if not any(p.startswith(f"ae[{i}].title") for p in problems):
                    problems.append(f"ae[{i}].title: required")
                continue
            title = title.strip(" ")
            if title in (".", "..") or not title:
                problems.append(f"ae[{i}].title: {title!r} is not a usable AE title")
                continue
            if title in seen:
                problems.append(f"ae[{i}].title: {title!r} is configured twice")
                continue
            seen.add(title)
            aes.append(AETitle(title, grouping=grouping, timeout=timeout, pipelines=names, **policy))

    if dicom_tls is None:
        for i, ae in enumerate(aes):
            if ae.tls_only:
                problems.append(f"ae[{i}].tls_only: {ae.title!r} is TLS-only but listen.dicom_tls is not set")

    scu = _parse_scu(doc, problems)
    destinations = _parse_destinations(doc, problems)
    for i, d in enumerate(destinations):
        if bool(d.certificate) != bool(d.private_key):
            problems.append(f"destination[{i}]: a client certificate needs both certificate and private_key")
    known = {d.name for d in destinations}
    for pipeline in pipelines.values():
        for name in pipeline.export:
            if name not in known:
                problems.append(f"pipeline.{pipeline.name}.export: no [[destination]] named {name!r}")

    for name in sorted(doc):
        problems.append(f"{name}: unknown section")

    if problems:
        raise ConfigError(problems, source)
    return Config(
        storage=storage,
        max_pdu_length=max_pdu,
        implementation_version_name=version,
        listen_dicom=dicom,
        artim=artim,
        dimse=dimse,
        fsync=fsync,
        ae_titles=tuple(aes),
        source=source,
        scu=scu,
        destinations=destinations,
        pipelines=tuple(pipelines.values()),
        retention=retention,
        aborted_retention=aborted_retention,
        reclaim_interval=reclaim_interval,
        observers=observers,
        listen_http=http,
        http_token_file=token_file,
        http_token=token,
        audit_log=audit_log,
        listen_dicom_tls=dicom_tls,
        tls=tls,
        reject_unknown_sources=reject_unknown,
        max_associations=max_associations,
        sources=sources,
        watermark_percent=watermark,
        reserved_gb=reserved,
        check_interval=check_interval,
        pdu_timeout=pdu_timeout,
    )


def _check_endpoint(key: str, description: str, problems: list[str]) -> None:
    """Parse a server endpoint description the way the daemon will (nothing
    is bound).  ``systemd:`` ones are checked for form only: the inherited
    sockets exist only under systemd."""
    if not description:
        return
    parts = re.split(r"(?<!\\):", description)
    if parts[0] == "systemd":
        args = dict(p.partition("=")[::2] for p in parts[1:])
        wrong = sorted(set(args) - {"domain", "index", "name"})
        if wrong or args.get("domain") not in ("INET", "INET6", "UNIX") \
                or ("name" in args) == ("index" in args) \
                or ("index" in args and not args["index"].isdigit()):
            problems.append(f"{key}: {description!r} is not a valid systemd endpoint "
                            "(systemd:domain=INET|INET6|UNIX:name=NAME, or index=N instead of name)")
        return
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(object(), description)
    except Exception as e:  # ValueError, TypeError, KeyError, OSError: all say why
        problems.append(f"{key}: {description!r} is not a valid endpoint description: {e}")


def _http_is_loopback(description: str) -> bool:
    """True when a server endpoint description listens on loopback only."""
    import ipaddress

    # Endpoint descriptions escape ":" as "\\:" (IPv6 addresses).
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    kind = parts[0].strip().lower()
    if kind == "unix":
        return True  # a filesystem socket: its permissions protect it
    if kind not in ("tcp", "tcp6"):
        return False  # systemd:, ssl:, ...: we cannot tell, so assume not
    for part in parts[2:]:
        if part.startswith("interface="):
            try:
                return ipaddress.ip_address(part[len("interface="):]).is_loopback
            except ValueError:
                return False
    return False  # no interface: every address


def _parse_http(doc: dict, listen_http: str, problems: list[str], source: str) -> tuple[str, str]:
    """The [http] section: the bearer token for the management API."""
    h = _section(doc, "http", problems)
    token_file = h.string("token_file", "")
    h.done()
    token = ""
    if token_file:
        path = token_file
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"http.token_file: cannot read {path!r}: {getattr(e, 'strerror', None) or e}")
        else:
            if len(token) < 16:
                problems.append(f"http.token_file: the token in {path!r} is shorter than 16 characters")
    if listen_http and not token_file and not _http_is_loopback(listen_http):
        problems.append(f"listen.http: {listen_http!r} is not loopback-only; "
                        "set http.token_file to require a bearer token")
    return token_file, token


_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_PIPELINE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def _pipelines(doc: dict, problems: list[str]) -> dict[str, Pipeline]:
    """``[pipeline.NAME]`` tables: each has a ``command`` or a ``webhook``."""
    raw = doc.pop("pipeline", {})
    if not isinstance(raw, dict):
        problems.append("pipeline: expected tables [pipeline.NAME]")
        return {}
    result = {}
    for name, table in raw.items():
        key = f"pipeline.{name}"
        if not _PIPELINE_NAME.match(name):
            problems.append(f"{key}: the name must be 1..64 letters, digits or _-.")
            continue
        if not isinstance(table, dict):
            problems.append(f"{key}: expected a table")
            continue
        r = _Reader(table, key, problems)
        command = r.string_tuple("command")
        webhook = r.string("webhook", "")
        concurrency = r.integer("concurrency", 1, 1, 256)
        timeout = r.number("timeout", 3600.0, 0.01, 7 * 86400)
        retries = r.integer("retries", 3, 0, 1000)
        backoff = r.number("backoff", 10.0, 0, 86400)
        export = r.string_tuple("export")
        r.done()
        if bool(command) == bool(webhook):
            problems.append(f"{key}: needs exactly one of command or webhook")
        if webhook and not re.match(r"^https?://[^\s/]+", webhook):
            problems.append(f"{key}.webhook: {webhook!r} is not an http:// or https:// URL")
        result[name] = Pipeline(name, command, webhook, concurrency, timeout, retries, backoff, export)
    return result


# UIDs in configuration: digits and dots, at most 64 characters.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# A calling AE title as a peer sends it: PS3.5 default repertoire, no backslash.
_REMOTE_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _uids(r: _Reader, name: str):
    values = r.strings(name, _UID, "a UID (digits and dots)")
    if values is not None and any(len(v) > 64 for v in values):
        r.problems.append(f"{r._key(name)}: a UID is at most 64 characters")
        return None
    return values


def _tls_section(doc: dict, problems: list[str]) -> TLSConfig:
    d = TLSConfig()
    t = _section(doc, "tls", problems)
    tls = TLSConfig(
        certificate=t.string("certificate", d.certificate),
        private_key=t.string("private_key", d.private_key),
        ca_certificates=t.string("ca_certificates", d.ca_certificates),
        require_client_certificate=t.boolean("require_client_certificate", d.require_client_certificate),
        profile=t.string("profile", d.profile),
    )
    t.done()
    if tls.profile not in TLS_PROFILES:
        problems.append(f"tls.profile: {tls.profile!r} is not one of {', '.join(TLS_PROFILES)}")
    for key in ("certificate", "private_key", "ca_certificates"):
        if not getattr(tls, key):
            problems.append(f"tls.{key}: must not be empty")
    return tls


def _sources(doc: dict, problems: list[str]) -> tuple[Source, ...]:
    raw = doc.pop("source", [])
    if not isinstance(raw, list):
        problems.append("source: expected an array of tables [[source]]")
        return ()
    out = []
    for i, table in enumerate(raw):
        r = _Reader(table if isinstance(table, dict) else {}, f"source[{i}]", problems)
        ae = r.string("ae_title", None, _REMOTE_AE, "an AE title (1 to 16 characters, no backslash)")
        host = r.string("host", None)
        r.done()
        if ae is None:
            if not any(p.startswith(f"source[{i}].ae_title") for p in problems):
                problems.append(f"source[{i}].ae_title: required")
            continue
        network = None
        if host is not None:
            try:
                network = ipaddress.ip_network(host, strict=False)
            except ValueError:
                problems.append(f"source[{i}].host: {host!r} is not an IP address or CIDR network")
                continue
        out.append(Source(ae.strip(" "), network))
    return tuple(out)


def _ae_policy(r: _Reader, i: int, sources, problems: list[str]) -> dict:
    policy: dict = {"tls_only": r.boolean("tls_only", False)}
    names = r.strings("sources", _REMOTE_AE, "an AE title")
    if names is not None:
        known = {s.ae_title for s in sources}
        unknown = [n for n in names if n.strip(" ") not in known]
        if unknown:
            problems.append(f"ae[{i}].sources: {unknown[0]!r} is not the ae_title of any [[source]]")
        policy["sources"] = tuple(n.strip(" ") for n in names)
    allowed = _uids(r, "allowed_sop_classes")
    ignored = _uids(r, "ignored_sop_classes")
    if allowed is not None and ignored is not None:
        problems.append(f"ae[{i}]: allowed_sop_classes and ignored_sop_classes cannot both be set")
    if allowed is not None:
        policy["allowed_sop_classes"] = frozenset(allowed)
    if ignored is not None:
        policy["ignored_sop_classes"] = frozenset(ignored)
    syntaxes = _uids(r, "transfer_syntaxes")
    if syntaxes is not None:
        if not syntaxes:
            problems.append(f"ae[{i}].transfer_syntaxes: must not be empty (leave it out to allow all)")
        policy["transfer_syntaxes"] = tuple(syntaxes)
    return policy


# ---- the SCU side: [scu] and [[destination]] ------------------------------

_DESTINATION_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def _parse_scu(doc: dict, problems: list[str]) -> SCUSettings:
    d = SCUSettings()
    r = _section(doc, "scu", problems)
    ae_title = r.string("ae_title", d.ae_title, _REMOTE_AE, "an AE title of 1 to 16 characters of the DICOM default repertoire")
    if not ae_title.strip(" "):
        problems.append("scu.ae_title: must not be blank")
    settings = SCUSettings(
        ae_title=ae_title.strip(" ") or d.ae_title,
        max_associations=r.integer("max_associations", d.max_associations, 1, 100),
        retries=r.integer("retries", d.retries, 0, 100),
        retry_delay=r.number("retry_delay", d.retry_delay, 0, 86400),
        connect_timeout=r.number("connect_timeout", d.connect_timeout, 0.1, 3600),
    )
    r.done()
    return settings


def _parse_destinations(doc: dict, problems: list[str]) -> tuple[Destination, ...]:
    raw = doc.pop("destination", [])
    if not isinstance(raw, list):
        problems.append("destination: expected an array of tables [[destination]]")
        return ()
    out: list[Destination] = []
    seen: set[str] = set()
    for i, table in enumerate(raw):
        key = f"destination[{i}]"
        r = _Reader(table if isinstance(table, dict) else {}, key, problems)
        before = len(problems)
        name = r.string("name", None, _DESTINATION_NAME, "a name of 1 to 64 letters, digits or _-.")
        ae_title = r.string("ae_title", None, _REMOTE_AE, "an AE title of 1 to 16 characters of the DICOM default repertoire")
        host = r.string("host", None)
        port = r.integer("port", None, 1, 65535)
        tls = r.boolean("tls", False)
        ca = r.string("ca_certificates", None)
        cert = r.string("certificate", None)
        key_file = r.string("private_key", None)
        r.done()
        for field_name, value in (("name", name), ("ae_title", ae_title), ("host", host), ("port", port)):
            if value is None and not any(p.startswith(f"{key}.{field_name}:") for p in problems):
                problems.append(f"{key}.{field_name}: required")
        if host is not None and not host.strip():
            problems.append(f"{key}.host: must not be empty")
        if ae_title is not None and not ae_title.strip(" "):
            problems.append(f"{key}.ae_title: must not be blank")
        if name is not None and name in seen:
            problems.append(f"{key}.name: {name!r} is configured twice")
        if name is not None:
            seen.add(name)
        if (ca or cert or key_file) and not tls:
            problems.append(f"{key}: ca_certificates, certificate and private_key need tls = true")
        for field_name, value in (("ca_certificates", ca), ("certificate", cert), ("private_key", key_file)):
            if value is not None and not os.path.isfile(value):
                problems.append(f"{key}.{field_name}: {value!r} is not a readable file")
        if len(problems) != before:
            continue
        out.append(Destination(name=name, ae_title=ae_title.strip(" "), host=host, port=port, tls=tls,
                               ca_certificates=ca, certificate=cert, private_key=key_file))
    return tuple(out)



def config_from_string(text: str, source: str = "<string>") -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"not valid TOML: {e}"], source) from None
    return parse_config(doc, source)


def load_config(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError([f"cannot read the file: {e.strerror}"], path) from None
    except UnicodeDecodeError:
        raise ConfigError(["the file is not UTF-8"], path) from None
    return config_from_string(text, os.fspath(path))
