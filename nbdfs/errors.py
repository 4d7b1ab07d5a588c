"""The one exception tree of nbdfs, and the NBD error value → errno mapping.

Every error a user or a server can cause is an :class:`NbdError`; its ``str()`` is one line
that says what happened and, where there is something to do, what to do next. Each layer
raises its own kind and the CLI prints it without a traceback.
"""

from __future__ import annotations

import errno as _errno

from .wire import Errno


class NbdError(Exception):
    """Base of every error nbdfs reports to a user."""

    exit_code = 1  # the server, the network or the system said no


class UsageError(NbdError):
    """A command line, TARGET or option that cannot be used."""

    exit_code = 2


class ProtocolError(NbdError):
    """The server sent something the NBD protocol does not allow (a "remote" error).

    The connection it came on is unusable afterwards: the byte stream can no longer be
    trusted to be in step.
    """


class LocalProtocolError(NbdError):
    """We were asked to send something the protocol or the export does not allow."""


class ConnectError(NbdError):
    """No NBD session could be set up (network, handshake or policy)."""


class ExportNotFound(ConnectError):
    """The server has no export by that name (or will not say so without TLS)."""


class TlsError(ConnectError):
    """TLS could not be negotiated as the user asked."""


class OptionError(ConnectError):
    """The server refused an option for a reason we cannot work around."""

    def __init__(self, message: str, reply: int, server_message: str = "") -> None:
        super().__init__(message + (f" (server says: {server_message})" if server_message else ""))
        self.reply = reply
        self.server_message = server_message


class TargetError(UsageError):
    """A TARGET (host, host:port or NBD URI) that cannot be used."""


class MountError(NbdError):
    """The mount itself failed (mountpoint, FUSE, the daemon)."""


class RequestTimeout(NbdError):
    """A request got no answer within ``--timeout``."""


class ExportChanged(NbdError):
    """A different export is behind the same name: the export fails for good."""


class ReadFailed(NbdError):
    """A read of a block failed (another reader's fetch reported it)."""


class PkiError(NbdError):
    """The certificate directory cannot be created as asked."""


class ConnectionLost(NbdError):
    """The connection closed or broke while a request was waiting for its reply."""


class CommandError(NbdError):
    """The server answered a transmission request with an error value."""

    def __init__(self, error: int, message: str = "") -> None:
        self.errno = to_errno(error)
        self.nbd_error = error
        text = _errno.errorcode.get(self.errno, str(self.errno))
        super().__init__(f"server error {text}" + (f": {message}" if message else ""))


def to_errno(nbd_error: int) -> int:
    """Map an NBD error value to the local errno.

    "Error values": the defined values are Linux's errno numbers; the client SHOULD treat an
    unexpected value as NBD_EINVAL.
    """
    try:
        return {
            Errno.EPERM: _errno.EPERM,
            Errno.EIO: _errno.EIO,
            Errno.ENOMEM: _errno.ENOMEM,
            Errno.EINVAL: _errno.EINVAL,
            Errno.ENOSPC: _errno.ENOSPC,
            Errno.EOVERFLOW: _errno.EOVERFLOW,
            Errno.ENOTSUP: _errno.ENOTSUP,
            Errno.ESHUTDOWN: _errno.ESHUTDOWN,
        }[Errno(nbd_error)]
    except ValueError:
        return _errno.EINVAL
