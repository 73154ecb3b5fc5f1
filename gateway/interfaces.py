"""The seams between layers and services (zope.interface).

Services depend on these, not on each other's classes; in-memory fakes of
them live in :mod:`gateway.testing`.

Structured events
-----------------
Services report what happened as ``twisted.logger`` events that carry an
``event`` field naming what happened, plus named fields.  Operators read them
as log lines; the metrics and the audit trail are observers of the same
events, so no service needs to know about either.  The one exception is the
instance stored, once per instance on the hot path: it is no event but a
direct call, :meth:`IMetrics.instance_stored` and
:meth:`IInstanceStoredObserver.instance_stored` (the audit trail is one).
Names in use:

=======================  ==========================================================
``association.closed``   calling_ae, called_ae, peer, association, instances, bytes,
                         failures, duration, outcome (text), result (one of
                         ``released``, ``aborted``, ``rejected``, ``lost``), and for
                         rejects ``reject_result``, ``reject_source``, ``reject_reason``;
                         ignored (C-STOREs of ignored SOP classes answered Success but
                         not stored), tls (true on the TLS port), tls_subject (the peer
                         certificate's subject, RFC 4514, or None)
``storage.congested``    why, percent, free (bytes): the watermark or reserve was
                         crossed; associations and C-STOREs are refused until
``storage.recovered``    percent, free: space is back; accepting again
``instance.failed``      association, called_ae, calling_ae, sop_instance_uid, status
``export.job``           job, destination, state (``queued`` or ``retrying``), files,
                         done, failed; origin when queued; pending, delay, attempt when
                         retrying
``export.job.finished``  job, destination, outcome = state (``done``,
                         ``partially_failed``, ``failed``), files, done, failed
``export.file``          a file to be tried again: job, destination, path, state and
                         outcome ``retry``, status (DIMSE status or None), reason,
                         attempt, sop_instance_uid
``export.file.finished`` the same fields, outcome = state ``sent`` or ``failed``
``echo``                 destination, ok, rtt_ms, reason
``instances.discarded``  association, count, retained (seconds or 0): instances of
                         an aborted/lost association (or of one a crash broke)
``payload.closed``       payload, ae, key, instances, pipelines, path
``pipeline.run``         payload, pipeline, job, attempt, outcome (one of ``done``,
                         ``retry``, ``failed``), reason, duration, outputs
``export.submitted``     payload, pipeline, job, destinations, files, export_jobs
``reclaimer.freed``      payloads, instances, bytes
``messaging.broker``     state (``connected``, ``disconnected``), url (no password),
                         reason, retry (seconds): logged once per change of state
``messaging.published``  type, message_id, routing_key (debug): handed to the broker
``messaging.confirmed``  type, message_id, routing_key, payload: the broker confirmed it
``messaging.recorded``   type, message_id, payload: a message waits in the outbox
``export_request``       outcome (``exported``, ``rejected``, ``duplicate``), key
                         (export task id), message_id, status, reason, files
=======================  ==========================================================

A DICOMweb STOW-RS request counts as one association: its instances are
observed and counted like a C-STORE's, failures log ``instance.failed``
(status = the Failure Reason), and
the request one ``association.closed`` with ``service`` = ``stow-rs``,
``http_status`` (None when the client went away), calling_ae ``-`` and
result ``released`` (answered) or ``lost``.

Each service that adds events lists them here.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IAssociationUser(Interface):
    """The service user of one association: what the Protocol tells it.

    :class:`gateway.net.protocol.DicomProtocol` calls these on the reactor
    thread, in the order the upper layer produces them.  The SCP's user
    (:class:`gateway.ingest.scp.StoreSCP`) and the SCU's
    (:class:`gateway.export.scu.SCUAssociation`) share
    :class:`gateway.dimse.user.DIMSEUser`.
    """

    def connection_made(provider):
        """The transport is up; ``provider`` is the IAssociationProvider of
        this association, to ask everything of from now on."""

    def association_request():
        """Requestor only: the A-ASSOCIATE-RQ to send."""

    def associate_indication(rq):
        """Acceptor: the peer's A-ASSOCIATE-RQ; answer with ``provider.accept``
        or ``provider.reject``."""

    def associate_accepted(ac):
        """Requestor: the peer accepted."""

    def associate_rejected(rj):
        """Requestor: the peer rejected (an A-ASSOCIATE-RJ)."""

    def pdv_received(context_id, control, data, end):
        """A piece of PDV data arrived, in order (the upper layer's sink):
        ``data`` is a view of the received bytes, valid during the call;
        ``end`` is true on the PDV's last piece.  ``control`` is its message
        control header (PS3.8 Annex E.2)."""

    def release_indication(collision):
        """The peer asks to release; answer with ``provider.release_response``."""

    def release_confirmation():
        """Requestor: the peer confirmed our release."""

    def aborted(indication):
        """An A-ABORT or A-P-ABORT (a :class:`gateway.ul.AbortIndication`)."""

    def closed(reason):
        """The connection is gone (a Failure); always the last call."""

    def owes_response():
        """True while we owe the peer an answer: its silence is then ours,
        and the DIMSE timer waits."""


class IAssociationProvider(Interface):
    """What the service user of one association may ask of the upper layer.

    Provided by :class:`gateway.net.protocol.DicomProtocol`.  A request the
    state does not allow any more (an answer after an abort) is dropped.
    """

    peer = Attribute("The peer's address as host:port, for logs.")
    peer_host = Attribute("The peer's IP address, or None.")
    peer_max_pdu = Attribute("The Maximum Length the peer announced (0: no limit).")
    closed = Attribute("True once the connection is gone.")
    disconnect_reason = Attribute("Why we closed the connection, if we did; else None.")
    can_send_data = Attribute("True while P-DATA may go out.")
    can_request_release = Attribute("True while the association is established and no release is under way.")

    def peer_certificate_subject():
        """The TLS peer certificate's subject (RFC 4514), or None."""

    def peer_verify_error():
        """What the peer's TLS certificate is (subject, issuer, expired), for
        a handshake that failed; None when there was no TLS."""

    def accept(ac):
        """Answer the A-ASSOCIATE indication with this A-ASSOCIATE-AC."""

    def reject(rj):
        """Answer the A-ASSOCIATE indication with this A-ASSOCIATE-RJ."""

    def send_pdata(pdu_bytes):
        """Send one encoded P-DATA-TF PDU."""

    def release_request():
        """Requestor: ask the peer to release."""

    def release_response():
        """Answer the peer's release request."""

    def abort(reason, why, now):
        """A-ABORT (service-user); ``why`` is kept as the disconnect reason;
        ``now`` drops the connection without waiting for the peer."""

    def provider_abort(reason, detail):
        """A-ABORT (service-provider): the peer broke a rule above the upper layer."""

    def pause():
        """Stop reading from the peer (our disk is behind)."""

    def resume():
        """Read from the peer again."""

    def register_producer(producer):
        """Have the transport pause and resume this IPushProducer (sending side)."""

    def unregister_producer():
        """Undo :meth:`register_producer`."""


class IInstanceStoredObserver(Interface):
    """Told of stored instances and of how their associations ended.

    The SCP calls every observer on the reactor thread.  A method may return
    a Deferred: the SCP waits for it before it answers (so the C-STORE
    Success, and the A-RELEASE response, mean "the observers have it").
    ``association`` is a :class:`gateway.ingest.scp.AssociationInfo`
    (id, calling_ae, called_ae, peer, started).
    """

    def instance_stored(instance, association):
        """``instance`` (a :class:`gateway.store.writer.StoredInstance`)
        is in place on disk (durable with ``[storage] fsync``); the
        C-STORE-RSP waits for a returned Deferred, and goes at once when
        the method returns anything else (the index returns None: it
        records the instance with others, before the association's release
        is answered).  A failure makes the response "processing failure"
        (0110).  Called once per instance on the hot path: keep it cheap."""

    def association_released(association):
        """The peer asked for release and every instance has been answered;
        the A-RELEASE-RP is sent once the returned Deferred fires."""

    def association_ended(association, result):
        """The association ended otherwise: ``result`` is ``aborted`` or
        ``lost``; nothing waits for this."""


class IMetrics(Interface):
    """What is received, counted where it happens: the hot path calls this
    directly, with no log event per instance.  Failures and associations
    are counted from their log events (``instance.failed``,
    ``association.closed``)."""

    def instance_stored(called_ae, size, latency):
        """An instance was stored on ``called_ae``: ``size`` bytes of data
        set, ``latency`` seconds from its request to its answer."""


class IInstanceStorage(Interface):
    """Where received instances are written (the storage root)."""

    def begin(*, called_ae, calling_ae, sop_class_uid, sop_instance_uid, transfer_syntax_uid):
        """A :class:`gateway.store.writer.InstanceWriter` for one instance
        (``write``, ``pending``, ``on_drained``, ``finish(done, *args)``,
        which calls ``done`` with the StoredInstance or the exception that
        stopped it, ``discard``); ValueError for a UID that is not one."""


class IIngest(Interface):
    """What every way in shares (the DIMSE SCP, STOW-RS): instances that
    arrive by any route are stored, refused and observed alike."""

    config = Attribute("The configuration new work starts under (gateway.config.Config).")
    storage = Attribute("The IInstanceStorage instances are written to.")
    congestion = Attribute("Why storage refuses work now (the watermark), or None.")
    metrics = Attribute("The IMetrics every stored instance is counted by.")

    def notify(method, *args):
        """Call ``method`` of every IInstanceStoredObserver: None when all
        finished at once, else a Deferred that fires when all have (failing
        with the first failure)."""


class IExportQueue(Interface):
    """Durable export jobs: files to be sent to configured destinations."""

    def submit(destinations, paths, origin):
        """Queue one job per destination name for these Part 10 files.

        ``origin`` says where the job comes from (``"pipeline:NAME payload:ID"``,
        ``"cli"``, ``"api"``).  Returns a Deferred firing with the list of job
        ids once the jobs are durable; fails with ``KeyError`` for an unknown
        destination name.
        """

    def jobs(limit=100, offset=0, state=None):
        """Deferred firing with a list of dicts, newest first: id, destination,
        state, origin, created, updated, files, done, failed."""

    def count(state=None):
        """Deferred firing with the number of jobs (in ``state``, if given)."""

    def job(job_id):
        """Deferred firing with one job as a dict, with ``file_statuses``
        (path, state, DIMSE status, attempts, reason), or None."""

    def wait(job_id):
        """Deferred firing with the job's final state (``done``,
        ``partially_failed``, ``failed``) once it has one."""

    def find(origin):
        """Deferred firing with the ids of the jobs submitted with this
        ``origin``, oldest first (so a submitter can tell, after a crash,
        whether its submission went in)."""


class IDestinations(Interface):
    """The configured DICOM destinations (Storage SCPs we send to)."""

    def names():
        """The configured destination names."""

    def echo(name):
        """C-ECHO the destination: Deferred firing with a dict
        ``{"destination", "ok", "rtt_ms", "reason"}``; never fails for a
        peer problem (refused, rejected, TLS, timeout): ``ok`` is false and
        ``reason`` says why.  ``KeyError`` for an unknown name."""


class IPayloadQuery(Interface):
    """Read access to payloads for the management API."""

    def payloads(limit=100, offset=0, state=None):
        """Deferred firing with a list of dicts, newest first: id, ae, key,
        state, instances, created, closed, and per pipeline its job state."""

    def count(state=None):
        """Deferred firing with the number of payloads (in ``state``, if given)."""


class IPipelineJobs(Interface):
    """Pipeline jobs that an operator may run again."""

    def retry(payload_id, pipeline):
        """Run a failed job again: Deferred firing with the job (payload,
        pipeline, state, attempts, reason) once it is pending, or None when
        the payload has no job of that pipeline; fails with
        :class:`JobNotFailed` when the job is not failed."""


class JobNotFailed(Exception):
    """Only a failed job is run again; ``state`` is the job's."""

    def __init__(self, state):
        super().__init__(f"the job is {state}, not failed")
        self.state = state


class IStudyQuery(Interface):
    """What the gateway holds, by study (:mod:`gateway.store.studies`)."""

    def studies(limit=100, offset=0, **filters):
        """Deferred firing with ``{"total", "items"}``: one page of studies,
        the most recently received first; ``filters``: ``PatientID``,
        ``StudyInstanceUID``, ``ae``, ``received_since``, ``received_before``
        (seconds since the epoch)."""

    def study(uid):
        """Deferred firing with a study's series and instances, or None."""

    def files(uid):
        """Deferred firing with the paths of the files held of a study."""


class IReconfigurable(Interface):
    """A service that can take a new configuration without a restart (SIGHUP).

    :class:`gateway.ops.reload.ReloadService` calls ``reconfigure`` on
    every provider in the service tree (and on the objects registered with
    it) once a new file has been parsed and validated as a whole.  Work in
    progress (an association, a running job) keeps the config it started
    with; only new work sees the new one.  Events: ``config.reloaded``
    (source, changes: list of top-level fields that changed,
    restart_needed: list of keys that only a restart applies) and
    ``config.reload_failed`` (source, problems: list of strings).
    """

    def reconfigure(config):
        """Take ``config`` (a validated :class:`gateway.config.Config`) for new work.

        Runs on the reactor thread and must not block.  May raise to refuse
        (the error is logged; the other services still get the new config).
        """


class IHealthCheck(Interface):
    """A service that can say why the gateway should not be considered healthy
    (``GET /health`` answers 503 with these reasons)."""

    def health_problems():
        """A list of short strings; empty when this service is fine."""


class IPayloadCloseParticipant(Interface):
    """Takes part in closing a payload (the message broker's outbox does).

    :class:`gateway.workflow.payloads.PayloadService` is given these when it
    is made and calls them for every payload it closes.  While it has one,
    every AE title forms payloads, with or without pipelines.
    """

    def close_transaction(conn, payload_id, now):
        """Run inside the database transaction that closes the payload (on
        the database thread; ``conn`` is the index database connection; the
        payload's instance rows already have their final paths).  Return
        True to keep a payload without pipeline jobs ``closed`` (it is not
        ``done`` yet: the participant finishes it)."""

    def payload_closed(payload_id):
        """The closing transaction has committed (reactor thread)."""


class IPayloadHold(Interface):
    """Keeps the reclaimer off payloads it still needs (the outbox keeps
    those whose workflow request the broker has not confirmed)."""

    def held_payloads(conn, payload_ids):
        """Run inside the reclaimer's transaction that picks what to remove
        (database thread, the index database): the ids among
        ``payload_ids`` to keep for now, as a set."""


class IMessageBroker(Interface):
    """A connection to a message broker that reconnects by itself."""

    connected = Attribute("True while messages can be published")

    def publish(message):
        """Publish a :class:`gateway.messaging.monai.Message`: Deferred firing
        once the broker confirmed it, failing when it refused it or the
        connection went away first."""

    def consume(queue, routing_key, handler):
        """Declare ``queue`` (durable) bound to the exchange with
        ``routing_key`` at every connection, and call ``handler(delivery)``
        for each message (:class:`gateway.messaging.broker.Delivery`)."""

    def when_connected(callback):
        """Call ``callback()`` every time the connection is (re)established."""

    def state():
        """A dict: state, url (without password), since, reason, exchange."""


class IStatusReport(Interface):
    """A service that adds a section to ``GET /status`` and gauges to
    ``GET /metrics`` (the API is given these when it is made)."""

    def status_report():
        """Deferred firing with ``(name, dict)``: the section of /status."""

    def metric_gauges():
        """Deferred firing with a list of ``(name, help, [(labels, value)])``."""


class IDegradation(Interface):
    """A service that can say why the gateway works, but not fully
    (``GET /health`` stays 200 and says ``degraded``)."""

    def degraded_reasons():
        """A list of short strings; empty when this service is fine."""
