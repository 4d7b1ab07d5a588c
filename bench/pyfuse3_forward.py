#!/usr/bin/env python3
"""The least a pyfuse3 + trio NBD daemon does: the no-op file system, forwarding reads
and writes.

    .venv/bin/python bench/pyfuse3_forward.py MOUNTPOINT nbd://HOST:PORT/[EXPORT]
    .venv/bin/python bench/pyfuse3_forward.py MOUNTPOINT "nbds://HOST:PORT/[EXPORT]?tls-certificates=DIR"

``bench/pyfuse3_ceiling.py``'s one file, ``MOUNTPOINT/f``, of the export's size, whose
reads each become one NBD_CMD_READ on one connection (nbdfs's handshake, then
``os.write`` of the header and a reader task parsing each reply chunk with ``struct``, as
``bench/client_latency.py --minimal``; no cache, no checks, one structured chunk per
reply assumed), and whose writes each become one NBD_CMD_WRITE (``os.writev`` of header
and payload) and fsync one NBD_CMD_FLUSH, on a second connection. Its CPU per request
under fio, and its rate under dd, is the floor of nbdfs's: the two floors compare.py
reports measure each half alone, and together they cost more than their sum (the waits
for the server and the wake-ups between the halves). Foreground until unmounted; for
measuring by hand (fio as bench/compare.py runs it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client_latency import MinimalClient, MinimalWriter, open_minimal
from pyfuse3_ceiling import Nothing


class Forward(Nothing):
    mount_options: tuple[str, ...] = ()  # (more FUSE mount options)

    def __init__(self, size: int, client: MinimalClient, writer: MinimalWriter) -> None:
        super().__init__(size)
        self.client, self.writer = client, writer

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        size = max(0, min(size, self.size - off))
        if not size:
            return b""
        buf = memoryview(bytearray(size + 8))
        await self.client.read(off, size, buf)
        return buf[8:]  # type: ignore[return-value]

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        data = memoryview(buf)[: max(0, self.size - off)]
        await self.writer.write(off, data)
        return len(data)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self.writer.flush()


async def serve(
    mountpoint: str,
    uri: str,
    fs_type: type[Forward] = Forward,
    client_type: type[MinimalClient] = MinimalClient,
) -> None:
    """Mount ``fs_type`` on two minimal connections (reads on a ``client_type``) until
    unmounted; then say goodbye on both."""
    reads, client, size = await open_minimal(uri, client_type)
    writes, writer, _ = await open_minimal(uri, MinimalWriter)
    assert isinstance(writer, MinimalWriter)
    fs = fs_type(size, client, writer)
    options = set(pyfuse3.default_options) | {"fsname=forward"} | set(fs.mount_options)
    pyfuse3.init(fs, mountpoint, options)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.reader)
        nursery.start_soon(writer.reader)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    await client.disconnect(reads)
    await writer.disconnect(writes)


def main(
    fs_type: type[Forward] = Forward, client_type: type[MinimalClient] = MinimalClient
) -> None:
    if len(sys.argv) != 3:
        raise SystemExit(sys.modules["__main__"].__doc__)
    try:
        trio.run(serve, sys.argv[1], sys.argv[2], fs_type, client_type)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
