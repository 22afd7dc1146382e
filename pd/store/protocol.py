"""What a ``StoreClient`` and the node's store process say to each other.

One ZMQ multipart message per request and per reply: frame 0 is an envelope (msgpack),
then one frame per payload, sent and received without copying (``copy=False``):

- ``Put``: one payload frame per block hash, in order;
- ``GetReply``: one payload frame per ``True`` in ``found``, in order.

The envelope carries the protocol version, so a client and a server from different pd
versions refuse each other's messages (an ``Error`` reply, which the client treats as a
miss) instead of misreading them, and the caller's pid, which keeps the server alive
while its clients live (``pd.store.server``). A namespace crosses as its 32-byte digest;
only ``Register`` sends the whole ``StoreNamespace`` (for the disk tier's
``namespace.json``).
"""

from __future__ import annotations

import msgspec

from pd.store.keys import StoreNamespace
from pd.store.stats import StoreStats

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A message that is garbage, of another protocol version, or of the wrong kind."""


# --- requests ---------------------------------------------------------------------------


class Ping(msgspec.Struct, tag=True):
    """Is a store serving? (``pd.store.spawn``); the reply carries the server's pid."""


class Register(msgspec.Struct, tag=True):
    namespace: StoreNamespace


class Lookup(msgspec.Struct, tag=True):
    namespace: bytes  # StoreNamespace.digest
    block_hashes: list[bytes]


class Get(msgspec.Struct, tag=True):
    namespace: bytes
    block_hashes: list[bytes]


class Put(msgspec.Struct, tag=True):
    namespace: bytes
    block_hashes: list[bytes]  # followed by one payload frame each


class Stats(msgspec.Struct, tag=True):
    pass


Request = Ping | Register | Lookup | Get | Put | Stats


# --- replies ----------------------------------------------------------------------------


class Ok(msgspec.Struct, tag=True):
    server_pid: int


class LookupReply(msgspec.Struct, tag=True):
    host_blocks: int
    disk_blocks: int


class GetReply(msgspec.Struct, tag=True):
    found: list[bool]  # followed by one payload frame per True


class PutReply(msgspec.Struct, tag=True):
    stored: int


class StatsReply(msgspec.Struct, tag=True):
    stats: StoreStats


class Error(msgspec.Struct, tag=True):
    reason: str


Reply = Ok | LookupReply | GetReply | PutReply | StatsReply | Error


# --- envelopes --------------------------------------------------------------------------


class _Envelope(msgspec.Struct, array_like=True):
    # The body stays raw until the version is known to match: another version's body
    # may not decode as this version's types at all.
    version: int
    request_id: int
    pid: int  # the sender's; 0 in replies
    body: msgspec.Raw


_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def encode_request(request_id: int, pid: int, body: Request) -> bytes:
    return _encode(request_id, pid, body)


def encode_reply(request_id: int, body: Reply) -> bytes:
    return _encode(request_id, 0, body)


def decode_request(data: bytes | memoryview) -> tuple[int, int, Request]:
    """``(request_id, pid, body)``; raises ``ProtocolError``."""
    envelope = _decode_envelope(data)
    try:
        body = _request_decoder.decode(envelope.body)
    except (msgspec.DecodeError, ValueError) as e:
        raise ProtocolError(f"bad request body: {e}") from None
    return envelope.request_id, envelope.pid, body


def decode_reply(data: bytes | memoryview) -> tuple[int, Reply]:
    """``(request_id, body)``; raises ``ProtocolError``."""
    envelope = _decode_envelope(data)
    try:
        body = _reply_decoder.decode(envelope.body)
    except (msgspec.DecodeError, ValueError) as e:
        raise ProtocolError(f"bad reply body: {e}") from None
    return envelope.request_id, body


def _encode(request_id: int, pid: int, body: Request | Reply) -> bytes:
    raw = msgspec.Raw(_encoder.encode(body))
    return _encoder.encode(_Envelope(PROTOCOL_VERSION, request_id, pid, raw))


def _decode_envelope(data: bytes | memoryview) -> _Envelope:
    try:
        envelope = _envelope_decoder.decode(data)
    except (msgspec.DecodeError, ValueError) as e:
        raise ProtocolError(f"bad envelope: {e}") from None
    if envelope.version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {envelope.version}, this side speaks {PROTOCOL_VERSION}"
        )
    return envelope
