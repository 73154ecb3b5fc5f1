"""The single tables of the configuration file, one frozen class each.

Each class is its TOML table: ``[timeouts] pdu`` is ``config.timeouts.pdu``.
``reload=False`` marks what only a restart applies (the listeners are bound,
the storage root is where everything lives, loops and observers are set up
at start): a reload that changes one logs "restart needed" and keeps the old
value until then.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from gateway import IMPLEMENTATION_VERSION_NAME
from gateway.config.options import (
    DOTTED,
    Invalid,
    REMOTE_AE,
    VERSION_NAME,
    boolean,
    endpoint,
    integer,
    is_loopback_endpoint,
    number,
    one_of,
    option,
    strings,
    text,
    with_token,
)

TLS_PROFILES = ("bcp195", "bcp195-nd", "bcp195-ex")
#: ``[gateway] node``: letters, digits, ``.``, ``_``, ``-`` (it names a directory).
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
#: ``[index] schema``: a plain PostgreSQL identifier.
SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")


def default_node() -> str:
    """The host name, as far as it is a valid node name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:63].strip("-.") or "node"
    return name if NODE_NAME.match(name) else "node"

#: ``[storage] digest``: what every stored file is digested with (gateway.store.writer.DIGESTS).
DIGEST_ALGORITHMS = ("blake3", "sha256", "none")


@dataclass(frozen=True)
class Gateway:
    """``[gateway]``"""

    storage: str = option("var/dicomgw", text(nonempty=True), reload=False)
    max_pdu_length: int = option(131072, integer(0, 16 << 20))
    implementation_version_name: str = option(
        IMPLEMENTATION_VERSION_NAME,
        text(VERSION_NAME, "1 to 16 characters of the DICOM default repertoire"))
    audit_log: str = option("audit.jsonl", text(), reload=False)  # under the storage root; "" = off
    reject_unknown_sources: bool = option(False, boolean)
    max_associations: int = option(25, integer(1, 1000))
    # This node's name in a cluster (recorded with every association and
    # instance; its temporary files are under tmp/<node>/).
    node: str = option(default_node(),
                       text(NODE_NAME, "a node name (letters, digits, '.', '_', '-'; up to 63)"), reload=False)

    def validate(self, key):
        if 0 < self.max_pdu_length < 4096:
            return [f"{key}.max_pdu_length: {self.max_pdu_length} is below 4096 (use 0 for no limit)"]
        return []


@dataclass(frozen=True)
class Listen:
    """``[listen]``: Twisted endpoint descriptions."""

    dicom: str = option("tcp:11112", endpoint, reload=False)
    dicom_tls: str | None = option(None, endpoint, reload=False)  # absent: no TLS port
    http: str = option("", endpoint, reload=False)  # "": no management API
    dicomweb: str = option("", endpoint, reload=False)  # "": no DICOMweb (STOW-RS) server

    def validate(self, key):
        if self.dicom_tls is not None and not self.dicom_tls.strip():
            return [f"{key}.dicom_tls: must not be empty (leave the key out for no TLS port)"]
        return []


@dataclass(frozen=True)
class TLS:
    """``[tls]``: the TLS port's certificates and profile (PS3.15 Annex B)."""

    certificate: str = option("etc/tls/server.pem", text(nonempty=True))
    private_key: str = option("etc/tls/server.key", text(nonempty=True))
    ca_certificates: str = option("etc/tls/ca.pem", text(nonempty=True))
    require_client_certificate: bool = option(True, boolean)
    profile: str = option("bcp195-nd", one_of(TLS_PROFILES))


@dataclass(frozen=True)
class Timeouts:
    """``[timeouts]``, in seconds."""

    artim: float = option(30.0, number(1, 3600))
    dimse: float = option(60.0, number(1, 86400))
    pdu: float = option(60.0, number(1, 86400))


@dataclass(frozen=True)
class Storage:
    """``[storage]``: durability, the watermark, how long things are kept."""

    fsync: bool = option(True, boolean)  # instance files and the database's commits
    digest: str = option("blake3", one_of(DIGEST_ALGORITHMS))  # of every stored file, in the index and manifests
    watermark_percent: float = option(75.0, number(1, 100))
    reserved_gb: float = option(5.0, number(0, 1 << 20))
    check_interval: float = option(10.0, number(0.1, 3600), reload=False)
    retention: float = option(0.0, number(0, 365 * 86400))
    aborted_retention: float = option(0.0, number(0, 365 * 86400))


