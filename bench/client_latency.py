#!/usr/bin/env python3
"""The NBD client alone, without FUSE: reads per second through one nbdfs Connection.

    .venv/bin/python bench/client_latency.py nbd://127.0.0.1:10809 [--size 4096,32768]
        [--depth 1,16] [--count 5000]

Random reads of each size, ``depth`` at a time, against a running server (e.g.
``nbdkit memory 1G``). Separates the client's cost from the FUSE path's when a mount is
slower than expected.
"""

from __future__ import annotations

import argparse
import random
import time

import trio

from nbdfs.connection import Connection
from nbdfs.mount import tune_malloc
from nbdfs.target import parse_target
from nbdfs.tls import TlsConfig


async def measure(uri: str, size: int, depth: int, count: int) -> None:
    target = parse_target(uri)
    async with trio.open_nursery() as nursery:
        conn = await Connection.open(target, target.export or "", TlsConfig(), nursery)
        blocks = (conn.export.size or 0) // size

        async def worker() -> None:
            for _ in range(count // depth):
                await conn.read(random.randrange(blocks) * size, size)

        start = time.perf_counter()
        async with trio.open_nursery() as workers:
            for _ in range(depth):
                workers.start_soon(worker)
        elapsed = time.perf_counter() - start
        print(
            f"size {size:>8} depth {depth:>3}: {count / elapsed:8.0f} reads/s,"
            f" {elapsed / count * depth * 1e6:6.0f} us each"
        )
        await conn.aclose()
        nursery.cancel_scope.cancel()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("uri", help="nbd://HOST[:PORT][/EXPORT] (plain TCP or Unix socket)")
    ap.add_argument("--size", default="4096,32768", help="read sizes, comma-separated")
    ap.add_argument("--depth", default="1,16", help="reads in flight, comma-separated")
    ap.add_argument("--count", type=int, default=5000, help="reads per figure")
    args = ap.parse_args()
    tune_malloc()  # as the daemon does
    for size in map(int, args.size.split(",")):
        for depth in map(int, args.depth.split(",")):
            trio.run(measure, args.uri, size, depth, args.count)


if __name__ == "__main__":
    main()
