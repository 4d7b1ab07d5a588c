"""Every NBD wire constant and fixed-size layout, named as in proto.md without ``NBD_``.

Nothing here does I/O or holds state; the sans-IO modules (:mod:`nbdfs.handshake`,
:mod:`nbdfs.transmission`) and the shells import from this one place, so a reader can grep
the spec for any name used in the code.
"""

from __future__ import annotations

import enum
import struct

# Magics ("Handshake", "Request message", "Simple reply", "Structured reply chunk").
INIT_PASSWD = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # newstyle magic, also the option request magic
CLISERV_MAGIC = 0x00420281861253  # oldstyle negotiation
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C  # experimental; never negotiated by us

DEFAULT_PORT = 10809

# Layouts (network byte order).
GREETING = struct.Struct(">QQ")  # INIT_PASSWD, IHAVEOPT or CLISERV_MAGIC
HANDSHAKE_FLAGS = struct.Struct(">H")
CLIENT_FLAGS = struct.Struct(">I")
OLDSTYLE_REST = struct.Struct(">QI124x")  # size, flags, zeroes (after GREETING)
OPTION_REQUEST = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeroes maybe)
EXPORT_NAME_ZEROES = 124
INFO_EXPORT = struct.Struct(">HQH")  # info type, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # info type, minimum, preferred, maximum
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
STRUCTURED_REPLY_OFFSET = struct.Struct(">IHHQIQ")  # the same, and an OFFSET_DATA chunk's offset
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
OFFSET_HOLE = struct.Struct(">QI")  # offset, hole size
ERROR_HEAD = struct.Struct(">IH")  # error, message length
EXTENT = struct.Struct(">II")  # length, status flags


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ERROR_BIT = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR_BIT + 1
    ERR_POLICY = REP_ERROR_BIT + 2
    ERR_INVALID = REP_ERROR_BIT + 3
    ERR_PLATFORM = REP_ERROR_BIT + 4
    ERR_TLS_REQD = REP_ERROR_BIT + 5
    ERR_UNKNOWN = REP_ERROR_BIT + 6
    ERR_SHUTDOWN = REP_ERROR_BIT + 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT + 8
    ERR_TOO_BIG = REP_ERROR_BIT + 9
    ERR_EXT_HEADER_REQD = REP_ERROR_BIT + 10


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_ERROR_BIT = 1 << 15


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = REPLY_TYPE_ERROR_BIT + 1
    ERROR_OFFSET = REPLY_TYPE_ERROR_BIT + 2


class StateFlag(enum.IntFlag):
    """Flags of the ``base:allocation`` metadata context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class Errno(enum.IntEnum):
    """The error values of "Error values"."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# Limits. Each is a bound on what a server may make us buffer or believe.
MAX_STRING = 4096  # "Conventions": a string MUST be no longer than 4096 bytes
# Largest option reply we accept: an NBD_REP_SERVER with a name and a description, each a
# string, plus its 4-byte length; every other reply is smaller.
MAX_OPTION_REPLY = 4 + 2 * MAX_STRING
MAX_EXPORTS = 100_000  # NBD_REP_SERVER replies to one NBD_OPT_LIST before we call it abuse
MAX_META_CONTEXTS = 64  # NBD_REP_META_CONTEXT replies to one SET_META_CONTEXT
# "Size constraints": payloads up to 2^25 are never a denial of service; the default
# maximum a client desiring interoperability should use when none is advertised.
DEFAULT_MAX_PAYLOAD = 1 << 25
MAX_MIN_BLOCK = 1 << 16  # "MUST NOT be larger than 2^16"
MAX_EXTENTS = 1 << 20  # "SHOULD NOT send more than 2^20 extents in a single reply chunk"
META_CONTEXT_ALLOCATION = "base:allocation"