def _index_url(value):
    url = text()(value)
    if url and not url.startswith(("postgresql://", "postgres://")):
        raise Invalid(f"{url!r} is not a postgresql:// URL (use \"\" for SQLite under the storage root)")
    return url


@dataclass(frozen=True)
class Index:
    """``[index]``: where the index lives.  ``url`` "": SQLite under the
    storage root (one node); ``postgresql://...``: PostgreSQL, which
    several nodes may share (with one storage root)."""

    url: str = option("", _index_url, reload=False, repr=False)
    schema: str = option("dicomgw", text(SCHEMA_NAME, "a lower-case SQL identifier"), reload=False)

    @property
    def shared(self) -> bool:
        return bool(self.url)

    def safe_url(self) -> str:
        """The url without its password (for logs and /status)."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


@dataclass(frozen=True)
class Cluster:
    """``[cluster]``: how nodes sharing one index hand work to each other."""

    # Seconds a node holds a claimed job (renewed while it runs); a node
    # that stops renewing loses its jobs to another after this long.
    lease: float = option(30.0, number(2, 3600), reload=False)


@dataclass(frozen=True)
class Reclaimer:
    """``[reclaimer]``"""

    interval: float = option(60.0, number(0.1, 86400), reload=False)


@dataclass(frozen=True)
class Notify:
    """``[notify]``: observer factories, as dotted Python names."""

    observers: tuple[str, ...] = option((), strings(DOTTED, "a dotted Python name"), reload=False)


@dataclass(frozen=True)
class HTTP:
    """``[http]``: the management API's bearer token."""

    token_file: str = option("", text())
    token: str = field(default="", repr=False)  # read from token_file

    def complete(self, key, problems):
        return with_token(self, key, problems)


GIB = 1 << 30


@dataclass(frozen=True)
class DicomWeb:
    """``[dicomweb]``: the STOW-RS server on ``listen.dicomweb`` (gateway.ingest.stow_web)."""

    ae: str = option("", text(), reload=True)  # the [[ae]] of plain /dicomweb/studies; "": the first
    tls: bool = option(False, boolean, reload=False)  # TLS on the listener, with the [tls] files and rules
    token_file: str = option("", text(), reload=True)  # every request needs this bearer token
    max_request_bytes: int = option(8 * GIB, integer(1 << 10, 1 << 40), reload=True)
    max_parts: int = option(10000, integer(1, 1_000_000), reload=True)
    # Seconds for the request headers, and for each PROGRESS_BYTES of a body;
    # also the idle time of a keep-alive connection (new connections).
    timeout: float = option(60.0, number(1, 3600), reload=True)
    token: str = field(default="", repr=False)  # read from token_file

    def complete(self, key, problems):
        return with_token(self, key, problems)


@dataclass(frozen=True)
class SCU:
    """``[scu]``: how the gateway calls out (export, echo)."""

    ae_title: str = option("DICOMGW", text(REMOTE_AE, "an AE title of 1 to 16 characters of the DICOM "
                                                      "default repertoire", strip=" ", nonempty=True))
    max_associations: int = option(2, integer(1, 100))
    retries: int = option(3, integer(0, 100))
    retry_delay: float = option(30.0, number(0, 86400))
    connect_timeout: float = option(10.0, number(0.1, 3600))
    # The client certificate (PEM, then its chain) and key offered to TLS
    # destinations that name none of their own ("" for none); the default is
    # the development client certificate of dicomgw dev-certs.
    certificate: str = option("etc/tls/client.pem", text())
    private_key: str = option("etc/tls/client.key", text())

    def validate(self, key):
        if bool(self.certificate) != bool(self.private_key):
            return [f"{key}: a client certificate needs both certificate and private_key (both \"\" for none)"]
        return []


