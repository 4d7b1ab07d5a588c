"""Connections to one export: opened lazily, spread over only when the server allows it.

Decisions are made synchronously (which connection, whether to open one) and I/O is done
outside them, as in httpcore's pool. Rules:

* Up to ``limit`` connections, but just one unless the export advertises
  NBD_FLAG_CAN_MULTI_CONN ("In the absence of this flag, clients SHOULD NOT multiplex their
  commands over more than one connection").
* A request goes to the usable connection with the fewest requests in flight; a new
  connection is opened only when every open one is busy.
* Every connection that carried a write since the last flush is *dirty*; :meth:`flush`
  sends NBD_CMD_FLUSH on each of them. If a dirty connection is lost before its flush, the
  next flush fails with EIO: its writes may not be on stable storage, and we never report
  an fsync that did not happen.
* Every new connection must find the export as the first one did (size, flags, block
  sizes); otherwise a different disk is behind the same name and I/O fails.
* Each request waits at most ``timeout`` seconds (for a connection, for its reply); a
  connection that let a request time out is dropped, since it may be stalled.
* Connections idle for ``idle_timeout`` seconds are flushed and closed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from .connection import Connection
from .errors import ConnectionLost, NbdError
from .handshake import Export
from .target import Target
from .tls import TlsConfig
from .wire import TransmissionFlag

log = logging.getLogger(__name__)
T = TypeVar("T")


class RequestTimeout(NbdError):
    """A request got no answer within ``--timeout``."""


class ExportChanged(NbdError):
    """A new connection found a different export behind the same name."""


@dataclass(slots=True)
class Stats:
    """Counters for ``nbdfs status`` and the logs."""

    connects: int = 0
    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    timeouts: int = 0
    lost: int = 0
    flushes: int = 0


def _identity(export: Export) -> tuple[object, ...]:
    # ROTATIONAL and the like may legitimately differ; what data means must not.
    relevant = TransmissionFlag.READ_ONLY | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
    return export.size, export.flags & relevant, export.block_size


class ExportPool:
    def __init__(
        self,
        target: Target,
        name: str,
        tls: TlsConfig,
        nursery: trio.Nursery,
        *,
        limit: int = 4,
        timeout: float = 60.0,
        idle_timeout: float = 30.0,
    ) -> None:
        self.target = target
        self.name = name
        self.tls = tls
        self.limit = max(1, limit)
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.export: Export | None = None
        self.stats = Stats()
        self._nursery = nursery
        self._conns: list[Connection] = []
        self._last_used: dict[Connection, float] = {}
        self._opening = 0
        self._changed = trio.Event()  # set whenever a connection opens, fails or is dropped
        self._dirty: set[Connection] = set()
        self._lost_unflushed = False
        self._closed = False
        self._reaper_started = False

    # -- choosing and opening connections ------------------------------------------------

    @property
    def connections(self) -> int:
        return len(self._conns)

    def _max_connections(self) -> int:
        if self.export is not None and not self.export.flags & TransmissionFlag.CAN_MULTI_CONN:
            return 1
        return self.limit if self.export is not None else 1  # learn the flags first

    def _prune(self) -> None:
        for conn in [c for c in self._conns if not c.usable]:
            self._conns.remove(conn)
            self._last_used.pop(conn, None)
            if conn in self._dirty:
                self._dirty.discard(conn)
                self._lost_unflushed = True
                log.warning("export %r: a connection with unflushed writes was lost", self.name)
            self.stats.lost += 1
            self._nursery.start_soon(conn.aclose)

    async def _get(self) -> Connection:
        while True:
            if self._closed:
                raise ConnectionLost("the mount is shutting down")
            self._prune()
            best = min(self._conns, key=lambda c: c.in_flight, default=None)
            if best is not None and (
                best.in_flight == 0 or len(self._conns) + self._opening >= self._max_connections()
            ):
                return best
            if len(self._conns) + self._opening < self._max_connections():
                return await self._open()
            # Only the first connection is still opening; wait for it.
            changed = self._changed
            await changed.wait()

    async def _open(self) -> Connection:
        self._opening += 1
        try:
            conn = await Connection.open(self.target, self.name, self.tls, self._nursery)
        finally:
            self._opening -= 1
            self._changed.set()
            self._changed = trio.Event()
        if self.export is None:
            self.export = conn.export
        elif _identity(conn.export) != _identity(self.export):
            self._nursery.start_soon(conn.aclose)
            raise ExportChanged(
                f"export {self.name!r} changed on the server (was {self.export.size} bytes, flags"
                f" {int(self.export.flags):#x}; now {conn.export.size}, {int(conn.export.flags):#x});"
                " refusing I/O: remount to use the new one"
            )
        self.stats.connects += 1
        self._conns.append(conn)
        self._last_used[conn] = trio.current_time()
        if not self._reaper_started:
            self._reaper_started = True
            self._nursery.start_soon(self._reap_idle)
        return conn

    async def ensure_connected(self) -> Export:
        """Open the first connection if none is open, and return what GO said."""
        await self.run(lambda conn: _noop())
        assert self.export is not None
        return self.export

    # -- requests --------------------------------------------------------------------------

    async def run(
        self, op: Callable[[Connection], Awaitable[T]], *, writes: bool = False, retry: bool = False
    ) -> T:
        """Run ``op`` on a connection within the timeout.

        Args:
            writes: the op writes data; its connection becomes dirty once it succeeds.
            retry: the op is idempotent; a lost connection is retried once on another.
        """
        self.stats.requests += 1
        conn: Connection | None = None
        try:
            with trio.fail_after(self.timeout):
                for attempt in range(2 if retry else 1):
                    conn = await self._get()
                    try:
                        result = await op(conn)
                    except ConnectionLost:
                        self._prune()
                        if attempt or not retry:
                            raise
                        continue
                    self._last_used[conn] = trio.current_time()
                    if writes:
                        self._dirty.add(conn)
                    return result
        except trio.TooSlowError:
            self.stats.timeouts += 1
            if conn is not None and conn in self._conns:
                log.warning(
                    "export %r: no reply within %gs; dropping the connection",
                    self.name,
                    self.timeout,
                )
                conn.mark_broken(RequestTimeout(f"no reply within {self.timeout}s"))
                self._prune()
            raise RequestTimeout(
                f"export {self.name!r}: no answer within {self.timeout}s"
            ) from None
        except NbdError:
            self.stats.errors += 1
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def flush(self) -> None:
        """NBD_CMD_FLUSH on every connection that wrote since the last flush.

        Raises:
            ConnectionLost: a connection with unflushed writes was lost (data may be gone).
        """
        self._prune()
        if self._lost_unflushed:
            self._lost_unflushed = False
            raise ConnectionLost(
                "a connection with unflushed writes was lost; data may not be on stable storage"
            )
        if self.export is None or not self.export.flags & TransmissionFlag.SEND_FLUSH:
            self._dirty.clear()
            return
        dirty = list(self._dirty)
        for conn in dirty:
            self._dirty.discard(conn)
        try:
            async with trio.open_nursery() as nursery:
                for conn in dirty:
                    nursery.start_soon(self._flush_one, conn)
        except BaseExceptionGroup as group:
            self._dirty.update(c for c in dirty if c.usable)
            first = group.exceptions[0]
            if isinstance(first, NbdError):
                raise first from None
            raise

    async def _flush_one(self, conn: Connection) -> None:
        try:
            with trio.fail_after(self.timeout):
                await conn.flush()
            self.stats.flushes += 1
        except trio.TooSlowError:
            conn.mark_broken(RequestTimeout("flush timed out"))
            raise RequestTimeout(
                f"export {self.name!r}: flush got no answer within {self.timeout}s"
            ) from None

    # -- lifecycle -------------------------------------------------------------------------

    async def _reap_idle(self) -> None:
        while not self._closed:
            await trio.sleep(max(1.0, self.idle_timeout / 4))
            now = trio.current_time()
            for conn in list(self._conns):
                idle = now - self._last_used.get(conn, now)
                if conn.in_flight == 0 and idle >= self.idle_timeout and conn.usable:
                    if conn in self._dirty:
                        try:
                            await self.flush()
                        except NbdError as exc:
                            log.warning(
                                "export %r: flush before idle close failed: %s", self.name, exc
                            )
                            continue
                    if conn.in_flight == 0 and conn in self._conns:
                        self._conns.remove(conn)
                        self._last_used.pop(conn, None)
                        log.info("export %r: closing a connection idle for %.0fs", self.name, idle)
                        await conn.aclose()

    async def aclose(self) -> None:
        """Flush what is dirty, then disconnect every connection politely."""
        try:
            if self._dirty:
                await self.flush()
        except NbdError as exc:
            log.error("export %r: final flush failed: %s", self.name, exc)
        self._closed = True
        conns, self._conns = self._conns, []
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(conn.aclose)


async def _noop() -> None:
    return None
