"""Connections to one export: opened lazily, re-established after a loss, nothing dropped.

Decisions are made synchronously (which connection, whether to open one) and I/O is done
outside them, as in httpcore's pool. The rules:

* Up to ``limit`` connections, but just one unless the export advertises
  NBD_FLAG_CAN_MULTI_CONN ("In the absence of this flag, clients SHOULD NOT multiplex their
  commands over more than one connection"). A request goes to the usable connection with
  the fewest requests in flight; another connection opens only when all are busy.
* **Every request waits at most ``timeout`` seconds**, for a connection (re-connecting with
  :class:`Backoff` while the server is away) and for its reply. One design bounds every
  wait: a wait for a connection, a replay or a flush runs under :meth:`ExportPool._deadline`;
  a reply on a connection that is there is watched by :meth:`ExportPool._watch`, once a
  second, not by a deadline per request, which cost ~9 us each (it may fail up to a second
  late). A connection that let a request time out is dropped, since the server may be
  stalled; the caller gets EIO and the next request tries again.
* **A request whose connection was lost is sent again** on a new one: reads and writes alike
  (a write to the same bytes never overtakes it, since :mod:`nbdfs.blockio` serializes
  overlapping writes). NBD_ESHUTDOWN counts as a lost connection (the server did not run the
  request), after the soft disconnect the spec demands.
* **Acknowledged changes are kept until a flush covers them** (the *journal*,
  :mod:`nbdfs.journal`: writes, zeroes and trims, the newest per byte). If a connection
  that carried some is lost, the server may have lost them too (a restart drops its
  volatile cache), so before anything else runs the journal is written again and flushed.
  Only then is it forgotten.
  While a replay cannot happen, fsync fails with EIO: we never report a flush that did not
  happen. The journal is bounded: past an eighth of ``journal_limit`` bytes a flush starts
  in the background (as NFS commits unstable writes behind a writer), and a writer that
  finds it past the limit waits for a flush.
* **A different disk behind the name fails the export for good.** Every new connection must
  find the export as the first one did (size, flags, block sizes), and the first one after
  all were gone must read back the bytes that ``verify`` checks (blocks fetched and not
  written since, by checksum), before anything is replayed or resumed. Otherwise every
  request and flush fails with EIO from then on, the journal is not replayed into the
  other disk, and one line says to remount.
* Connections idle for ``idle_timeout`` seconds are flushed and closed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from .connection import DEFAULT_TIMEOUT, Connection
from .errors import (
    ConnectError,
    ConnectionLost,
    ExportChanged,
    ExportNotFound,
    NbdError,
    RequestTimeout,
    TlsError,
)
from .journal import Change, Journal, Kind
from .poll import AdaptivePoll
from .session import Export, Geometry, Session
from .target import Target
from .tls import TlsConfig
from .wire import TransmissionFlag

log = logging.getLogger(__name__)
T = TypeVar("T")

JOURNAL_LIMIT = 64 << 20  # unflushed bytes kept for replay before a writer waits for a flush
# What a connection carries before the next one takes any requests (when the export
# allows several): requests in flight, bytes of their payloads.
DEPTH, PAYLOAD = 16, 1 << 20
FLUSH_BEHIND = 8  # past JOURNAL_LIMIT / FLUSH_BEHIND unflushed bytes, a flush starts meanwhile
BACKOFF_MIN, BACKOFF_MAX = 0.05, 2.0  # seconds between reconnection attempts


class Backoff:
    """The wait before each new attempt at something that may come back (a server, a
    connection): BACKOFF_MIN, doubling up to BACKOFF_MAX. One per attempt series."""

    def __init__(self) -> None:
        self.delay = BACKOFF_MIN

    async def wait(self) -> None:
        await trio.sleep(self.delay)
        self.delay = min(self.delay * 2, BACKOFF_MAX)


@dataclass(slots=True)
class Stats:
    """Counters for ``nbdfs status`` and the logs."""

    connects: int = 0
    reconnects: int = 0
    requests: int = 0
    retries: int = 0
    errors: int = 0
    timeouts: int = 0
    lost: int = 0
    flushes: int = 0
    replays: int = 0


def _identity(export: Export) -> tuple[object, ...]:
    # ROTATIONAL and the like may legitimately differ; what data means must not.
    relevant = TransmissionFlag.READ_ONLY | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
    return export.size, export.flags & relevant, export.block_size


def _transient(exc: NbdError) -> bool:
    """Worth reconnecting for: the server may come back. Not: it said no."""
    return isinstance(exc, (ConnectError, ConnectionLost)) and not isinstance(
        exc, (ExportNotFound, TlsError)
    )


class ExportPool:
    def __init__(
        self,
        target: Target,
        name: str,
        tls: TlsConfig,
        nursery: trio.Nursery,
        *,
        limit: int = 4,
        timeout: float = DEFAULT_TIMEOUT,
        idle_timeout: float = 30.0,
        journal_limit: int = JOURNAL_LIMIT,
        poller: AdaptivePoll | None = None,
    ) -> None:
        self.target = target
        self.name = name
        self.tls = tls
        self.limit = max(1, limit)
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.journal_limit = journal_limit
        self._poller = poller  # told of every request that goes to the server
        self.session: Session | None = None  # the first connection's (contexts and all)
        self.stats = Stats()
        self._outer = nursery  # where the pool's own nursery runs (the mount's)
        self._home: trio.Nursery | None = None  # the pool's own: readers, watchdog, reaper
        self._home_lock = trio.Lock()
        self._home_done = trio.Event()
        self._conns: list[Connection] = []
        self._last_used: dict[Connection, float] = {}
        self._opening = 0
        self._lost_pending = 0  # connections lost and not yet replaced (for stats.reconnects)
        self._changed = trio.Event()  # set whenever a connection opens or fails to
        self._dirty: set[Connection] = set()
        self._journal = Journal()  # acknowledged changes no flush has covered yet
        self._need_replay = False
        self._replay_lock = trio.Lock()
        self._flush_lock = trio.Lock()
        self._flushing_behind = False  # a flush the writes started is on its way
        self._busy = 0  # requests between choosing a connection and their outcome
        self._idle = trio.Event()
        self._closed = False
        self._most: int | None = None  # connections allowed, once the export's flags are known
        # Checks, on the first connection after all were gone, that it reaches the same disk:
        # returns why not, or None (set by the export's I/O object, which knows its bytes).
        self.verify: Callable[[Connection], Awaitable[str | None]] | None = None
        self.failed: ExportChanged | None = None  # set once for good: the disk changed

    # -- choosing and opening connections ------------------------------------------------

    @property
    def export(self) -> Export | None:
        """The export as the first connection found it (None before one opened)."""
        return self.session.export if self.session is not None else None

    @property
    def flags(self) -> TransmissionFlag:
        """The export's transmission flags (known once connected)."""
        return self.export.flags if self.export is not None else TransmissionFlag(0)

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def unflushed(self) -> int:
        """Bytes changed with the server's acknowledgement but not yet covered by a flush."""
        return self._journal.covered

    def unflushed_in(self, start: int, end: int) -> bool:
        """Whether bytes ``start`` to ``end`` hold a change a restarted server may not have."""
        return self._journal.overlaps(start, end)

    def _max_connections(self) -> int:
        most = self._most  # (per request: an enum flag test, or a property, costs)
        if most is None:
            export = self.export
            if export is None:
                return 1  # (the first connection tells us the flags)
            multi = bool(export.flags & TransmissionFlag.CAN_MULTI_CONN)
            most = self._most = self.limit if multi else 1
        return most

    def _prune(self) -> None:
        for conn in [c for c in self._conns if not c.usable]:
            self._conns.remove(conn)
            self._last_used.pop(conn, None)
            if conn in self._dirty:
                self._dirty.discard(conn)
                if self._journal:
                    self._need_replay = True
                    log.warning(
                        "export %r: lost a connection with %d unflushed bytes; they will be"
                        " written again once reconnected",
                        self.name,
                        self._journal.covered,
                    )
            self.stats.lost += 1
            self._lost_pending += 1
            self._spawn(conn.aclose)

    def _pick(self) -> Connection | None:
        """The connection for the next request, if one is there to take without waiting:
        the first that is not full (fewer than DEPTH requests and PAYLOAD bytes in flight),
        else the one with the fewest requests, unless another may open.

        Filling one connection before the next keeps the small requests that come
        together on one socket: they leave in one system call, their replies come back in
        few, and one reader task wakes for them (4 KiB random reads at depth 16 spread
        over 4 connections cost 107 us of CPU each, on one 76, in a paired run; nbdkit
        serves 16 requests on a connection at once by default). Large ones fill a
        connection soon, so that a small request never waits on a socket behind megabytes
        of other replies while another connection is free.
        """
        if self._closed or self._need_replay:
            return None
        best, fewest, full, stale = None, 0, True, False
        for conn in self._conns:  # (one pass, no key function: this runs per request)
            if not conn.usable:
                stale = True
            elif full:
                n = conn.in_flight
                if n < DEPTH and conn.payload_in_flight < PAYLOAD:
                    best, full = conn, False
                elif best is None or n < fewest:
                    best, fewest = conn, n
        if stale:
            self._prune()  # (may find unflushed writes on a lost one: then replay first)
        if best is None or self._need_replay:
            return None
        if full and len(self._conns) + self._opening < self._max_connections():
            return None
        return best

    async def _get(self) -> Connection:
        backoff = Backoff()
        while True:
            if self._closed:
                raise ConnectionLost("the mount is shutting down")
            if self.failed is not None:
                raise self.failed
            self._prune()
            if self._need_replay:
                try:
                    await self._replay()
                except NbdError as exc:
                    if not _transient(exc) or self._closed:
                        raise
                    log.info(
                        "export %r: replay interrupted (%s); retrying in %.2fs",
                        self.name,
                        exc,
                        backoff.delay,
                    )
                    self._prune()
                    await backoff.wait()
                continue
            best = self._pick()
            if best is not None:
                return best
            if len(self._conns) + self._opening >= self._max_connections():
                # the first connection is still opening; wait for it
                changed = self._changed
                await changed.wait()
                continue
            try:
                return await self._open()
            except NbdError as exc:
                if not _transient(exc) or self._closed:
                    raise
                log.info(
                    "export %r: cannot connect (%s); retrying in %.2fs",
                    self.name,
                    exc,
                    backoff.delay,
                )
                await backoff.wait()

    @property
    def tasks(self) -> trio.Nursery:
        """The pool's own nursery (there once a connection opened): closing the pool
        cancels what runs in it."""
        assert self._home is not None
        return self._home

    def _spawn(self, fn: Callable[[], Awaitable[object]]) -> None:
        if self._home is not None:
            self._home.start_soon(fn)
        else:
            self._outer.start_soon(fn)

    async def _run_home(self, task_status: trio.TaskStatus[trio.Nursery]) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reap_idle)
                nursery.start_soon(self._watch)
                task_status.started(nursery)
                await trio.sleep_forever()  # until aclose cancels it
        finally:
            self._home_done.set()

    async def _open(self) -> Connection:
        if self._home is None:
            async with self._home_lock:
                if self._home is None:
                    self._home = await self._outer.start(self._run_home)
        self._opening += 1
        try:
            conn = await Connection.open(
                self.target, self.name, self.tls, self._home, timeout=self.timeout
            )
        finally:
            self._opening -= 1
            self._changed.set()
            self._changed = trio.Event()
        if self.export is None:
            self.session = conn.session
        else:
            why = None
            if _identity(conn.export) != _identity(self.export):
                why = (
                    f"was {self.export.size} bytes, flags {int(self.export.flags):#x}, block"
                    f" sizes {self.export.block_size}; now {conn.export.size},"
                    f" {int(conn.export.flags):#x}, {conn.export.block_size}"
                )
            elif not self._conns and self.verify is not None:
                try:
                    why = await self.verify(conn)
                except BaseException:
                    self._spawn(conn.aclose)
                    raise
            if why is not None:
                self._spawn(conn.aclose)
                raise self._fail(why)
        if self._lost_pending:
            self._lost_pending -= 1
            self.stats.reconnects += 1
        self.stats.connects += 1
        self._conns.append(conn)
        self._last_used[conn] = trio.current_time()
        return conn

    def _fail(self, why: str) -> ExportChanged:
        """The export behind the name is not the one we had: refuse all I/O from now on."""
        if self.failed is None:
            lost = self._journal.covered
            self.failed = ExportChanged(
                f"export {self.name!r} changed on the server while it was disconnected ({why});"
                " every read, write and fsync on it now fails with EIO: remount to use the"
                " export as it is now"
                + (f" ({lost} unflushed bytes were not written to it)" if lost else "")
            )
            log.error("%s", self.failed)
            self._journal.clear()
            self._dirty.clear()
            self._need_replay = False
            self._changed.set()
        return self.failed

    async def ensure_connected(self) -> Geometry:
        """Open the first connection if none is open; the geometry GO gave the export."""
        conn = await self.run(_connection)
        return conn.core.geometry

    # -- requests --------------------------------------------------------------------------

    async def run(
        self,
        op: Callable[[Connection], Awaitable[T]],
        *,
        journal: Change | None = None,
    ) -> T:
        """Run ``op`` on a connection, again on a new one if the connection is lost.

        Args:
            journal: what ``op`` changes: once acknowledged it goes to the journal, kept for
                replay until a flush covers it (and its connection becomes dirty), unless
                durable; a durable one still removes the older changes it covers.

        Raises:
            RequestTimeout: no outcome within the timeout (the caller sees EIO).
            NbdError: the server answered with an error, or refused us for good.
        """
        self.stats.requests += 1
        if self._poller is not None:
            self._poller.network += 1
        if self.failed is not None:
            self.stats.errors += 1
            raise self.failed
        try:
            conn = self._pick()
            if conn is None:
                result = await self._run_waiting(op, journal, lost=False)
            else:
                # The usual case: a connection is there. No cancel scope (its deadline cost
                # ~9 us per request): the watchdog (_watch) bounds the wait for the reply.
                try:
                    result = await self._attempt(conn, op, journal)
                except ConnectionLost as exc:
                    self._lost(exc)
                    result = await self._run_waiting(op, journal, lost=True)
        except RequestTimeout:
            self.stats.timeouts += 1
            raise
        except NbdError:
            self.stats.errors += 1
            raise
        unflushed = self._journal.bytes
        if unflushed > self.journal_limit:
            await self.flush()  # (after any flush in progress: the bound holds)
        elif unflushed > self.journal_limit // FLUSH_BEHIND and not self._flushing_behind:
            self._flushing_behind = True
            self._spawn(self._flush_behind)
        return result

    async def _flush_behind(self) -> None:
        """A flush the writes started, so that the journal stays small (its buffers
        reused while still in the CPU's caches) without the writer waiting for it; one
        that fails leaves the journal to the next."""
        try:
            await self.flush()
        except NbdError as exc:
            log.info("export %r: flush behind the writes failed: %s", self.name, exc)
        finally:
            self._flushing_behind = False

    async def _attempt(
        self,
        conn: Connection,
        op: Callable[[Connection], Awaitable[T]],
        journal: Change | None,
    ) -> T:
        self._busy += 1
        try:
            result = await op(conn)
            self._last_used[conn] = trio.current_time()
            if journal is not None:
                if not journal.durable:
                    self._dirty.add(conn)
                self._journal.record(journal)
            return result
        finally:
            self._busy -= 1
            if self._busy == 0:
                self._idle.set()
                self._idle = trio.Event()

    def _lost(self, exc: ConnectionLost) -> None:
        self.stats.retries += 1
        log.info("export %r: %s; sending the request again", self.name, exc)
        self._prune()

    async def _run_waiting(
        self,
        op: Callable[[Connection], Awaitable[T]],
        journal: Change | None,
        lost: bool,
    ) -> T:
        """:meth:`run` when it must wait for a connection (opening, reconnecting, replaying)
        or send the request again: all of it within the timeout."""
        conn: Connection | None = None
        with self._deadline():
            backoff = Backoff()
            while True:
                if lost:
                    await backoff.wait()
                conn = await self._get()
                try:
                    return await self._attempt(conn, op, journal)
                except ConnectionLost as exc:
                    self._lost(exc)
                    lost = True
        if conn is not None and conn in self._conns and conn.in_flight:
            self._time_out(conn)
        raise RequestTimeout(f"export {self.name!r}: no answer within {self.timeout}s")

    def _deadline(self) -> trio.CancelScope:
        """The bound on a wait for a connection (to open, come back, replay) or a flush:
        ``timeout`` from now. (A reply on a connection that is there is bounded by the
        watchdog instead, which costs nothing per request.) A bare CancelScope, not
        trio.fail_after, whose generator context manager costs more: the caller raises
        RequestTimeout when the block ends without returning."""
        return trio.CancelScope(deadline=trio.current_time() + self.timeout)

    def _time_out(self, conn: Connection) -> None:
        log.warning(
            "export %r: no reply within %gs; dropping the connection", self.name, self.timeout
        )
        conn.mark_broken(RequestTimeout(f"no reply within {self.timeout}s"))
        self._prune()

    async def _watch(self) -> None:
        """Drop a connection whose oldest request has had no reply for the timeout.

        Its waiters get :class:`RequestTimeout` (EIO). A request is timed out between
        ``timeout`` and ``timeout`` plus one tick after it was sent, never earlier: it is
        first noticed at a tick, and counted from there.
        """
        tick = min(1.0, self.timeout / 4)
        seen: dict[Connection, tuple[int, float]] = {}  # oldest request, when first seen
        while not self._closed:
            await trio.sleep(tick)
            now = trio.current_time()
            was, seen = seen, {}
            self._prune()  # (a connection no longer usable is closed, its requests resolved)
            for conn in list(self._conns):
                cookie = conn.oldest_request()
                if cookie is None:
                    continue
                first = was.get(conn)
                if first is None or first[0] != cookie:
                    first = (cookie, now)
                if now - first[1] >= self.timeout:
                    self._time_out(conn)
                    continue
                seen[conn] = first

    async def _replay(self) -> None:
        """Write the journal again on a fresh connection, each entry flushed before it is
        forgotten, so a replay cut short (the server went away again) resumes where it
        stopped. Its entries are disjoint, each the newest change to its bytes, so their
        order does not matter."""
        async with self._replay_lock:
            if not self._need_replay:
                return
            while self._busy:  # let requests already sent finish (or fail) first
                idle = self._idle
                await idle.wait()
            self._prune()
            conn = self._conns[0] if self._conns else await self._open()
            log.info(
                "export %r: replaying %d unflushed changes (%d bytes)",
                self.name,
                len(self._journal),
                self._journal.covered,
            )
            flush = self.export is not None and bool(
                self.export.flags & TransmissionFlag.SEND_FLUSH
            )
            for entry in self._journal:
                if entry.kind is Kind.WRITE:
                    assert entry.data is not None
                    await conn.write(entry.offset, entry.data)
                elif entry.kind is Kind.ZERO:
                    await conn.write_zeroes(entry.offset, entry.length)
                else:
                    await conn.trim(entry.offset, entry.length)
                if flush:
                    await conn.flush()
                self._journal.discard(entry)
            self._journal.clear()  # (without NBD_CMD_FLUSH, written is all there is)
            self._dirty.clear()
            self._need_replay = False
            self.stats.replays += 1

    async def flush(self) -> None:
        """Make every acknowledged write durable: NBD_CMD_FLUSH on each connection that wrote.

        Raises:
            RequestTimeout: the server could not be reached (or did not answer) in time;
                the writes stay in the journal and the next flush tries again.
        """
        if self.failed is not None:
            raise self.failed
        async with self._flush_lock:
            with self._deadline():
                while True:
                    self._prune()
                    if self._need_replay:
                        await self._get()  # replays (and flushes) before returning
                        continue
                    if self._try_flush_done():
                        return
                    mark = self._journal.mark
                    dirty = list(self._dirty)
                    self._dirty.clear()  # (a write acknowledged from now on: dirty again)
                    try:
                        while dirty:
                            await dirty[0].flush()
                            dirty.pop(0)
                            self.stats.flushes += 1
                    except ConnectionLost:
                        continue
                    finally:
                        # Those not flushed (the flush lost, timed out or cancelled) are
                        # still dirty, or, lost before their flush was answered, may have
                        # lost their writes: then the whole journal is written again.
                        for conn in dirty:
                            if conn.usable:
                                self._dirty.add(conn)
                            elif self._journal:
                                self._need_replay = True
                    self._journal.forget(mark)
                    return
            self.stats.timeouts += 1
            raise RequestTimeout(
                f"export {self.name!r}: could not flush within {self.timeout}s; the data is"
                " kept and the next fsync tries again"
            )

    def _try_flush_done(self) -> bool:
        """Nothing to flush, or no way to (the export has no NBD_CMD_FLUSH)."""
        if self.export is None or not self.export.flags & TransmissionFlag.SEND_FLUSH:
            self._dirty.clear()
            self._journal.clear()
            return True
        return not self._dirty and not self._journal

    # -- lifecycle -------------------------------------------------------------------------

    async def _reap_idle(self) -> None:
        while not self._closed:
            await trio.sleep(max(1.0, self.idle_timeout / 4))
            now = trio.current_time()
            for conn in list(self._conns):
                idle = now - self._last_used.get(conn, now)
                if conn.in_flight or idle < self.idle_timeout or not conn.usable:
                    continue
                if conn in self._dirty:
                    try:
                        await self.flush()
                    except NbdError as exc:
                        log.warning("export %r: flush before idle close failed: %s", self.name, exc)
                        continue
                if conn.in_flight == 0 and conn in self._conns and conn not in self._dirty:
                    self._conns.remove(conn)
                    self._last_used.pop(conn, None)
                    log.info("export %r: closing a connection idle for %.0fs", self.name, idle)
                    await conn.aclose()

    async def aclose(self) -> int:
        """Flush what is unflushed, then disconnect every connection politely.

        Returns:
            How many acknowledged bytes may be lost: the final flush failed (0: none).
        """
        lost = 0
        try:
            if self.failed is None and (self._journal or self._dirty or self._need_replay):
                await self.flush()
        except NbdError as exc:
            lost = max(self._journal.covered, 1)
            log.error(
                "export %r: final flush failed, %d bytes may be lost: %s", self.name, lost, exc
            )
        self._closed = True
        conns, self._conns = self._conns, []
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(conn.aclose)
        if self._home is not None:  # the watchdog, the reaper, read-ahead, closes: all done
            self._home.cancel_scope.cancel()
            await self._home_done.wait()
        return lost


async def _connection(conn: Connection) -> Connection:
    return conn