# An AMQP exchange name or routing key (topic words): letters, digits and
# "-_.:", at most 255 bytes (an AMQP short string).
_AMQP_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,255}$")
_AMQP_NAMES = "a name of 1 to 255 letters, digits or _-.:"
_AGENT = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def amqp_url_problem(url: str) -> str | None:
    """Why ``url`` is not a usable AMQP 0-9-1 URL, or None (nothing is connected)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"not a valid URL: {e}"
    if parts.scheme not in ("amqp", "amqps"):
        return "must start with amqp:// or amqps://"
    if not parts.hostname:
        return "has no host"
    if port is not None and not 0 < port < 65536:
        return f"port {port} is out of range"
    if parts.path.count("/") > 1:
        return "the virtual host must be one path segment (write / as %2F)"
    import pika  # only where messaging is configured

    try:
        pika.URLParameters(url)
    except Exception as e:  # pika says which query parameter it does not take
        return f"not accepted by the AMQP client: {e}"
    return None


def _amqp_url(value):
    url = text()(value)
    why = amqp_url_problem(url) if url else None
    if why:
        raise Invalid(f"the URL {why}")
    return url


def _agents(value):
    agents = strings(_AGENT, "1 to 64 letters, digits or _-")(value)
    if len(set(agents)) != len(agents):
        raise Invalid("an agent is named twice")
    return agents


@dataclass(frozen=True)
class Messaging:
    """``[messaging]``: MONAI Deploy events on an AMQP 0-9-1 broker; ``url``
    empty (or no table): off, and nothing else here is used.

    What the connection sets up (the URL, its CAs, the exchange, the queues
    and their prefetch, ``app_id``) needs a restart; the bucket and routing
    keys go into each message as it is recorded, so a reload applies them
    to the next one.
    """

    url: str = option("", _amqp_url, reload=False)
    # amqps: PEM file of the CAs the broker's certificate is checked against ("": the system's).
    ca_certificates: str = option("", text(), reload=False)
    exchange: str = option("monaideploy", text(_AMQP_NAME, _AMQP_NAMES), reload=False)
    bucket: str = option("dicomgw", text(re.compile(r"^.{1,255}$"), "a non-empty string of at most 255 characters"))
    workflow_request: str = option("md.workflow.request", text(_AMQP_NAME, _AMQP_NAMES))
    export_complete: str = option("md.export.complete", text(_AMQP_NAME, _AMQP_NAMES))
    export_request_prefix: str = option("md.export.request", text(_AMQP_NAME, _AMQP_NAMES), reload=False)
    export_agents: tuple[str, ...] = option(("monaiscu",), _agents, reload=False)
    # Export requests handled at once per agent queue (basic.qos prefetch).
    prefetch: int = option(4, integer(1, 1000), reload=False)
    # The app_id property of every message published.
    app_id: str = option("dicomgw", text(_AMQP_NAME, _AMQP_NAMES), reload=False)

    def validate(self, key):
        if self.ca_certificates and not self.url.startswith("amqps://"):
            return [f"{key}.ca_certificates: only used with an amqps:// url"]
        if self.ca_certificates and not os.path.isfile(self.ca_certificates):
            return [f"{key}.ca_certificates: {self.ca_certificates!r} is not a readable file"]
        return []

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def export_queue(self, agent: str) -> str:
        """The queue (and its routing key) of one agent's export requests."""
        return f"{self.export_request_prefix}.{agent}"

    def safe_url(self) -> str:
        """The URL without its password, for logs and /status."""
        parts = urlsplit(self.url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        if parts.username:
            netloc = f"{unquote(parts.username)}@{netloc}"
        return f"{parts.scheme}://{netloc}{parts.path}"


def check_listen_http(listen: Listen, http: HTTP) -> list[str]:
    """A management API reachable from elsewhere needs a token."""
    if listen.http and not http.token_file and not is_loopback_endpoint(listen.http):
        return [f"listen.http: {listen.http!r} is not loopback-only; set http.token_file to require a "
                "bearer token"]
    return []


def check_listen_dicomweb(listen: Listen, dicomweb: DicomWeb, tls: TLS) -> list[str]:
    """A DICOMweb server reachable from elsewhere needs a token, or TLS that
    requires client certificates."""
    description = listen.dicomweb
    if not description or dicomweb.token_file or (dicomweb.tls and tls.require_client_certificate):
        return []
    # Twisted's ssl: endpoint takes interface= as tcp: does.
    plain = "tcp:" + description[4:] if description.lower().startswith("ssl:") else description
    if is_loopback_endpoint(plain):
        return []
    return [f"listen.dicomweb: {description!r} is not loopback-only; set dicomweb.token_file (a bearer "
            "token) or dicomweb.tls with tls.require_client_certificate"]
