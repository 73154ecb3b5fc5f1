"""One STOW-RS request body, parsed and stored as it arrives.

:class:`StowReceiver` is a streaming multipart parser (python-multipart)
whose parts each go to the same storage writer as a C-STORE, piece by piece
as they arrive, never whole in memory nor on disk before parsing.  Each
part's File Meta Information is read with :func:`gateway.part10.parse_meta`;
the stored file is our File Meta Information followed by the part's data
set bytes as sent.  The AE title's rules apply as for DIMSE (the
presentation context rules of :func:`gateway.ingest.policy.instance_result`,
``ignored_sop_classes``, the storage watermark), and its observers (index,
payloads, pipelines) are told of each instance, and of the request as of
one association.

Nothing here knows of HTTP: :mod:`gateway.ingest.stow_web` feeds the body
in and answers with what :meth:`StowReceiver.close` gives.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from gateway import ul as P
from gateway.dimse.sop import is_valid_uid
from gateway.ingest import policy
from gateway.ingest.scp import HIGH_WATER, LOW_WATER, AssociationInfo, store_failure_status
from gateway.ingest.stow import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SOP_CLASS_NOT_SUPPORTED,
    STUDY_MISMATCH,
    TRANSFER_SYNTAX_NOT_SUPPORTED,
    PartOutcome,
    Refusal,
    Route,
    StowResult,
)
from gateway.part10 import parse_meta
from gateway.store.header import quick_attributes

#: On a ``/studies/{uid}`` request, the first bytes of each data set are
#: kept to check its Study Instance UID before the file is put in place.
HEAD_KEEP = 256 << 10

_HEAD, _BODY, _SKIP = 0, 1, 2


class _Part:
    __slots__ = ("receiver", "outcome", "state", "head", "dhead", "writer", "transfer_syntax",
                 "started", "headers", "header_name", "header_value")

    def __init__(self, receiver: "StowReceiver", index: int, started: float, keep_head: bool):
        self.receiver = receiver
        self.outcome = PartOutcome(index)
        self.state = _HEAD
        self.head = bytearray()  # the File Meta Information, until it is complete
        self.dhead = bytearray() if keep_head else None  # the data set's first bytes
        self.writer = None
        self.transfer_syntax = ""
        self.started = started
        self.headers: dict[bytes, bytes] = {}
        self.header_name = bytearray()
        self.header_value = bytearray()

    def headers_done(self):
        ctype = self.headers.get(b"content-type")
        if ctype is not None:
            kind = ctype.split(b";", 1)[0].strip().lower()
            if kind != b"application/dicom":
                self.not_part10(f"part of type {kind.decode('latin-1')[:80]!r}, not application/dicom")

    def not_part10(self, why: str):
        o = self.outcome
        o.not_part10 = True
        o.failure = CANNOT_UNDERSTAND
        o.reason = why
        self.state = _SKIP
        self.head = self.dhead = None

    def data(self, view):
        state = self.state
        if state == _BODY:
            self._body(view)
        elif state == _HEAD:
            self.head += view
            try:
                meta = parse_meta(self.head)
            except ValueError as e:
                self.not_part10(f"not a Part 10 instance: {e}")
                return
            if meta is None:
                return
            end, sop_class, sop_instance, ts = meta
            rest = bytes(self.head[end:])
            self.head = None
            self.receiver.begin(self, sop_class, sop_instance, ts)
            if self.state == _BODY and rest:
                self._body(rest)

    def _body(self, view):
        self.writer.write(view)
        dhead = self.dhead
        if dhead is not None and len(dhead) < HEAD_KEEP:
            dhead += view[:HEAD_KEEP - len(dhead)]
        self.receiver.pressure()

    def end(self):
        if self.state == _HEAD:
            self.not_part10("not a Part 10 instance: the part ends within its File Meta Information")
            return
        if self.state == _BODY:
            self.receiver.part_complete(self)


class StowReceiver:
    """One STOW-RS request body; see the module docstring.

    ``ingest`` provides :class:`gateway.interfaces.IIngest` (storage,
    watermark, observers); ``ae`` is the AE title's configuration and
    ``info`` the :class:`~gateway.ingest.scp.AssociationInfo` the observers
    are told of.  ``pause`` and ``resume`` stop and restart reading from
    the client while too much of its data waits for the disk.
    """

    log = Logger()

    def __init__(self, ingest, ae, route: Route, boundary: bytes, info: AssociationInfo, *,
                 max_parts: int, pause, resume, reactor):
        from python_multipart.multipart import MultipartParser

        self.ingest = ingest
        self.clock = reactor
        self.ae = ae
        self.route = route
        self.info = info
        self.max_parts = max_parts
        self.pause = pause
        self.resume = resume
        self.outcomes: list[PartOutcome] = []
        self.error: Refusal | None = None
        self.part: _Part | None = None
        self.writers: set = set()
        self.waits: list[Deferred] = []
        self.paused = False
        self.ended = False  # the closing boundary was seen
        self.finished = False  # close() or abort() ran
        self.stored_bytes = 0
        self.ignored = 0
        callbacks = {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_end": self._on_end,
        }
        # Part headers: at most 16 of up to 1 KiB each (a part needs one or two).
        self.parser = MultipartParser(boundary, callbacks, max_header_count=16, max_header_size=1024)

    # ---- the body, as it arrives ---------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse the next bytes of the body; a fault sets ``error`` and
        everything after it is ignored."""
        if self.error is not None or self.finished:
            return
        try:
            self.parser.write(data)
        except Refusal as e:
            self.fail(e)
        except Exception as e:  # python-multipart's MultipartParseError, and anything it may raise
            self.fail(Refusal(400, f"malformed multipart body: {e}"))

    def fail(self, error: Refusal):
        """The body as a whole is refused (it broke, or is too large): the
        part being received is discarded; those before it keep their outcome."""
        self.error = error
        part, self.part = self.part, None
        if part is not None and part.writer is not None:
            self.writers.discard(part.writer)
            part.writer.discard()

    def _on_part_begin(self):
        if len(self.outcomes) >= self.max_parts:
            raise Refusal(413, f"more than {self.max_parts} parts in one request (dicomweb.max_parts)")
        part = _Part(self, len(self.outcomes) + 1, self.clock.seconds(), self.route.study_uid is not None)
        self.outcomes.append(part.outcome)
        self.part = part

    def _on_header_field(self, data, start, end):
        self.part.header_name += data[start:end]

    def _on_header_value(self, data, start, end):
        self.part.header_value += data[start:end]

    def _on_header_end(self):
        part = self.part
        part.headers[bytes(part.header_name).strip().lower()] = bytes(part.header_value).strip()
        part.header_name.clear()
        part.header_value.clear()

    def _on_headers_finished(self):
        self.part.headers_done()

    def _on_part_data(self, data, start, end):
        self.part.data(memoryview(data)[start:end])

    def _on_part_end(self):
        part, self.part = self.part, None
        part.end()

    def _on_end(self):
        self.ended = True

    # ---- one instance ----------------------------------------------------

    def begin(self, part: _Part, sop_class: str, sop_instance: str, ts: str):
        """The part's meta group is in: store it, skip it or refuse it."""
        o = part.outcome
        o.sop_class_uid, o.sop_instance_uid = sop_class, sop_instance
        part.transfer_syntax = ts
        part.state = _SKIP
        ae = self.ae
        if not is_valid_uid(sop_class) or not is_valid_uid(sop_instance) or not is_valid_uid(ts):
            self._refuse(part, CANNOT_UNDERSTAND, "invalid SOP Class, SOP Instance or Transfer Syntax UID "
                                                  f"in the File Meta Information: {sop_class!r} / "
                                                  f"{sop_instance!r} / {ts!r}")
            return
        if sop_class in ae.ignored_sop_classes:
            o.ignored = True
            self.ignored += 1
            return
        result = policy.instance_result(ae, sop_class, ts)
        if result != P.PC_ACCEPTANCE:
            if result == P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED:
                self._refuse(part, SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} is not accepted by {ae.title}")
            else:
                self._refuse(part, TRANSFER_SYNTAX_NOT_SUPPORTED,
                             f"transfer syntax {ts} is not accepted by {ae.title}")
            return
        if self.ingest.congestion:
            self._refuse(part, OUT_OF_RESOURCES, f"storage: {self.ingest.congestion}")
            return
        try:
            writer = self.ingest.storage.begin(called_ae=ae.title, calling_ae="", sop_class_uid=sop_class,
                                               sop_instance_uid=sop_instance, transfer_syntax_uid=ts)
        except ValueError as e:
            self._refuse(part, CANNOT_UNDERSTAND, str(e))
            return
        writer.on_drained = self.drained
        self.writers.add(writer)
        part.writer = writer
        part.state = _BODY

    def _refuse(self, part: _Part, failure: int, reason: str):
        part.outcome.failure = failure
        part.outcome.reason = reason
        self._report_failure(part.outcome)

    def part_complete(self, part: _Part):
        """The part's last byte is in: check its study (on ``/studies/{uid}``),
        then have the writer put it in place."""
        writer = part.writer
        wanted = self.route.study_uid
        if wanted is not None:
            head, part.dhead = part.dhead, None
            attrs = quick_attributes(head, part.transfer_syntax, len(head) < HEAD_KEEP)
            found = attrs["study_uid"] if attrs is not None else None
            if found != wanted:
                self.writers.discard(writer)
                writer.discard()
                said = found or ("none" if attrs is not None else "unreadable")
                self._refuse(part, STUDY_MISMATCH, f"Study Instance UID {said} is not the study of the "
                                                   f"request ({wanted})")
                return
        d = Deferred()
        writer.finish(_outcome_to, d)
        d.addCallbacks(self._stored, self._store_failed, callbackArgs=(part, writer),
                       errbackArgs=(part, writer))
        self.waits.append(d)

    def _stored(self, stored, part: _Part, writer):
        self.writers.discard(writer)
        self.drained(writer)
        o = part.outcome
        attrs = quick_attributes(stored.head, stored.transfer_syntax_uid,
                                 stored.dataset_size <= len(stored.head)) or {}
        o.study_uid, o.series_uid = attrs.get("study_uid", ""), attrs.get("series_uid", "")
        if stored.replaced:
            self.log.info("STOW-RS {association}: instance {sop_instance_uid} received again; "
                          "the earlier copy was replaced", association=self.info.id,
                          sop_instance_uid=o.sop_instance_uid)
        self.ingest.metrics.instance_stored(self.info.called_ae, stored.dataset_size,
                                            self.clock.seconds() - part.started)
        d = self.ingest.notify("instance_stored", stored, self.info)
        if d is None:
            d = succeed(None)

        def done(_):
            o.stored = True
            o.bytes = stored.dataset_size
            self.stored_bytes += stored.dataset_size

        def observer_failed(failure):
            self.log.failure("STOW-RS {association}: an observer failed on {sop_instance_uid}", failure,
                             association=self.info.id, sop_instance_uid=o.sop_instance_uid)
            o.failure, o.reason = PROCESSING_FAILURE, "could not index the instance"
            self._report_failure(o)

        d.addCallbacks(done, observer_failed)
        return d

    def _store_failed(self, failure, part: _Part, writer):
        self.writers.discard(writer)
        self.drained(writer)
        o = part.outcome
        status = store_failure_status(failure.value)
        if status is None:
            o.failure, o.reason = PROCESSING_FAILURE, "discarded"
            return None
        o.failure, o.reason = status, "could not store the instance"
        self.log.error("STOW-RS {association}: could not store {sop_instance_uid}: {error}",
                       association=self.info.id, sop_instance_uid=o.sop_instance_uid, error=failure.value)
        self._report_failure(o)
        return None

    def _report_failure(self, o: PartOutcome):
        self.log.info("STOW-RS {association}: {sop_instance_uid} failed with 0x{status:04x}: {reason}",
                      event="instance.failed", association=self.info.id, called_ae=self.info.called_ae,
                      calling_ae="", sop_instance_uid=o.sop_instance_uid, status=o.failure, reason=o.reason)

    # ---- backpressure ------------------------------------------------------

    @property
    def pending(self) -> int:
        return sum(w.pending for w in self.writers)

    def pressure(self):
        if not self.paused and self.pending > HIGH_WATER:
            self.paused = True
            self.pause()

    def drained(self, _writer):
        if self.paused and self.pending < LOW_WATER:
            self.paused = False
            self.resume()

    # ---- the end ------------------------------------------------------------

    def close(self) -> Deferred:
        """The body is complete (or was refused half-way): fire with the
        :class:`~gateway.ingest.stow.StowResult` once every part has its
        outcome and the observers have recorded the request."""
        self.finished = True
        if self.error is None and not self.ended:
            self.fail(Refusal(400, "the body ends before the closing multipart boundary"))
        if self.paused:  # nothing more is read for this request
            self.paused = False
            self.resume()
        d = gatherResults(self.waits) if self.waits else succeed(None)
        d.addCallback(lambda _: self.ingest.notify("association_released", self.info))  # None or a Deferred
        result = StowResult(self.outcomes)

        def released(_):
            result.error = self.error
            return result

        def release_failed(failure):
            self.log.failure("STOW-RS {association}: an observer failed on the end of the request",
                             failure, association=self.info.id)
            result.error = Refusal(500, "could not record the request")
            return result

        d.addCallbacks(released, release_failed)
        return d

    def abort(self, why: str = "connection lost") -> None:
        """The client went away: discard what is not stored yet; observers
        hear of the request as of a lost association."""
        if self.finished:
            return
        self.finished = True
        self.error = self.error or Refusal(499, why)
        for writer in list(self.writers):
            writer.discard()
        self.writers.clear()
        self.part = None
        d = gatherResults(self.waits) if self.waits else succeed(None)
        d.addCallback(lambda _: self.ingest.notify("association_ended", self.info, "lost"))
        d.addErrback(lambda f: self.log.failure("STOW-RS {association}: an observer failed", f,
                                                association=self.info.id))


def _outcome_to(outcome, d: Deferred) -> None:
    """A writer's outcome (a StoredInstance, or the exception) to ``d``."""
    if isinstance(outcome, BaseException):
        d.errback(outcome)
    else:
        d.callback(outcome)
