#!/usr/bin/env python3
"""Experiment: bench/pyfuse3_forward.py with each read's payload spliced from the NBD
socket into a pipe and from there to /dev/fuse (libfuse's fuse_reply_data with an fd
buffer), so that no byte of it passes through user space. Not used by nbdfs.

Needs pyfuse3 built with this directory's pyfuse3-read-reply-from-fd.diff on top of
contrib/pyfuse3's series (read() may return ``(fd, size)``; ``Operations.splice_write``
and ``max_read`` at INIT), installed apart, e.g. ``pip install --no-deps --target DIR``:

    PYTHONPATH=DIR .venv/bin/python bench/experiments/splice/forward_splice.py \\
        MOUNTPOINT nbd://HOST:PORT/[EXPORT]

Plaintext only (over TLS the bytes must be decrypted in user space). Environment:
``PIPE`` the pipes' size (default 2 MiB: a 1 MiB FUSE read needs libfuse's own pipe
above 1 MiB, i.e. fs.pipe-max-size raised), ``MAX_READ`` the mount's max_read.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
from client_latency import CHUNK, REQUEST, MinimalClient, MinimalWriter, open_minimal
from pyfuse3_ceiling import Nothing

MOVE = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
PIPE = int(os.environ.get("PIPE", 2 << 20))


class SpliceClient(MinimalClient):
    """The minimal client whose reader splices each read's payload into its pipe."""

    async def reader(self) -> None:
        header, offset = memoryview(bytearray(CHUNK.size)), memoryview(bytearray(8))
        while True:
            await self._receive_exactly(header)
            _, flags, _, cookie, length = CHUNK.unpack(header)
            done, pipe = self.waiting[cookie]
            await self._receive_exactly(offset)
            left = length - 8
            while left:
                try:
                    moved = os.splice(self.fd, int(pipe), left, flags=MOVE)  # type: ignore[call-overload]
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.fd)
                    continue
                if not moved:
                    raise EOFError("the server closed the connection")
                left -= moved
            if flags & 1:  # NBD_REPLY_FLAG_DONE
                del self.waiting[cookie]
                done.set()

    async def read_to_pipe(self, offset: int, size: int, pipe: int) -> None:
        self.cookie += 1
        done = trio.Event()
        self.waiting[self.cookie] = (done, pipe)  # type: ignore[assignment]
        os.write(self.fd, REQUEST.pack(0x25609513, 0, 0, self.cookie, offset, size))
        await done.wait()


class ForwardSplice(Nothing):
    splice_write = True
    max_read = int(os.environ.get("MAX_READ", 0))

    def __init__(self, size: int, client: SpliceClient, writer: MinimalWriter) -> None:
        super().__init__(size)
        self.client, self.writer = client, writer
        self.pipes: list[tuple[int, int]] = []

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> object:
        size = max(0, min(size, self.size - off))
        if not size:
            return b""
        if self.pipes:
            r, w = self.pipes.pop()
        else:
            r, w = os.pipe()
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE)
        await self.client.read_to_pipe(off, size, w)
        # (pyfuse3 replies, splicing the pipe empty, before any other task runs)
        self.pipes.append((r, w))
        return (r, size)

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        data = memoryview(buf)[: max(0, self.size - off)]
        await self.writer.write(off, data)
        return len(data)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self.writer.flush()


async def serve(mountpoint: str, uri: str) -> None:
    reads, client, size = await open_minimal(uri, SpliceClient)
    writes, writer, _ = await open_minimal(uri, MinimalWriter)
    assert isinstance(client, SpliceClient) and isinstance(writer, MinimalWriter)
    fs = ForwardSplice(size, client, writer)
    options = set(pyfuse3.default_options) | {"fsname=forward"}
    if fs.max_read:
        options.add(f"max_read={fs.max_read}")
    pyfuse3.init(fs, mountpoint, options)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.reader)
        nursery.start_soon(writer.reader)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    await client.disconnect(reads)
    await writer.disconnect(writes)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    try:
        trio.run(serve, sys.argv[1], sys.argv[2])
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
