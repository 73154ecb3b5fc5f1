"""The Storage and Verification SCP: what the gateway does on each association.

:class:`~gateway.ingest.service.SCPService` holds what all associations
share (configuration, storage, counters); :class:`StoreSCP` is the service
user of one association, driven by :class:`gateway.net.protocol.DicomProtocol`:

- A-ASSOCIATE: the called AE title must be configured (else reject, reason 7)
  and the calling AE title well formed (else reject, reason 3); Verification
  and every storage SOP class are accepted with the first transfer syntax the
  requestor proposed for it.
- C-ECHO answers Success.  C-STORE streams the dataset to an
  :class:`~gateway.store.writer.InstanceWriter` and answers once the file
  is in place (durable with ``fsync``) and the observers have it: with the
  index, that costs no Deferred, thread or log event per instance (the
  index batches its rows, and the release waits for them).  Any other DIMSE
  request is answered "unrecognized operation" in its own response.
- Responses go out in the order the requests came in.
- A-RELEASE is answered once every response is out.
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from dataclasses import dataclass

from twisted.logger import Logger

from gateway import IMPLEMENTATION_CLASS_UID
from gateway.dimse import commands as C
from gateway.dimse.sop import is_valid_uid
from gateway.dimse.user import DIMSEUser
from gateway.ingest import policy
from gateway.store.writer import StorageFull, StoredInstance
from gateway import ul as P

# Pause reading from a peer while this many received bytes wait for the
# disk (writers in the disk pool), resume below the low mark: memory per
# association stays bounded.
HIGH_WATER = 8 << 20
LOW_WATER = 2 << 20

_ids = itertools.count(1)


def new_association_id(prefix: str = "") -> str:
    """An id for an association (or what counts as one) unique in this run and unlikely across runs."""
    return f"{prefix}{next(_ids):x}-{secrets.token_hex(3)}"


def store_failure_status(error) -> int | None:
    """The status for an instance its writer could not store: None when it
    was discarded (its association went away), A700 when the disk is full
    or failed, else 0110."""
    if isinstance(error, ConnectionAbortedError):
        return None
    return C.OUT_OF_RESOURCES if isinstance(error, (StorageFull, OSError)) else C.PROCESSING_FAILURE


@dataclass(frozen=True)
class AssociationInfo:
    """What observers are told about the association an instance came on."""

    id: str
    calling_ae: str
    called_ae: str
    peer: str
    started: float


class _Slot:
    """One request awaiting its response; responses leave in request order."""

    __slots__ = ("command", "context_id", "response", "started")

    def __init__(self, command, context_id, started=0.0):
        self.command = command
        self.started = started
        self.context_id = context_id
        self.response = None


class _Store:
    """The C-STORE whose dataset is arriving now."""

    __slots__ = ("slot", "writer", "status", "comment")

    def __init__(self, slot, writer, status=C.SUCCESS, comment=None):
        self.slot = slot
        self.writer = writer
        self.status = status
        self.comment = comment


class StoreSCP(DIMSEUser):
    """The service user of one accepted association (an IAssociationUser)."""

    log = Logger()

    def __init__(self, service, config=None, tls: bool = False):
        # service: the gateway.ingest.service.SCPService all associations share
        super().__init__({})  # id -> (abstract syntax, transfer syntax), once negotiated
        self.service = service
        # The rules this association started under, whatever a reload does.
        self.config = config if config is not None else service.config
        self.tls = tls
        self.tls_subject: str | None = None
        self.ae = None  # our AETitle config once accepted
        self.ignored = 0
        self.id = new_association_id()
        self.started = service.reactor.seconds()
        self.calling_ae = ""
        self.called_ae = ""
        self.outbox: deque[_Slot] = deque()
        self.store: _Store | None = None
        self.writers: set = set()
        self.release_requested = False
        self.instances = 0
        self.bytes = 0
        self.failures = 0
        self.outcome = "connection closed before association"
        self.result = "lost"  # released | aborted | rejected | lost
        self.reject_fields: dict = {}
        self.info: AssociationInfo | None = None  # set once accepted
        self.end_notified = False
        self.recording_release = False  # waiting for the observers to record the release
        self.holding = False  # reading paused while the disk catches up
        self._deadline = None  # our own answers' timer (_check_owed)

    # ---- association establishment ------------------------------------

    def associate_indication(self, rq: P.AssociateRQ):
        config = self.config
        self.calling_ae, self.called_ae = rq.calling_ae, rq.called_ae
        if self.tls:
            self.tls_subject = self.provider.peer_certificate_subject()
        reject = policy.check_association(
            config, rq, peer_host=self.provider.peer_host, tls=self.tls,
            active=len(self.service.active), congestion=self.service.congestion,
            index_trouble=self.service.index_trouble,
        )
        if reject is not None:
            self.outcome = f"rejected: {reject.describe()}"
            self.result = "rejected"
            self.reject_fields = {"reject_result": reject.result, "reject_source": reject.source,
                                  "reject_reason": reject.reason}
            self.provider.reject(reject.rj)
            return
        self.ae = config.ae_named(rq.called_ae)

        results = []
        for pc in rq.presentation_contexts:
            result, ts = policy.negotiate(self.ae, pc)
            results.append(P.PresentationContextAC(pc.id, result, ts))
            if result == P.PC_ACCEPTANCE:
                self.contexts[pc.id] = (pc.abstract_syntax, ts)
        accepted = {a for a, _ in self.contexts.values()}
        ui = rq.user_information
        roles = tuple(
            P.RoleSelection(r.sop_class_uid, r.scu_role, 0)
            for r in ui.role_selections
            if r.sop_class_uid in accepted
        )
        ac = P.AssociateAC(
            called_ae=rq.called_ae,
            calling_ae=rq.calling_ae,
            presentation_contexts=tuple(results),
            user_information=P.UserInformation(
                max_length=config.gateway.max_pdu_length,
                implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                implementation_version_name=config.gateway.implementation_version_name,
                async_ops=(1, 1) if ui.async_ops is not None else None,
                role_selections=roles,
            ),
        )
        self.outcome = "accepted"
        self.info = AssociationInfo(self.id, self.calling_ae, self.called_ae, self.provider.peer,
                                    self.started)
        self.service.active.add(self)
        self.provider.accept(ac)

    # ---- data transfer ---------------------------------------------------

    def command_received(self, cmd: C.Command, context_id: int):
        field = cmd.command_field
        if field == C.C_STORE_RQ:
            self._begin_store(cmd, context_id)
        elif field == C.C_ECHO_RQ:
            slot = self._slot(cmd, context_id)
            slot.response = C.c_echo_rsp(cmd, C.SUCCESS)
            self._flush()
        elif field == C.C_CANCEL_RQ:
            pass  # nothing of ours is cancellable
        elif cmd.is_response:
            # The SCP asked nothing.  Queued with no answer to give, it would
            # hold back every later response, and the DIMSE timer would wait
            # for ever.
            self.dimse_error(f"DIMSE: unexpected {cmd.name} (0x{field:04X}) from the peer: "
                                 "this gateway sent it no request")
        else:
            slot = self._slot(cmd, context_id)
            slot.response = C.failure_response(cmd, C.UNRECOGNIZED_OPERATION)
            if cmd.has_dataset:
                self.store = _Store(slot, None, C.UNRECOGNIZED_OPERATION)
            self.log.warn(
                "association {association}: {calling_ae} sent unsupported DIMSE command 0x{field:04x}",
                association=self.id, calling_ae=self.calling_ae, field=field,
            )
            if not cmd.has_dataset:
                self._flush()

    def _begin_store(self, cmd, context_id):
        slot = self._slot(cmd, context_id)
        if not cmd.has_dataset:
            slot.response = C.c_store_rsp(cmd, C.CANNOT_UNDERSTAND, "C-STORE-RQ without a data set")
            self._flush()
            return
        abstract, ts = self.contexts[context_id]
        sop_class = cmd.affected_sop_class_uid or ""
        sop_instance = cmd.affected_sop_instance_uid or ""
        if not is_valid_uid(sop_class) or not is_valid_uid(sop_instance):
            self.store = _Store(slot, None, C.CANNOT_UNDERSTAND,
                                f"invalid SOP Class/Instance UID {sop_class!r} / {sop_instance!r}")
            return
        if sop_class != abstract:
            # The file's meta would name one class and the negotiation another.
            self.store = _Store(slot, None, C.SOP_CLASS_NOT_SUPPORTED,
                                f"SOP Class {sop_class} on a context negotiated for {abstract}")
            return
        if self.ae is not None and (abstract in self.ae.ignored_sop_classes
                                    or sop_class in self.ae.ignored_sop_classes):
            # Accepted and answered Success, but not stored (ignored SOP class).
            self.ignored += 1
            self.store = _Store(slot, None, C.SUCCESS)
            return
        if self.service.congestion:
            self.store = _Store(slot, None, C.OUT_OF_RESOURCES, f"storage: {self.service.congestion}")
            return
        try:
            writer = self.service.storage.begin(
                called_ae=self.called_ae, calling_ae=self.calling_ae, sop_class_uid=sop_class,
                sop_instance_uid=sop_instance, transfer_syntax_uid=ts,
            )
        except ValueError as e:
            self.store = _Store(slot, None, C.CANNOT_UNDERSTAND, str(e))
            return
        writer.on_drained = self._drained
        self.writers.add(writer)
        self.store = _Store(slot, writer)

    def data_received(self, data, last: bool):
        store = self.store
        if store is None:  # the assembler guarantees a command came first
            return
        writer = store.writer
        if writer is not None:
            writer.write(data)
            if writer.pending > HIGH_WATER and not self.holding:
                self.holding = True  # the peer now waits for our disk
                self.provider.pause()
                self._check_owed()
        if last:
            self.store = None
            if store.slot.response is not None:  # a request we refuse: its answer is ready
                self._flush()
            elif writer is None:
                self._answer_store(store.slot, store.status, store.comment)
            else:
                writer.finish(self._finished, store.slot, writer)
            self._check_owed()

    def _finished(self, outcome, slot, writer):
        self.writers.discard(writer)
        if type(outcome) is not StoredInstance:
            self._store_failed(outcome, slot)
        else:
            self._stored(outcome, slot)
        if self.holding:
            self._drained(writer)

    def _stored(self, stored, slot):
        self.instances += 1
        self.bytes += stored.dataset_size
        if stored.replaced:
            self.log.info(
                "association {association}: instance {sop_instance_uid} received again; "
                "the earlier copy was replaced",
                association=self.id, sop_instance_uid=stored.sop_instance_uid,
            )
        service = self.service
        service.metrics.instance_stored(self.called_ae, stored.dataset_size,
                                        service.reactor.seconds() - slot.started)
        # Success only once every observer (the index) has the instance.
        d = service.notify("instance_stored", stored, self.info)
        if d is None:
            self._answer_store(slot, C.SUCCESS)
        else:
            d.addCallbacks(lambda _: self._answer_store(slot, C.SUCCESS), self._observer_failed,
                           errbackArgs=(slot,))

    def _observer_failed(self, failure, slot):
        self.log.failure("association {association}: an observer failed on {sop_instance_uid}",
                         failure, association=self.id,
                         sop_instance_uid=slot.command.affected_sop_instance_uid)
        self._answer_store(slot, C.PROCESSING_FAILURE, "could not index the instance")

    def _store_failed(self, error, slot):
        status = store_failure_status(error)
        if status is None:
            return  # discarded because the association went away
        if isinstance(error, StorageFull):
            self.service.storage_full(str(error))
        self.log.error(
            "association {association}: could not store {sop_instance_uid} from {calling_ae}: {error}",
            association=self.id, sop_instance_uid=slot.command.affected_sop_instance_uid,
            calling_ae=self.calling_ae, error=error,
        )
        self._answer_store(slot, status, "could not store the instance")

    def _answer_store(self, slot, status, comment=None):
        if status != C.SUCCESS:
            self.failures += 1
            self.log.info(
                "association {association}: C-STORE of {sop_instance_uid} answered 0x{status:04x}",
                event="instance.failed", association=self.id, called_ae=self.called_ae,
                calling_ae=self.calling_ae, sop_instance_uid=slot.command.affected_sop_instance_uid,
                status=status,
            )
        slot.response = C.c_store_rsp(slot.command, status, comment[:64] if comment else None)
        self._flush()

    def _slot(self, cmd, context_id) -> _Slot:
        slot = _Slot(cmd, context_id, self.service.reactor.seconds())
        self.outbox.append(slot)
        return slot

    def _flush(self):
        outbox = self.outbox
        while outbox and outbox[0].response is not None:
            slot = outbox.popleft()
            self.send_command(slot.context_id, slot.response)
        if self.release_requested and not outbox and self.store is None:
            self.release_requested = False
            # The release response waits until the observers have recorded it.
            self.end_notified = True
            self.recording_release = True
            d = self.service.notify("association_released", self.info)
            if d is None:
                self._released(None)
            else:
                d.addCallbacks(self._released, self._release_failed)
        self._check_owed(progress=True)

    def _released(self, _):
        self.recording_release = False
        self._check_owed()
        self.service.active.discard(self)
        self.provider.release_response()

    def _release_failed(self, failure):
        self.recording_release = False
        self._check_owed()
        self.log.failure("association {association}: an observer failed on release", failure,
                         association=self.id)
        self.result = "aborted"
        self.outcome = "aborted by us: could not record the release"
        self.provider.abort(why="could not record the release")

    def _drained(self, _writer):
        if self.holding and sum(w.pending for w in self.writers) < LOW_WATER:
            self.holding = False
            self.provider.resume()
        self._check_owed(progress=True)  # the disk got on

    def owes_response(self) -> bool:
        """A response waits on our side: a request fully received and not yet
        answered (a store being written), the release being recorded, or the
        peer held back while the disk catches up.  The request whose data set
        is still arriving is otherwise the peer's turn."""
        if self.recording_release or self.holding:
            return True
        outbox = self.outbox
        return bool(outbox) and (self.store is None or outbox[0] is not self.store.slot)

    def _check_owed(self, progress: bool = False):
        """Keep the deadline for our own answers: what we owe must be ready
        within the DIMSE timeout, counted from the last answer that left."""
        owed = self.owes_response()
        timer = self._deadline
        if timer is not None and (progress or not owed):
            if timer.active():
                timer.cancel()
            self._deadline = timer = None
        if owed and timer is None and self.config.timeouts.dimse:
            self._deadline = self.service.reactor.callLater(self.config.timeouts.dimse, self._overdue)

    def _overdue(self):
        self._deadline = None
        limit = self.config.timeouts.dimse
        self.log.error("association {association} from {peer}: no answer was ready within {limit:g} s "
                       "(storage or index too slow); aborting", association=self.id,
                       peer=self.provider.peer, limit=limit)
        self.result = "aborted"
        self.outcome = f"aborted by us: no answer ready within {limit:g} s"
        self.provider.abort(why=self.outcome, now=True)

    # ---- release and abort -------------------------------------------------

    def release_indication(self, collision):
        if not self.assembler.idle:
            # A message half sent can never be finished now (more P-DATA is a
            # protocol error once release is asked, PS3.8 AA-8 in Sta8), and
            # its request never answered: end it all.
            self.dimse_error("A-RELEASE-RQ in the middle of a DIMSE message")
            return
        self.outcome = "released"
        self.result = "released"
        self.release_requested = True
        self._flush()

    def aborted(self, indication):
        # The association is over: its max_associations slot is free now, not
        # once the peer has closed the connection (ARTIM bounds that).
        self.service.active.discard(self)
        self.result = "aborted" if indication.local or not indication.provider else "lost"
        if indication.local:
            self.outcome = f"aborted by us: {indication.detail or 'protocol error'}"
        elif indication.provider:
            self.outcome = f"lost: {indication.detail or 'provider abort'}"
        else:
            self.outcome = f"aborted by the peer (source {indication.source}, reason {indication.reason})"
        self._discard_all()

    def dimse_error(self, detail):
        self.log.warn("association {association} from {peer}: {detail}; aborting",
                      association=self.id, peer=self.provider.peer, detail=detail)
        super().dimse_error(detail)

    def _discard_all(self):
        for writer in self.writers:
            writer.discard()
        self.writers.clear()
        self.store = None
        self.outbox.clear()
        self.recording_release = False
        self._check_owed()

    def closed(self, reason):
        self._discard_all()
        if self.info is not None and not self.end_notified:
            self.end_notified = True
            result = self.result if self.result in ("aborted", "lost") else "lost"
            d = self.service.notify("association_ended", self.info, result)
            if d is not None:
                d.addErrback(lambda f: self.log.failure("association {association}: an observer failed", f,
                                                        association=self.id))
        self.service.active.discard(self)
        if self.outcome == "accepted":
            self.outcome = "connection closed without release"
        elif self.provider.disconnect_reason and self.outcome.startswith("connection closed"):
            self.outcome = self.provider.disconnect_reason
        duration = self.service.reactor.seconds() - self.started
        self.log.info(
            "association {association} {calling_ae} -> {called_ae} from {peer}{via}: "
            "{instances} instance(s), {bytes} bytes, {failures} failure(s), {ignored} ignored "
            "in {duration:.3f} s; {outcome}",
            event="association.closed", result=self.result,
            association=self.id, calling_ae=self.calling_ae or "-", called_ae=self.called_ae or "-",
            peer=self.provider.peer, instances=self.instances, bytes=self.bytes,
            failures=self.failures, duration=duration, outcome=self.outcome,
            ignored=self.ignored, tls=self.tls, tls_subject=self.tls_subject,
            via=(f" over TLS ({self.tls_subject or 'no client certificate'})" if self.tls else ""),
            **self.reject_fields,
        )
