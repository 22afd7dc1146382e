"""Wire messages between a decode instance's connector and a prefill instance's.

Every message is a msgspec struct tagged with its type and encoded by one codec
(``encode`` / ``decode``). ``PROTOCOL_VERSION`` travels in the handshake; peers with
a different version refuse each other with a clear error instead of misreading bytes.
"""

from __future__ import annotations

import msgspec

PROTOCOL_VERSION = 2


class RegionSpec(msgspec.Struct, frozen=True):
    """One region of a KV cache: ``num_blocks`` blocks of ``block_nbytes`` bytes."""

    num_blocks: int
    block_nbytes: int


class LayoutSpec(msgspec.Struct, frozen=True):
    """What both sides must agree on for block ids to mean the same bytes."""

    block_size: int
    regions: list[RegionSpec]

    def describe(self) -> str:
        sizes = sorted({r.block_nbytes for r in self.regions})
        return f"{len(self.regions)} regions, block_size={self.block_size}, block bytes {sizes}"


# --- decode -> prefill side channel ---------------------------------------------------


class Hello(msgspec.Struct, tag=True):
    """First contact from a decode worker; answered with ``Welcome``."""

    protocol_version: int
    engine_id: str


class Welcome(msgspec.Struct, tag=True):
    """The prefill worker's identity, KV layout and the transports it serves, best first."""

    protocol_version: int
    engine_id: str
    tp_rank: int
    layout: LayoutSpec
    transports: dict[str, dict[str, str | int]]  # name -> what a reader needs


class Release(msgspec.Struct, tag=True):
    """The decode side is done with a lease (loaded or gave up): free the blocks.

    Names the request, or only the rendezvous when decode gave up before it resolved.
    """

    request_id: str
    loaded: bool
    num_blocks: int = 0  # what the decode side read, for the prefill side's stats
    nbytes: int = 0
    rendezvous: str = ""


class Resolve(msgspec.Struct, tag=True):
    """Which prefill request and blocks hold the prompt sent with ``rendezvous``?

    Asked by a decode worker that got its request at the same time as the prefill
    instance; answered (``Resolved`` or ``Refused``) once that prompt's KV is held.
    """

    rendezvous: str


class Pending(msgspec.Struct, tag=True):
    """Sent to a parked ``Resolve`` now and then: the prefill worker is alive, still working."""

    rendezvous: str


class Resolved(msgspec.Struct, tag=True):
    rendezvous: str
    engine_id: str
    request_id: str
    block_ids: list[int]


class Refused(msgspec.Struct, tag=True):
    """Answer to a message the peer cannot serve, with the reason."""

    reason: str


# --- zmq transport data path ------------------------------------------------------------


class ReadBlocks(msgspec.Struct, tag=True):
    """Ask the prefill worker for the bytes of ``block_ids`` of a leased request."""

    transfer_id: str
    request_id: str
    block_ids: list[int]


class BlocksHeader(msgspec.Struct, tag=True):
    """Precedes the data frames of one ``ReadBlocks`` answer (or says why none come)."""

    transfer_id: str
    status: str  # "ok" or "refused"
    reason: str = ""
    num_frames: int = 0


Message = (
    Hello | Welcome | Release | Resolve | Pending | Resolved | Refused | ReadBlocks | BlocksHeader
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes | memoryview) -> Message:
    """Decode one message; raises ``msgspec.DecodeError`` on garbage."""
    return _decoder.decode(data)
