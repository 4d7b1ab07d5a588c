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
above 1 MiB, past fs.pipe-max-size: CAP_SYS_RESOURCE or the sysctl raised; README.md
here), ``MAX_READ`` the mount's max_read.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
from client_latency import CHUNK, MinimalClient, MinimalWriter
from pyfuse3_forward import Forward, main

MOVE = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
PIPE = int(os.environ.get("PIPE", 2 << 20))


class SpliceClient(MinimalClient):
    """The minimal client whose reader splices each read's payload into the pipe its
    :meth:`read` was given (a descriptor, where the minimal client takes a buffer)."""

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
                    moved = os.splice(self.fd, int(pipe), left, flags=MOVE)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.fd)
                    continue
                if not moved:
                    raise EOFError("the server closed the connection")
                left -= moved
            if flags & 1:  # NBD_REPLY_FLAG_DONE
                del self.waiting[cookie]
                done.set()


class ForwardSplice(Forward):
    splice_write = True
    max_read = int(os.environ.get("MAX_READ", 0))
    mount_options = (f"max_read={max_read}",) if max_read else ()

    def __init__(self, size: int, client: MinimalClient, writer: MinimalWriter) -> None:
        super().__init__(size, client, writer)
        self.pipes: list[tuple[int, int]] = []

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> object:  # type: ignore[override]
        size = max(0, min(size, self.size - off))
        if not size:
            return b""
        if self.pipes:
            r, w = self.pipes.pop()
        else:
            r, w = os.pipe()
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE)
        await self.client.read(off, size, w)  # type: ignore[arg-type]
        # (pyfuse3 replies, splicing the pipe empty, before any other task runs)
        self.pipes.append((r, w))
        return (r, size)


if __name__ == "__main__":
    main(ForwardSplice, SpliceClient)
