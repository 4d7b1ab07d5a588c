"""What the pool sends, read from nbdkit's log filter: lazy connections, multi-conn, flushes."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from .mounts import mounted
from .servers import nbdkit, require_tool

pytestmark = pytest.mark.fuse
MiB = 1 << 20


def log_events(log: Path) -> list[tuple[int, str, str]]:
    """(connection, event, rest of line) for each transmission event in nbdkit's log."""
    out = []
    for line in log.read_text().splitlines():
        m = re.search(r"connection=(\d+) (\w+) (.*)", line)
        if m and not m.group(3).startswith("..."):
            out.append((int(m.group(1)), m.group(2), m.group(3)))
    return out


def direct_io(path: Path, rw: str, bs: str, depth: int) -> None:
    """fio: 16 MiB of O_DIRECT requests in the first 64 MiB, ``depth`` of them in flight at
    once (the kernel serializes buffered writes to one file)."""
    fio = require_tool("fio")
    subprocess.run(
        [
            fio,
            "--name=j",
            f"--filename={path}",
            f"--rw={rw}",
            f"--bs={bs}",
            "--size=64M",
            "--io_size=16M",
            "--ioengine=libaio",
            "--direct=1",
            f"--iodepth={depth}",
            "--end_fsync=0",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def parallel_writes(path: Path, n: int = 8, sync: bool = False) -> None:
    def write(i: int) -> None:
        fd = os.open(path, os.O_WRONLY | (os.O_SYNC if sync else 0))
        try:
            for j in range(8):
                os.pwrite(fd, bytes([i]) * 65536, (i * 8 + j) * 65536)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_fsync_flushes_every_connection_that_wrote(tmp: Path) -> None:
    log = tmp / "nbdkit.log"
    with nbdkit("--filter=log", "memory", "64M", f"logfile={log}") as srv:
        with mounted(srv.address, tmp / "mnt", "-C", "4") as mnt:
            direct_io(mnt / "%default%", "randwrite", "64k", 32)
            fd = os.open(mnt / "%default%", os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            events = log_events(log)
    writers = {c for c, e, _ in events if e == "Write"}
    assert len(writers) > 1, "multi-conn export: writes should spread over connections"
    flushed_after: dict[int, bool] = defaultdict(bool)
    for c, e, _ in events:
        if e == "Write":
            flushed_after[c] = False
        elif e == "Flush":
            flushed_after[c] = True
    assert all(flushed_after[c] for c in writers), events


def test_small_requests_share_a_connection_large_ones_spread(tmp: Path) -> None:
    """A connection takes requests until it carries 16 or 1 MiB of payloads, then the next
    one does: 4 KiB reads at depth 8 all go over one socket (batched), 1 MiB reads at
    depth 4 over several (none waits behind another's megabyte)."""
    for bs, depth, spread in (("4k", 8, False), ("1M", 4, True)):
        log = tmp / f"nbdkit-{bs}.log"
        with nbdkit("--filter=log", "memory", "64M", f"logfile={log}") as srv:
            with mounted(srv.address, tmp / "mnt", "-C", "4") as mnt:
                direct_io(mnt / "%default%", "randread", bs, depth)
                events = log_events(log)
        readers = {c for c, e, _ in events if e == "Read"}
        assert (len(readers) > 1) == spread, (bs, readers)


def test_one_connection_without_multi_conn(tmp: Path) -> None:
    log = tmp / "nbdkit.log"
    with nbdkit(
        "--filter=log",
        "--filter=multi-conn",
        "memory",
        "64M",
        "multi-conn-mode=disable",
        f"logfile={log}",
    ) as srv:
        with mounted(srv.address, tmp / "mnt", "-C", "4") as mnt:
            direct_io(mnt / "%default%", "randwrite", "64k", 32)
            events = log_events(log)
    assert len({c for c, e, _ in events if e in ("Write", "Read")}) == 1


def test_o_sync_writes_use_fua(tmp: Path) -> None:
    log = tmp / "nbdkit.log"
    with nbdkit("--filter=log", "memory", "64M", f"logfile={log}") as srv:
        with mounted(srv.address, tmp / "mnt") as mnt:
            parallel_writes(mnt / "%default%", n=2, sync=True)
            events = log_events(log)
    writes = [rest for _, e, rest in events if e == "Write"]
    assert writes and all("fua=1" in w for w in writes)


def test_connections_open_lazily_even_with_many_exports(tmp: Path) -> None:
    exports = tmp / "exports"
    exports.mkdir()
    for i in range(1000):
        (exports / f"disk{i:04}").write_bytes(bytes(4096))
    log = tmp / "nbdkit.log"
    with nbdkit("--filter=log", "file", f"dir={exports}", f"logfile={log}") as srv:
        with mounted(srv.address, tmp / "mnt") as mnt:
            assert len(os.listdir(mnt)) == 1000
            subprocess.run(["stat", str(mnt / "disk0500")], check=True, capture_output=True)
            before = tcp_connections(log)
            assert (mnt / "disk0007").read_bytes() == bytes(4096)
            after = tcp_connections(log)
    # Listing used one TCP connection; reading one export opened one more, for that export.
    assert len(before) == 1
    assert len(after - before) == 1


def tcp_connections(log: Path) -> set[int]:
    """nbdkit's log numbers TCP connections in its Preconnect lines (Connect is per open)."""
    return {int(m.group(1)) for m in re.finditer(r"\.\.\.Preconnect id=(\d+)", log.read_text())}


def test_all_zero_writes_go_as_write_zeroes(tmp: Path) -> None:
    log = tmp / "nbdkit.log"
    with nbdkit("--filter=log", "memory", "16M", f"logfile={log}") as srv:
        with mounted(srv.address, tmp / "mnt") as mnt:
            fd = os.open(mnt / "%default%", os.O_WRONLY)
            try:
                os.pwrite(fd, b"x" * 65536, 0)
                os.pwrite(fd, b"\0" * (1 << 20), 1 << 20)  # (touched pages, not calloc's)
                os.fsync(fd)
            finally:
                os.close(fd)
            assert (mnt / "%default%").read_bytes()[: 2 << 20] == b"x" * 65536 + bytes(
                (2 << 20) - 65536
            )
            events = log_events(log)

    def ranges(kind: str) -> list[tuple[int, int]]:
        out = []
        for _, e, rest in events:
            if e == kind:
                fields = dict(f.split("=", 1) for f in rest.split() if "=" in f)
                out.append((int(fields["offset"], 16), int(fields["count"], 16)))
        return out

    assert ranges("Write") == [(0, 65536)]
    zeroes = ranges("Zero")
    assert zeroes and all((1 << 20) <= o and o + n <= (2 << 20) for o, n in zeroes)
    assert sum(n for _, n in zeroes) == 1 << 20
