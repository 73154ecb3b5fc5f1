"""DIMSE messages over presentation data values, sans-I/O.

Pure: no I/O, no Twisted.

A DIMSE message is a command set, optionally followed by a data set, both
carried in P-DATA-TF PDUs as presentation data value (PDV) fragments
(PS3.7 section 6.3.1 and Annex E; PS3.8 section 9.3.5 and Annex E.2).  Each
PDV has a message control header: bit 0 set for a command fragment, clear
for a data set fragment; bit 1 set on the last fragment of the command or of
the data set.  All fragments of one message use the same presentation
context, and a data set follows its command only when the command's Command
Data Set Type (0000,0800) says so.

Receiving: :class:`MessageAssembler` turns the pieces of PDV data the upper
layer streams into calls of its handler.  Command fragments are small and
are joined before decoding; data set fragments are passed on as they arrive
(no buffering, no copy) so that a storage service can stream them to disk.

Sending: :func:`fragment_message` and :func:`fragment_stream` cut a message
into P-DATA-TF PDUs that respect the peer's Maximum Length (PS3.8 D.1).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Union

from gateway.dimse.commands import MAX_COMMAND_LENGTH, DIMSEError, decode_command
from gateway.ul import encode_pdata

__all__ = [
    "MessageAssembler",
    "fragment_message",
    "fragment_stream",
    "pdv_data_limit",
    "UNLIMITED_FRAGMENT_SIZE",
]

# Message control header bits (PS3.8 Annex E.2).
CONTROL_COMMAND = 0x01
CONTROL_LAST = 0x02

#: PDU bytes that are not PDV data: the PDV item length (4), presentation
#: context ID (1) and message control header (1) (PS3.8 Table 9-23).  The
#: peer's Maximum Length counts the PDU variable field, i.e. these plus the
#: data but not the 6-byte PDU header (PS3.8 D.1.1).
PDV_OVERHEAD = 6

#: Fragment size used when the peer announced no limit (Maximum Length 0).
UNLIMITED_FRAGMENT_SIZE = 1 << 20

Buffer = Union[bytes, bytearray, memoryview]


# ---------------------------------------------------------------------------
# Receiving
# ---------------------------------------------------------------------------


class MessageAssembler:
    """Reassembles DIMSE messages from the PDV data of one association.

    :meth:`pdv` takes every piece of PDV data received, in order (it is what
    the upper layer's sink calls).  When the last command fragment is in,
    ``handler.command_received(command, context_id)`` is called; if that
    command announced a data set, ``handler.data_received(data, last)``
    follows for each piece of it as it arrives: no buffering, no copy
    (``data`` is a view of the received bytes, valid during the call).

    A PDV that breaks the message structure of PS3.7 6.3.1 / PS3.8 Annex E,
    or a command set that is too large or cannot be decoded, calls
    ``handler.dimse_error(detail)``, once: the association must be aborted,
    and every later piece is ignored.
    """

    def __init__(self, handler, contexts=None) -> None:
        self._handler = handler
        # The presentation context ids this association negotiated (any
        # container, read at each PDV, so it may be filled in later); a PDV
        # on any other context breaks the association.  None: no check.
        self._contexts = contexts
        self._command = bytearray()  # command fragments received so far
        self._command_context: Optional[int] = None  # set while collecting
        self._dataset_context: Optional[int] = None  # set while a data set is due
        self._last_had_no_dataset = False  # only to word errors precisely
        self._failed = False
        self._inside = False  # between the first and the last piece of a PDV
        self._is_data = False  # that PDV is a data set fragment

    @property
    def idle(self) -> bool:
        """True between messages (no command or data set half received)."""
        return self._command_context is None and self._dataset_context is None

    @property
    def expecting_dataset(self) -> bool:
        """True once a command announced a data set, until its last fragment."""
        return self._dataset_context is not None

    def pdv(self, context_id: int, control: int, data: Buffer, end: bool) -> None:
        """A piece of the data of one PDV; ``end`` on the PDV's last piece.

        A PDV is checked at its first piece; the pieces after it go
        straight on.
        """
        if self._failed:
            return
        if self._inside:
            is_data = self._is_data
        else:
            try:
                is_data = self._is_data = self._check(context_id, control)
            except DIMSEError as e:
                self._fail(e)
                return
        self._inside = not end
        if is_data:
            last = end and bool(control & CONTROL_LAST)
            if last:
                self._dataset_context = None
                self._last_had_no_dataset = False
            self._handler.data_received(data, last)
            return
        # Check the cap before appending: a peer never makes us hold more.
        if len(self._command) + len(data) > MAX_COMMAND_LENGTH:
            self._fail(DIMSEError(f"command set exceeds {MAX_COMMAND_LENGTH} bytes"))
            return
        self._command += data
        if end and control & CONTROL_LAST:
            self._command_complete()

    def _fail(self, error: DIMSEError) -> None:
        self._failed = True
        self._inside = False
        self._handler.dimse_error(f"DIMSE: {error}")

    def _check(self, context_id: int, control: int) -> bool:
        """Whether a new PDV may come now; True for a data set fragment."""
        if self._contexts is not None and context_id not in self._contexts:
            raise DIMSEError(f"PDV on presentation context {context_id}, which was not negotiated")
        if control & CONTROL_COMMAND:
            if self._dataset_context is not None:
                raise DIMSEError(
                    f"command PDV on context {context_id} while the data set of the "
                    f"previous command on context {self._dataset_context} is incomplete"
                )
            if self._command_context is not None and context_id != self._command_context:
                raise DIMSEError(
                    f"command fragment on context {context_id} inside a command "
                    f"on context {self._command_context}"
                )
            self._command_context = context_id
            return False
        if self._dataset_context is None:
            if self._command_context is not None:
                reason = "data set PDV before the last fragment of its command"
            elif self._last_had_no_dataset:
                reason = "data set PDV after a command announcing no data set"
            else:
                reason = "data set PDV without a preceding command"
            raise DIMSEError(f"{reason} (context {context_id})")
        if context_id != self._dataset_context:
            raise DIMSEError(
                f"data set PDV on context {context_id} for a command "
                f"received on context {self._dataset_context}"
            )
        return True

    def _command_complete(self) -> None:
        context_id = self._command_context
        try:
            command = decode_command(self._command)
        except DIMSEError as e:
            self._fail(e)
            return
        finally:
            self._command = bytearray()
            self._command_context = None
        if command.has_dataset:
            self._dataset_context = context_id
        self._last_had_no_dataset = not command.has_dataset
        self._handler.command_received(command, context_id)


# ---------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------


def pdv_data_limit(max_pdu_length: int) -> int:
    """Most data bytes one PDV may carry in a PDU of the peer's Maximum Length.

    ``max_pdu_length`` is the Maximum Length Received the peer announced in
    its User Information (PS3.8 D.1); 0 means unlimited, in which case
    fragments of :data:`UNLIMITED_FRAGMENT_SIZE` bytes are used.
    """
    if max_pdu_length == 0:
        return UNLIMITED_FRAGMENT_SIZE
    if max_pdu_length <= PDV_OVERHEAD:
        raise ValueError(f"maximum PDU length {max_pdu_length} leaves no room for data")
    return min(max_pdu_length - PDV_OVERHEAD, 0xFFFFFFFF - PDV_OVERHEAD)


def _byte_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _fragments(context_id: int, data: Buffer, limit: int, kind: int) -> Iterator[bytes]:
    """PDUs for one command or data set held in memory; slices, no copies."""
    view = _byte_view(data)
    size = len(view)
    start = 0
    while True:
        end = start + limit
        if end >= size:
            yield encode_pdata(context_id, kind | CONTROL_LAST, view[start:])
            return
        yield encode_pdata(context_id, kind, view[start:end])
        start = end


def fragment_message(
    context_id: int,
    command_bytes: Buffer,
    max_pdu_length: int,
    dataset: Optional[Buffer] = None,
) -> Iterator[bytes]:
    """Yield the P-DATA-TF PDUs of one DIMSE message, one PDV each.

    The encoded command set is cut into command fragments, then ``dataset``
    (if given) into data set fragments, each at most
    ``pdv_data_limit(max_pdu_length)`` bytes, the last of each marked with
    the "last" bit (PS3.8 Annex E.2).  An empty data set still gets one
    (empty) last fragment.
    """
    limit = pdv_data_limit(max_pdu_length)
    yield from _fragments(context_id, command_bytes, limit, CONTROL_COMMAND)
    if dataset is not None:
        yield from _fragments(context_id, dataset, limit, 0)


def fragment_stream(
    context_id: int, chunks: Iterable[Buffer], max_pdu_length: int
) -> Iterator[bytes]:
    """Yield the data set PDUs for a data set read in chunks (e.g. a file).

    Chunks of any size are re-cut to full-size fragments of
    ``pdv_data_limit(max_pdu_length)`` bytes; only the final fragment may be
    shorter, and it alone carries the "last" bit, so a fragment is held back
    until the next non-empty chunk (or the end of ``chunks``) shows whether
    more data follows.  Send the command first (``fragment_message`` with no
    data set).

    Each chunk is consumed before the next one is requested, except for a
    tail of fewer than ``limit`` bytes that is copied, so the caller may
    reuse its chunk buffer.  Empty chunks are skipped; no chunks at all give
    one empty last fragment.
    """
    limit = pdv_data_limit(max_pdu_length)
    carry = bytearray()  # data not yet sent: at most `limit` bytes
    for chunk in chunks:
        # Our own view, released when done with the chunk, so the caller is
        # free to resize its buffer once it is asked for the next chunk.
        with memoryview(chunk) as raw:
            view = _byte_view(raw)
            try:
                if not view:
                    continue
                pos = 0
                if carry:
                    # More data follows `carry` now: it goes once it is full.
                    take = min(limit - len(carry), len(view))
                    carry += view[:take]
                    pos = take
                    if pos == len(view):
                        continue  # chunk used up; is carry last? not known yet
                    yield encode_pdata(context_id, 0, carry)
                    carry = bytearray()
                # Whole fragments straight from the chunk, keeping at least
                # one byte back: the fragment that turns out to be the last
                # must not be sent before we know it is.
                while len(view) - pos > limit:
                    yield encode_pdata(context_id, 0, view[pos : pos + limit])
                    pos += limit
                carry = bytearray(view[pos:])
            finally:
                if view is not raw:
                    view.release()
    yield encode_pdata(context_id, CONTROL_LAST, carry)
