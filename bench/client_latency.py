#!/usr/bin/env python3
"""The NBD client alone, without FUSE: reads per second through one nbdfs Connection.

    .venv/bin/python bench/client_latency.py nbd://127.0.0.1:10809 [--size 4096,32768]
        [--depth 1,16] [--count 5000] [--minimal | --through connection|pool|io]

Random reads of each size, ``depth`` at a time, against a running server (e.g.
``nbdkit memory 1G``), with the CPU time per read. Separates the client's cost from the
FUSE path's when a mount is slower than expected.

``--minimal``: instead of nbdfs's Connection, the least a trio NBD client can do (the
handshake by nbdfs, then one socket, ``os.write`` of each request's header, one reader
task parsing structured reply chunks with ``struct`` and ``readv``, no checks): the floor of the
network half of a cold read, which bench/compare.py reports beside the no-op pyfuse3 one.

``--through pool`` or ``--through io``: the reads go through nbdfs's layers above the
Connection, as a mounted export's do, still without FUSE: ``ExportPool.run`` (choosing
the connection, retry on a lost one, stats), or ``ExportIO.read`` with the mount's default
256 MiB block cache, cold (then a random reader's first touch of a block reads its
sectors, the second fetches the block whole: fresh memory while the cache fills). Run
beside the default and ``--minimal`` on the same server, the differences are each layer's
CPU per read.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import ssl
import struct
import time

import trio

from nbdfs.blockio import ExportIO
from nbdfs.cache import BlockStore
from nbdfs.connection import Connection, _handshake
from nbdfs.fs import DEFAULT_CACHE_SIZE
from nbdfs.mount import tune_malloc
from nbdfs.pool import ExportPool
from nbdfs.session import TlsMode
from nbdfs.target import Target, parse_target
from nbdfs.tls import TlsConfig
from nbdfs.tlsstream import TlsSocketStream

REQUEST = struct.Struct(">IHHQQI")
CHUNK = struct.Struct(">IHHQI")  # a structured reply chunk's header (nbdfs negotiates them)
SIMPLE = struct.Struct(">IIQ")  # a simple reply: magic, error, cookie


class MinimalClient:
    """The least a trio NBD client does on one handshaken socket: ``os.write`` of each
    request's header, one reader task (:meth:`reader`) parsing each structured reply chunk
    with ``struct`` into the request's buffer (offset, then data); no checks. Over TLS
    (``tls``, the session on the socket), OpenSSL reads and writes the descriptor instead,
    and the task waits only when it says it would block, as nbdfs's TLS connections do."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream  # (kept: its socket closes when it goes)
        self.tls: ssl.SSLSocket | None = None
        if isinstance(stream, TlsSocketStream):
            self.tls, self.fd = stream.ssl, stream.ssl.fileno()
        else:
            assert isinstance(stream, trio.SocketStream)
            self.fd = stream.socket.fileno()
        self.waiting: dict[int, tuple[trio.Event, memoryview]] = {}
        self.cookie = 0

    async def _receive_exactly(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                if self.tls is None:
                    n = os.readv(self.fd, (view[got:],))
                else:
                    n = self.tls.recv_into(view[got:])
            except (BlockingIOError, ssl.SSLWantReadError):
                await trio.lowlevel.wait_readable(self.fd)
                continue
            if not n:  # (the server went: stop, do not spin on the end of the stream)
                raise EOFError("the server closed the connection")
            got += n

    async def _send(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = os.write(self.fd, view) if self.tls is None else self.tls.send(view)
            except (BlockingIOError, ssl.SSLWantWriteError):
                await trio.lowlevel.wait_writable(self.fd)
                continue
            view = view[sent:]

    async def reader(self) -> None:
        header = bytearray(CHUNK.size)
        while True:
            await self._receive_exactly(memoryview(header))
            _, flags, _, cookie, length = CHUNK.unpack(header)
            done, buf = self.waiting[cookie]
            await self._receive_exactly(buf[:length])
            if flags & 1:  # NBD_REPLY_FLAG_DONE
                del self.waiting[cookie]
                done.set()

    async def read(self, offset: int, size: int, buf: memoryview) -> None:
        """NBD_CMD_READ into ``buf`` (``size`` + 8 bytes: NBD_REPLY_TYPE_OFFSET_DATA)."""
        self.cookie += 1
        done = trio.Event()
        self.waiting[self.cookie] = (done, buf)
        if self.tls is None:
            os.write(self.fd, REQUEST.pack(0x25609513, 0, 0, self.cookie, offset, size))
        else:
            await self._send(REQUEST.pack(0x25609513, 0, 0, self.cookie, offset, size))
        await done.wait()

    async def disconnect(self, stream: trio.abc.Stream) -> None:
        """NBD_CMD_DISC, then close (over TLS, with its close_notify), as a client should."""
        with contextlib.suppress(OSError, ssl.SSLError, trio.BrokenResourceError):
            await self._send(REQUEST.pack(0x25609513, 0, 2, self.cookie + 1, 0, 0))
        await stream.aclose()


class MinimalWriter(MinimalClient):
    """The least a trio NBD client does for writes and flushes: ``os.writev`` of header
    and payload (waiting only while the socket is full), a reader task parsing the simple
    replies the servers here send to them (so: a connection of its own; no checks)."""

    async def reader(self) -> None:
        reply = memoryview(bytearray(SIMPLE.size))
        while True:
            await self._receive_exactly(reply)
            self.waiting.pop(SIMPLE.unpack(reply)[2])[0].set()

    async def _command(self, cmd: int, offset: int, data: bytes | memoryview) -> None:
        self.cookie += 1
        done = trio.Event()
        self.waiting[self.cookie] = (done, memoryview(b""))
        out = [REQUEST.pack(0x25609513, 0, cmd, self.cookie, offset, len(data)), data]
        if self.tls is not None:
            # One buffer at a time, through nbdfs's send (a payload of records goes corked).
            for part in out:
                await self.stream.send_all(part)
            out = []
        while out:
            try:
                sent = os.writev(self.fd, out)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.fd)
                continue
            while out and sent >= len(out[0]):
                sent -= len(out.pop(0))
            if sent:
                out[0] = memoryview(out[0])[sent:]
        await done.wait()

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        await self._command(1, offset, data)  # NBD_CMD_WRITE

    async def flush(self) -> None:
        await self._command(3, 0, b"")  # NBD_CMD_FLUSH


def tls_of(target: Target) -> TlsConfig:
    """The TLS the URI asks for (nbds://, ?tls-certificates=DIR), as nbdfs mount takes it."""
    return TlsConfig(mode=target.tls or TlsMode.DISABLE, certificates=target.tls_certificates)


async def open_minimal(
    uri: str, kind: type[MinimalClient] = MinimalClient
) -> tuple[trio.abc.Stream, MinimalClient, int]:
    """nbdfs's handshake (STARTTLS too for an nbds:// URI), then the minimal client on its
    socket; and the export's size."""
    target = parse_target(uri)
    stream, session = await _handshake(
        target, tls_of(target), lambda hs: hs.go(target.export or "")
    )
    return stream, kind(stream), session.export.size or 0


async def minimal(uri: str, size: int, depth: int, count: int) -> tuple[float, float]:
    """Seconds and CPU seconds for ``count`` reads by the minimal client."""
    stream, client, export_size = await open_minimal(uri)
    blocks = export_size // size
    payload = memoryview(bytearray(size + 8))  # one for all: the data is not looked at

    async def worker() -> None:
        for _ in range(count // depth):
            await client.read(random.randrange(blocks) * size, size, payload)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.reader)
        start, cpu = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as workers:
            for _ in range(depth):
                workers.start_soon(worker)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        nursery.cancel_scope.cancel()
    await client.disconnect(stream)
    return elapsed, cpu


async def _itself(conn: Connection) -> Connection:
    return conn


async def measure(
    uri: str, size: int, depth: int, count: int, through: str = "connection"
) -> tuple[float, float]:
    """Seconds and CPU seconds for ``count`` reads through nbdfs's Connection, or through
    the layers above it (``through``: "pool", "io")."""
    target = parse_target(uri)
    async with trio.open_nursery() as nursery:
        pool = ExportPool(target, target.export or "", tls_of(target), nursery)
        io = await ExportIO.open(pool, BlockStore(DEFAULT_CACHE_SIZE))
        conn = await pool.run(_itself)  # (the pool's one connection)
        blocks = io.size // size

        async def read(offset: int) -> object:
            if through == "io":
                return await io.read(offset, size)
            if through == "pool":
                return await pool.run(lambda c: c.read(offset, size))
            return await conn.read(offset, size)

        async def worker() -> None:
            for _ in range(count // depth):
                await read(random.randrange(blocks) * size)

        start, cpu = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as workers:
            for _ in range(depth):
                workers.start_soon(worker)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        await pool.aclose()
        nursery.cancel_scope.cancel()
    return elapsed, cpu


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "uri",
        help="nbd://HOST[:PORT][/EXPORT] (TCP or Unix socket), or nbds://...?tls-certificates=DIR",
    )
    ap.add_argument("--size", default="4096,32768", help="read sizes, comma-separated")
    ap.add_argument("--depth", default="1,16", help="reads in flight, comma-separated")
    ap.add_argument("--count", type=int, default=5000, help="reads per figure")
    ap.add_argument("--minimal", action="store_true", help="the minimal client (the floor)")
    ap.add_argument(
        "--through",
        choices=["connection", "pool", "io"],
        default="connection",
        help="nbdfs's layer the reads enter (default: the Connection itself)",
    )
    args = ap.parse_args()
    tune_malloc()  # as the daemon does
    for size in map(int, args.size.split(",")):
        for depth in map(int, args.depth.split(",")):
            if args.minimal:
                elapsed, cpu = trio.run(minimal, args.uri, size, depth, args.count)
            else:
                elapsed, cpu = trio.run(measure, args.uri, size, depth, args.count, args.through)
            print(
                f"size {size:>8} depth {depth:>3}: {args.count / elapsed:8.0f} reads/s,"
                f" {elapsed / args.count * depth * 1e6:6.0f} us each,"
                f" CPU {cpu / args.count * 1e6:5.1f} us per read"
            )


if __name__ == "__main__":
    main()
