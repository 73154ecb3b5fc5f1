"""The floor: the least a Twisted receiver must do to store what storescu sends.

    python -m bench.floor PORT STORE_DIR [--digest none|sha256|blake3] [--rename reactor|thread]
                                         [--tls CERT KEY]

One process, one reactor thread: it frames PDUs, accepts every presentation
context with its first transfer syntax, writes each data set's PDV payloads
behind a File Meta Information header to a temporary file as they arrive,
renames the file into place and answers Success; it answers A-RELEASE-RQ.
No validation, no timers, no index, no logs: whatever the gateway spends
beyond this on the same machine is its own overhead.  ``--digest`` hashes
every byte inline; ``--rename thread`` puts close and rename in a worker
thread (one hand-off per instance, as the gateway does), ``reactor`` does them
inline.  ``--tls`` puts Twisted's TLS (pyOpenSSL, as the gateway uses) under
the same receiver, with the certificate and key given and no client
certificate asked for.  A bench tool only: it trusts its peer completely.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import threading
from queue import SimpleQueue

from twisted.internet.protocol import Factory, Protocol

from gateway.part10 import file_meta

_HEADER = struct.Struct(">BxL")
_ITEM = struct.Struct(">BxH")
_PDV = struct.Struct(">LBB")
_ELEMENT = struct.Struct("<HHL")
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.9.7433.1.1"


def _items(body: bytes, pos: int):
    while pos + 4 <= len(body):
        kind, length = _ITEM.unpack_from(body, pos)
        yield kind, body[pos + 4:pos + 4 + length]
        pos += 4 + length


def associate_ac(rq: bytes) -> bytes:
    """Accept every presentation context of an A-ASSOCIATE-RQ body."""
    items = [_ITEM.pack(0x10, len(b"1.2.840.10008.3.1.1.1")) + b"1.2.840.10008.3.1.1.1"]
    for kind, value in _items(rq, 68):
        if kind != 0x20:
            continue
        ts = next(v for k, v in _items(value, 4) if k == 0x40)
        sub = _ITEM.pack(0x40, len(ts)) + ts
        items.append(_ITEM.pack(0x21, 4 + len(sub)) + bytes([value[0], 0, 0, 0]) + sub)
    user = struct.pack(">BxHL", 0x51, 4, 131072) + _ITEM.pack(0x52, len(IMPLEMENTATION_UID)) + IMPLEMENTATION_UID
    items.append(_ITEM.pack(0x50, len(user)) + user)
    body = rq[:68] + b"".join(items)
    return _HEADER.pack(0x02, len(body)) + body


def command_fields(data: bytes) -> dict:
    fields, pos = {}, 0
    while pos + 8 <= len(data):
        group, element, length = _ELEMENT.unpack_from(data, pos)
        fields[element] = data[pos + 8:pos + 8 + length]
        pos += 8 + length
    return fields


def store_response(context_id: int, fields: dict) -> bytes:
    def element(tag, value):
        return _ELEMENT.pack(0, tag, len(value)) + value
    body = (element(0x0002, fields[0x0002]) + element(0x0100, b"\x01\x80")
            + element(0x0120, fields[0x0110]) + element(0x0800, b"\x01\x01")
            + element(0x0900, b"\x00\x00") + element(0x1000, fields[0x1000]))
    command = element(0x0000, struct.pack("<L", len(body))) + body
    pdv = _PDV.pack(len(command) + 2, context_id, 0x03) + command
    return _HEADER.pack(0x04, len(pdv)) + pdv


class Floor(Protocol):
    """The receiving side of one connection."""

    def __init__(self, server):
        self.server = server
        self.buffer = bytearray()
        self.contexts: dict[int, bytes] = {}
        self.command = bytearray()
        self.fd = -1

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.transport.bufferSize = 256 << 10

    def dataReceived(self, data):
        buf = self.buffer
        buf += data
        pos = 0
        while len(buf) - pos >= 6:
            kind, length = _HEADER.unpack_from(buf, pos)
            if len(buf) - pos - 6 < length:
                break
            body = memoryview(buf)[pos + 6:pos + 6 + length]
            pos += 6 + length
            if kind == 0x04:
                self.pdata(body)
            elif kind == 0x01:
                self.associate(bytes(body))
            elif kind == 0x05:
                self.transport.write(b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00")
            else:
                self.transport.loseConnection()
            body.release()
        del buf[:pos]

    def associate(self, body):
        for kind, value in _items(body, 68):
            if kind == 0x20:
                ts = next(v for k, v in _items(value, 4) if k == 0x40)
                self.contexts[value[0]] = ts.rstrip(b"\0").decode()
        self.transport.write(associate_ac(body))

    def pdata(self, body):
        pos = 0
        while pos < len(body):
            length, context_id, control = _PDV.unpack_from(body, pos)
            value = body[pos + 6:pos + 4 + length]
            pos += 4 + length
            if control & 1:
                self.command += value
                if control & 2:
                    self.begin(context_id, command_fields(bytes(self.command)))
                    self.command.clear()
                continue
            os.write(self.fd, value)
            if self.digest is not None:
                self.digest.update(value)
            if control & 2:
                self.server.finish(self, self.fd, self.tmp, self.final, store_response(context_id, self.fields))

    def begin(self, context_id, fields):
        self.fields = fields
        uid = lambda tag: fields[tag].rstrip(b"\0").decode()
        instance = uid(0x1000)
        self.tmp = os.path.join(self.server.tmp, instance + ".part")
        self.final = os.path.join(self.server.root, instance + ".dcm")
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        self.digest = self.server.new_digest()
        header = file_meta(sop_class_uid=uid(0x0002), sop_instance_uid=instance,
                           transfer_syntax_uid=self.contexts[context_id],
                           implementation_class_uid=IMPLEMENTATION_UID.decode(),
                           implementation_version_name="FLOOR", source_ae_title=None)
        os.write(self.fd, header)
        if self.digest is not None:
            self.digest.update(header)


class Server(Factory):
    """Every connection gets a :class:`Floor`."""

    def __init__(self, reactor, root, digest, rename):
        self.reactor, self.root = reactor, root
        self.tmp = root + ".tmp"  # beside the store, so that it holds instances only
        os.makedirs(self.tmp, exist_ok=True)
        self.new_digest = {"none": lambda: None, "sha256": hashlib.sha256,
                           "blake3": lambda: __import__("blake3").blake3()}[digest]
        if rename == "thread":
            self.jobs = SimpleQueue()
            threading.Thread(target=self.work, daemon=True).start()
            self.finish = self.hand_off

    def buildProtocol(self, addr):
        return Floor(self)

    def finish(self, floor, fd, tmp, final, response):
        os.close(fd)
        os.rename(tmp, final)
        floor.transport.write(response)

    def hand_off(self, floor, fd, tmp, final, response):
        self.jobs.put((floor, fd, tmp, final, response))

    def work(self):
        while True:
            floor, fd, tmp, final, response = self.jobs.get()
            os.close(fd)
            os.rename(tmp, final)
            self.reactor.callFromThread(floor.transport.write, response)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("root")
    parser.add_argument("--digest", choices=("none", "sha256", "blake3"), default="blake3")
    parser.add_argument("--rename", choices=("reactor", "thread"), default="thread")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    server = Server(reactor, os.path.abspath(args.root), args.digest, args.rename)
    if args.tls:
        from twisted.internet import ssl

        with open(args.tls[0]) as cert, open(args.tls[1]) as key:
            options = ssl.PrivateCertificate.loadPEM(cert.read() + key.read()).options()
        reactor.listenSSL(args.port, server, options, interface="127.0.0.1")
    else:
        reactor.listenTCP(args.port, server, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
