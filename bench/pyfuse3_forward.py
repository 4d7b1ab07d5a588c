#!/usr/bin/env python3
"""The least a pyfuse3 + trio NBD daemon does: the no-op file system, forwarding reads.

    .venv/bin/python bench/pyfuse3_forward.py MOUNTPOINT nbd://HOST:PORT/[EXPORT]

``bench/pyfuse3_ceiling.py``'s one file, ``MOUNTPOINT/f``, of the export's size, whose
reads each become one NBD_CMD_READ on one connection (nbdfs's handshake, then
``os.write`` of the header and a reader task parsing each reply chunk with ``struct``, as
``bench/client_latency.py --minimal``; no cache, no checks, one structured chunk per
reply assumed). Its CPU per request under fio is the floor of nbdfs's: the two floors
compare.py reports measure each half alone, and together they cost more than their sum
(the waits for the server and the wake-ups between the halves). Foreground until
unmounted; for measuring by hand (fio as bench/compare.py runs it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client_latency import CHUNK, REQUEST
from pyfuse3_ceiling import Nothing

from nbdfs.connection import _handshake
from nbdfs.target import parse_target
from nbdfs.tls import TlsConfig


class Forward(Nothing):
    def __init__(self, size: int, sock: trio.socket.SocketType) -> None:
        super().__init__(size)
        self.sock, self.fd = sock, sock.fileno()
        self.waiting: dict[int, tuple[trio.Event, bytearray]] = {}
        self.cookie = 0

    async def _receive_exactly(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                got += os.readv(self.fd, (view[got:],))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)

    async def reader(self) -> None:
        header = bytearray(CHUNK.size)
        while True:
            await self._receive_exactly(memoryview(header))
            _, flags, _, cookie, length = CHUNK.unpack(header)
            done, buf = self.waiting[cookie]
            await self._receive_exactly(memoryview(buf)[:length])  # (offset, then data)
            if flags & 1:  # NBD_REPLY_FLAG_DONE
                del self.waiting[cookie]
                done.set()

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        size = max(0, min(size, self.size - off))
        if not size:
            return b""
        self.cookie += 1
        done, buf = trio.Event(), bytearray(size + 8)
        self.waiting[self.cookie] = (done, buf)
        os.write(self.fd, REQUEST.pack(0x25609513, 0, 0, self.cookie, off, size))
        await done.wait()
        return memoryview(buf)[8:]  # type: ignore[return-value]


async def serve(mountpoint: str, uri: str) -> None:
    target = parse_target(uri)
    stream, session = await _handshake(target, TlsConfig(), lambda hs: hs.go(target.export or ""))
    assert isinstance(stream, trio.SocketStream)
    fs = Forward(session.export.size or 0, stream.socket)
    pyfuse3.init(fs, mountpoint, set(pyfuse3.default_options) | {"fsname=forward"})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.reader)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    try:
        trio.run(serve, sys.argv[1], sys.argv[2])
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
