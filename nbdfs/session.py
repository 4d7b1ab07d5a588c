"""What a handshake produces: the export as the server described it, the session that
entered transmission on it, and the geometry every request to it must have.

Plain values, with no I/O, kept apart from the handshake's state machine as h11 keeps its
events apart from its connection: every layer above the handshake uses these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .wire import DEFAULT_MAX_PAYLOAD, TransmissionFlag

CACHE_BLOCK = 32 * 1024  # the block cache's granularity, before the export's constraints


class TlsMode(enum.Enum):
    """What the user asked for: never, when the server offers it, or always."""

    DISABLE = "disable"
    ALLOW = "allow"
    REQUIRE = "require"


@dataclass(frozen=True, slots=True)
class BlockSize:
    """An export's size constraints ("Size constraints")."""

    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True, slots=True)
class Export:
    """What the server told us about one export."""

    name: str
    size: int | None = None  # None: the server would not say (no NBD_OPT_INFO, or TLS-only)
    flags: TransmissionFlag = TransmissionFlag(0)
    description: str | None = None
    block_size: BlockSize | None = None
    tls_required: bool = False  # SELECTIVETLS: the server wants TLS before saying more

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.READ_ONLY)


@dataclass(frozen=True, slots=True)
class Session:
    """The outcome of a handshake that entered the transmission phase."""

    export: Export
    structured_replies: bool
    meta_contexts: dict[str, int] = field(default_factory=dict)
    tls: bool = False
    # True when GO carried an NBD_INFO_BLOCK_SIZE request: we then MUST honour the constraints.
    block_size_requested: bool = False


@dataclass(frozen=True, slots=True)
class Listing:
    exports: list[Export]
    tls: bool


@dataclass(frozen=True, slots=True)
class Geometry:
    """The shape of every request to one export, derived once from its session and used by
    the protocol core (which enforces it) and by the I/O layer (which obeys it).

    ``minimum`` is the server's minimum block if GO asked for block sizes (then it MUST be
    honoured) and 1 otherwise; ``maximum`` the largest payload, a multiple of ``minimum``;
    ``cache_block`` the cache's granularity, a power of two, at least ``minimum`` and at
    most ``maximum`` (unless ``minimum`` is larger); ``sector`` what a read at random
    fetches at least: a page, or the minimum block, within one cache block.
    """

    size: int
    minimum: int
    maximum: int
    cache_block: int
    sector: int

    @classmethod
    def of(cls, session: Session, cache_block: int = CACHE_BLOCK) -> Geometry:
        export = session.export
        block = export.block_size
        minimum = block.minimum if block and session.block_size_requested else 1
        maximum = min(block.maximum if block else DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_PAYLOAD)
        maximum = max(maximum - maximum % minimum, minimum)
        cb = max(min(cache_block, 1 << (maximum.bit_length() - 1)), minimum)
        return cls(export.size or 0, minimum, maximum, cb, min(max(minimum, 4096), cb))
